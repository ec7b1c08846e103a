"""Meta-device models: plan before allocating, give each rank only its shards, replay the model's init.

``prepare`` (called by ``tp_compile``) plans the model on ``example_inputs`` before the first
call, so a model built on the ``meta`` device gets only its local shards allocated; with
``init_weights`` those shards get exactly the values single-device init would give them.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from tpcompile.passes.layout import replicated


def _args_kwargs(example_inputs) -> tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        return (), example_inputs
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    return tuple(example_inputs), {}


def require_plan(model: nn.Module, what: str) -> None:
    st = getattr(model, "_tp_state", None)
    if st is None:
        return
    meta = [n for n, p in st.params.named() if p.is_meta]
    if meta:
        raise RuntimeError(f"{what}: parameters {meta[:4]} are still on the meta device; "
                           f"pass tp_compile(model, example_inputs=...) so they get allocated.")


def reset_parameters(module: nn.Module) -> None:
    """Per-module init: the module's own ``reset_parameters()`` if it has one (torch layers do)."""
    fn = getattr(module, "reset_parameters", None)
    if callable(fn):
        fn()


def _sweeps(init_weights) -> list[Callable[[nn.Module], None]]:
    if init_weights is None or init_weights is False:
        return []
    if init_weights is True:
        return [reset_parameters]
    if callable(init_weights):
        return [init_weights]
    return [reset_parameters if f is True else f for f in init_weights]


def _post_order(model: nn.Module) -> list[nn.Module]:
    out: list[nn.Module] = []
    model.apply(out.append)  # the order ``model.apply(init_fn)`` visits modules in
    return out


def _units(mods: list[nn.Module]) -> list[list[nn.Module]]:
    """Modules that share a parameter (tied weights) are initialised together."""
    parent = list(range(len(mods)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    for i, m in enumerate(mods):
        for p in m._parameters.values():
            if p is not None and p.is_meta:
                j = owner.setdefault(id(p), i)
                parent[find(i)] = find(j)
    groups: dict[int, list[nn.Module]] = {}
    for i, m in enumerate(mods):
        groups.setdefault(find(i), []).append(m)
    return sorted(groups.values(), key=lambda g: mods.index(g[0]))


def _rng(device: torch.device):
    if device.type == "cuda":
        return (lambda: torch.cuda.get_rng_state(device)), (lambda s: torch.cuda.set_rng_state(s, device))
    return torch.get_rng_state, torch.set_rng_state


def _own_meta(m: nn.Module) -> list[str]:
    return [n for n, p in m._parameters.items() if p is not None and p.is_meta]


@torch.no_grad()
def prepare(model: nn.Module, state, example_inputs, init_weights, device) -> None:
    """Plan on ``example_inputs`` now; allocate (and optionally initialise) meta tensors.

    Init of a meta model (``init_weights``: ``True`` for each module's ``reset_parameters``, a
    per-module function such as ``model._init_weights``, or a list of these run one after
    the other) reproduces, bit for bit, ``torch.manual_seed(s)`` then ``for fn in sweeps:
    model.apply(fn)`` on one device: a first pass runs every init on full-size tensors one
    module at a time only to record the RNG state before each call; a second pass rebuilds
    each module's full tensors from those states, keeps this rank's slice and frees the rest.
    Peak memory: the largest module's full parameters, twice the init compute.
    """
    meta_params = [n for n, p in state.params.named() if p.is_meta]
    meta_bufs = [n for n, b in model.named_buffers() if b.is_meta]
    if not meta_params and not meta_bufs:
        if example_inputs is not None:
            state.plan_now(*_args_kwargs(example_inputs))
        return
    if example_inputs is None:
        raise ValueError(
            f"tp_compile: {len(meta_params) + len(meta_bufs)} parameters/buffers (e.g. "
            f"{(meta_params + meta_bufs)[0]!r}) are on the meta device; pass example_inputs=(...) (a batch "
            f"like the real ones) so tp_compile can plan before allocating only this rank's shards."
        )
    device = torch.device(device) if device is not None else state.device
    sweeps = _sweeps(init_weights)
    mods = _post_order(model)
    twin_of = {id(m): t for m, t in state.twin.pairs}
    get_rng, set_rng = _rng(device)

    # pass 1: buffers (small, replicated) for good; RNG states before each (sweep, module)
    states: dict[tuple[int, int], torch.Tensor] = {}
    for m in mods:
        _materialise_buffers(m, twin_of[id(m)], device)
    for s, fn in enumerate(sweeps):
        for i, m in enumerate(mods):
            states[(s, i)] = get_rng()
            saved = {n: m._parameters[n] for n in _own_meta(m)}
            for n, p in saved.items():
                m._parameters[n] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), p.requires_grad)
            fn(m)
            m._parameters.update(saved)
    end_state = get_rng() if sweeps else None
    bad = [f"{mn}.{n}" if mn else n for mn, m in model.named_modules() for n, b in m._buffers.items()
           if b is not None and b.is_floating_point() and n in m._non_persistent_buffers_set and b.isnan().any()]
    if bad:
        raise ValueError(f"tp_compile: non-persistent buffers {bad} were on the meta device and no init set them "
                         f"(no checkpoint holds them): pass init_weights= a function that sets them "
                         f"(e.g. a Hugging Face model's model._init_weights), or create buffers off meta.")

    state.plan_now(*_args_kwargs(example_inputs))

    # pass 2: one unit of modules at a time: full tensors, replayed init, keep the slice
    index = {id(m): i for i, m in enumerate(mods)}
    new: dict[int, nn.Parameter] = {}
    uninit = set()
    for unit in _units(mods):
        params = {id(p): p for m in unit for p in m._parameters.values() if p is not None and p.is_meta}
        if not params:
            continue
        full = {}
        for pid, p in params.items():
            pp = state.plan.get(state.params.fqn_of.get(pid))
            # with no init only the local shard is ever allocated (NaN until loaded)
            shape = p.shape if pp is None or not pp.sharded else pp.full_shape if sweeps else pp.stored_shape(state.rank)
            fill = float("nan") if p.is_floating_point() else 0
            full[pid] = nn.Parameter(torch.full(shape, fill, dtype=p.dtype, device=device), p.requires_grad)
        if sweeps:
            swapped = [(m, n, p) for m in unit for n, p in m._parameters.items() if p is not None and id(p) in full]
            for m, n, p in swapped:
                m._parameters[n] = full[id(p)]
            for s, fn in enumerate(sweeps):
                for m in unit:
                    set_rng(states[(s, index[id(m)])])
                    fn(m)
            for m, n, p in swapped:
                m._parameters[n] = p
        for pid, p in params.items():
            fqn = state.params.fqn_of[pid]
            f = full[pid].data
            if sweeps and f.is_floating_point() and f.isnan().any():
                raise ValueError(f"tp_compile: init_weights left {fqn} (at least partly) uninitialised; "
                                 f"give an init for its module ({type(_owner(unit, p)).__name__}), or load a checkpoint.")
            pp = state.plan.get(fqn)
            local = pp.stored(f, state.rank) if pp is not None and pp.sharded and sweeps else f
            new[pid] = (pp or replicated(fqn, p.shape), local, p.requires_grad)
            if not sweeps:
                uninit.add(fqn)
            del full[pid], f
    if end_state is not None:
        set_rng(end_state)
    for pp, local, requires_grad in new.values():
        state.params.install(pp, local, requires_grad)
    state.twin.follow_devices(state.params)
    if uninit:
        state._uninitialised = uninit
        forward = model.forward

        def checked(*args, **kwargs):
            if state._uninitialised:
                raise RuntimeError(
                    f"tp_compile: {len(state._uninitialised)} parameters (e.g. {sorted(state._uninitialised)[0]!r}) "
                    f"were built on the meta device and never loaded: call tpcompile.load_checkpoint(model, path) "
                    f"first, or pass tp_compile(..., init_weights=True)."
                )
            return forward(*args, **kwargs)

        model.forward = checked


def _owner(unit: list[nn.Module], p) -> nn.Module:
    return next(m for m in unit if any(q is p for q in m._parameters.values()))


def _materialise_buffers(m: nn.Module, twin: nn.Module, device: torch.device) -> None:
    for n, b in list(m._buffers.items()):
        if b is not None and b.is_meta:
            fill = float("nan") if b.is_floating_point() else 0
            nb = torch.full(b.shape, fill, dtype=b.dtype, device=device)
            m._buffers[n] = nb
            twin._buffers[n] = nb
