"""The parameters a training job sees: DTensors on the TP mesh, bound to compiled graphs at call time.

After ``tp_compile`` every parameter of the user's model is a ``DTensor`` ``nn.Parameter`` on
the TP mesh: ``Replicate`` until a graph plans it, then this rank's shard with the placement
its layout gives (``Shard``, ``_StridedShard`` for fused pieces, DTensor's uneven ``Shard``
for a padded vocabulary). That is the ecosystem's representation of a TP parameter, so the
code users already write composes: ``clip_grad_norm_`` reduces the partial norms (counting a
replicated parameter once), FSDP2's ``fully_shard`` shards it further over a data-parallel
mesh, DCP saves and reshards it, optimizers step it.

Compiled graphs never hold a parameter: each call reads the parameter that is registered on
the calling module *now* (by FQN; FSDP2 registers its unsharded parameters around each
block's forward) and hands the graph its local shard through one autograd function, whose
backward turns the local gradients back into DTensor gradients of the same placement.
"""
from __future__ import annotations

import weakref
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from tpcompile.errors import TPDivergenceError, TPParameterError, TPShardingError
from tpcompile.passes.layout import ParamPlan, contiguous_stride, renamed


def _same_layout(a: ParamPlan, b: ParamPlan) -> bool:
    """The same rows on every rank (a tied weight is "vocab" for its embedding, "colwise" for its head)."""
    if not a.sharded or not b.sharded:
        return a.sharded == b.sharded
    return (a.dim, a.chunks, a.pieces, a.local_shape, a.padded_shape) == (b.dim, b.chunks, b.pieces, b.local_shape,
                                                                         b.padded_shape)


class _ProgramShards(torch.autograd.Function):
    """DTensor parameters -> the local tensors a compiled graph takes (padded where the layout says);
    backward: local gradients -> DTensor gradients with each parameter's own spec."""

    @staticmethod
    def forward(ctx, layouts, rank, *params):
        ctx.specs = [p._spec for p in params]
        ctx.layouts, ctx.rank = layouts, rank
        return tuple(_program_view(p, lay) for p, lay in zip(params, layouts))

    @staticmethod
    def backward(ctx, *grads):
        from torch.distributed.tensor import DTensor

        out = []
        for g, spec, lay in zip(grads, ctx.specs, ctx.layouts):
            if g is not None:
                g = DTensor(lay.unpad(g, ctx.rank), spec, requires_grad=False)
            out.append(g)
        return (None, None, *out)


def _program_view(p, lay: ParamPlan) -> torch.Tensor:
    local = p._local_tensor
    base = getattr(local, "_tp_padded", None)  # a padded vocabulary shard we allocated: no copy per call
    if lay.padded_shape is None:
        return local.view_as(local)
    return base.view_as(base) if base is not None else lay.pad(local)


def _tp_replica(p: torch.Tensor, mesh) -> torch.Tensor | None:
    """This rank's tensor of ``p`` if ``p`` is replicated over the TP mesh (FSDP2's dp shard of it
    included: the TP ranks of one dp coordinate hold the same one), else None."""
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(p, DTensor):
        return None
    pmesh = p.device_mesh
    if pmesh == mesh:
        dim = 0
    elif "tp" in (pmesh.mesh_dim_names or ()) and pmesh["tp"] == mesh:
        dim = pmesh.mesh_dim_names.index("tp")
    else:
        return None
    return p.to_local() if isinstance(p.placements[dim], Replicate) else None


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bit_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t``'s elements read as integers of their width: equal replicas give equal sums."""
    t = t.detach().contiguous()
    as_int = _INT_OF_SIZE.get(t.element_size())
    bits = t.view(as_int) if as_int is not None else t.view(torch.uint8)
    return bits.sum(dtype=torch.int64)


class TPParameters:
    """The user model's parameters as TP DTensors, by FQN; the one place that stores and binds them."""

    def __init__(self, model: nn.Module, mesh, rank: int, tp: int):
        from torch.distributed.tensor import DTensor, Replicate

        _patch_dtensor_for_pieces()
        self.mesh, self.rank, self.tp = mesh, rank, tp
        self.layouts: dict[str, ParamPlan] = {}
        self.slots: dict[str, list[tuple[nn.Module, str]]] = {}
        self.fqn_of: dict[int, str] = {}  # id(our DTensor parameter) -> FQN
        self.canonical: dict[str, str] = {}  # every name of a parameter (tied weights: each) -> its FQN
        first: dict[int, str] = {}
        for mname, m in model.named_modules(remove_duplicate=False):
            for n, p in m._parameters.items():
                if p is None:
                    continue
                name = f"{mname}.{n}" if mname else n
                fqn = first.setdefault(id(p), name)
                self.slots.setdefault(fqn, []).append((m, n))
                self.canonical[name] = fqn
        self.retired: dict[int, weakref.ref] = {}  # the plain Parameters tp_compile replaced
        for fqn, slots in self.slots.items():
            m, n = slots[0]
            p = m._parameters[n]
            if isinstance(p, DTensor):
                raise TPParameterError(f"tp_compile: {fqn} is already a DTensor (placements {p.placements}); "
                                       f"call tp_compile on the plain single-device model, before fully_shard / "
                                       f"parallelize_module.")
            d = DTensor.from_local(p.detach(), mesh, [Replicate()], run_check=False)
            new = nn.Parameter(d, requires_grad=p.requires_grad)
            for m, n in slots:
                m._parameters[n] = new
            self.retired[id(p)] = weakref.ref(p)
            self.fqn_of[id(new)] = fqn

    # ------------------------------------------------------------------ lookup
    def current(self, fqn: str) -> torch.Tensor:
        """The parameter registered under ``fqn`` right now (ours, or FSDP2's unsharded / sharded one)."""
        m, n = self.slots[fqn][0]
        p = m._parameters.get(n)
        return p if p is not None else getattr(m, n)

    def named(self) -> Iterable[tuple[str, torch.Tensor]]:
        return ((fqn, self.current(fqn)) for fqn in self.slots)

    # ------------------------------------------------------------------ replicas in step
    def check_replicas(self, group, device: torch.device) -> None:
        """Raise ``TPDivergenceError`` if a parameter replicated over the TP group differs across it.

        Replicated parameters get all-reduced gradients, so every rank's optimizer step should keep
        them bitwise equal; one that differs means the ranks run different models from then on.
        One checksum per parameter (the sum of its bits as integers: exact, NaN-safe) and one
        all-gather of those for the whole model."""
        import torch.distributed as dist

        if dist.get_backend(group) == "fake":  # explain's / the tests' stand-in group: no other ranks to compare
            return
        names, sums = [], []
        for fqn, p in self.named():
            local = _tp_replica(p, self.mesh)
            if local is not None and not local.is_meta:
                names.append(fqn)
                sums.append(_bit_sum(local))
        if not names:
            return
        mine = torch.stack(sums).to(device)
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(every, mine, group=group)
        every = torch.stack(every).cpu()
        differ = (every != every[0]).any(dim=0)
        if bool(differ.any()):
            i = int(differ.nonzero()[0])
            ranks = [r for r in range(every.shape[0]) if every[r, i] != every[0, i]]
            raise TPDivergenceError(
                f"tp_compile: {names[i]} is replicated over the TP group but TP ranks {ranks} hold other values "
                f"than TP rank 0 ({int(differ.sum())} of {len(names)} replicated parameters differ). The ranks no "
                f"longer run one model. Usual causes: an optimizer step or a parameter update run on some ranks "
                f"only or with per-rank values (a learning rate, a gradient scaled per rank); gradient clipping "
                f"by a per-rank norm (clip the DTensor parameters: torch.nn.utils.clip_grad_norm_(model.parameters()) "
                f"is right); a random op (dropout, noise) applied to parameters with per-rank seeds; weights "
                f"initialised on each rank without the same seed. Turn the check off with "
                f"tp_compile(..., check_replicas_every=0).")

    # ------------------------------------------------------------------ storing a layout
    def apply(self, pp: ParamPlan) -> None:
        """Store ``pp.fqn`` as ``pp`` says (the first graph that uses a parameter decides)."""
        from torch.distributed.tensor import DTensor

        if _stored_already(self.layouts, pp):
            return
        p = self.current(pp.fqn)
        if pp.sharded:
            if self.fqn_of.get(id(p)) != pp.fqn or not (isinstance(p, DTensor) and p.device_mesh == self.mesh):
                raise TPParameterError(
                    f"tp_compile: {pp.fqn} must be sharded ({pp.style}) but it is no longer the replicated "
                    f"parameter tp_compile made ({type(p).__name__}"
                    f"{f', placements {p.placements} on {p.device_mesh}' if isinstance(p, DTensor) else ''}): "
                    f"something (fully_shard, DDP, a user assignment) took it over before the model was planned. "
                    f"Plan first: tp_compile(model, ..., example_inputs=batch), then fully_shard."
                )
            if p.grad is not None:
                raise TPShardingError(f"{pp.fqn}: first used after training started; cannot reshard it now.")
            torch.utils.swap_tensors(p, self._sharded(p, pp))
            self._carry_pieces(p, pp)
        self.layouts[pp.fqn] = pp

    def _sharded(self, p, pp: ParamPlan) -> nn.Parameter:
        """A new DTensor parameter holding this rank's shard of ``p`` (its full value)."""
        return self._parameter(pp, pp.stored(p._local_tensor, self.rank), p.requires_grad)

    def _parameter(self, pp: ParamPlan, stored: torch.Tensor, requires_grad: bool) -> nn.Parameter:
        """A DTensor parameter of ``pp``'s placement holding ``stored``. A padded vocabulary keeps its
        program shard (real rows, then zeros) with the stored rows a view of it: no copy per call."""
        d, base = self._dtensor(pp, stored)
        p = nn.Parameter(d, requires_grad=requires_grad)
        if base is not None:  # on the parameter's own local tensor (nn.Parameter makes a new one)
            p._local_tensor._tp_padded = base
        return p

    def _dtensor(self, pp: ParamPlan, stored: torch.Tensor):
        """(the DTensor of ``pp``'s placement holding ``stored``, the padded program shard or None)."""
        from torch.distributed.tensor import DTensor

        base = None
        if pp.padded_shape is not None:
            base = pp.pad(stored) if stored.shape[pp.dim] != pp.local_shape[pp.dim] else stored
            stored = pp.unpad(base, self.rank)
        d = DTensor.from_local(stored, self.mesh, [pp.placement()], run_check=False,
                               shape=torch.Size(pp.full_shape), stride=contiguous_stride(pp.full_shape))
        return d, base

    @staticmethod
    def _carry_pieces(p, pp: ParamPlan) -> None:
        """A parameter of unequal fused pieces, and each gradient it gets, carry their layout
        (``ParamPlan.mark``)."""
        if pp.exact:
            return
        pp.mark(p)

        def mark_grad(q) -> None:
            pp.mark(q.grad)

        if p.requires_grad:
            p.register_post_accumulate_grad_hook(mark_grad)

    def install(self, pp: ParamPlan, stored: torch.Tensor, requires_grad: bool) -> None:
        """Register a parameter built elsewhere (a meta model's allocated shard) under ``pp``'s slots."""
        if pp.sharded:
            new = self._parameter(pp, stored, requires_grad)
        else:
            from torch.distributed.tensor import DTensor, Replicate

            new = nn.Parameter(DTensor.from_local(stored, self.mesh, [Replicate()], run_check=False), requires_grad)
        self._carry_pieces(new, pp)
        old = self.current(pp.fqn)
        for m, n in self.slots[pp.fqn]:
            m._parameters[n] = new
        self.fqn_of.pop(id(old), None)
        self.fqn_of[id(new)] = pp.fqn
        self.layouts[pp.fqn] = pp

    # ------------------------------------------------------------------ binding at call time
    def program_locals(self, fqns: Sequence[str], layouts: Sequence[ParamPlan], bind: bool = True) -> list:
        """The local shards a graph planned with ``layouts`` takes for the parameters now registered
        under ``fqns`` (a graph reused for another block gets that block's parameters, stored the
        same way on first use). ``bind=False``: only store them."""
        params = []
        for fqn, lay in zip(fqns, layouts):
            known = _known(self, fqn, lay)
            if not bind:
                continue
            p = self.current(fqn)
            self._check(fqn, p, known)
            params.append(p)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return list(_ProgramShards.apply(tuple(layouts), self.rank, *params))
        return [_program_view(p, lay) for p, lay in zip(params, layouts)]

    def examples(self, fqns: Sequence[str], layouts: Sequence[ParamPlan]) -> list[torch.Tensor]:
        """Real local shards to fakify when compiling (no autograd), with the strides calls will have."""
        out = []
        for f, lay in zip(fqns, layouts):
            p = self.current(f)
            with torch.no_grad():
                t = _program_view(p, lay)
            out.append(t.detach().requires_grad_(p.requires_grad))
        return out

    def _check(self, fqn: str, p, pp: ParamPlan) -> None:
        from torch.distributed.tensor import DTensor

        if isinstance(p, DTensor) and p.device_mesh == self.mesh and p.placements == (pp.placement(),):
            return
        if isinstance(p, DTensor) and p.device_mesh.ndim > 1:
            why = (f"it is a {p.device_mesh.ndim}-D DTensor {p.placements}: FSDP2's sharded parameter. FSDP's hooks "
                   f"did not run before this graph, so it would compute with a shard of the weight")
        elif hasattr(p, "_st_info"):
            why = ("DistributedDataParallel(device_mesh=...) turned it into a plain local tensor (its TP+DDP "
                   "workaround), under which clip_grad_norm_ and checkpoints silently see local shards only")
        else:
            why = f"it is a {type(p).__name__}, not the DTensor ({pp.style}) this graph was planned for"
        raise TPParameterError(
            f"tp_compile: the parameter registered as {fqn} cannot be bound: {why}. For data parallelism use "
            f"FSDP2 (fully_shard on each block, then on the model; HSDP with a 2-D data-parallel mesh) or "
            f"tp_compile(model, mesh=mesh, ...); see the README's data-parallel section."
        )

    def check_optimizer(self, optimizer) -> None:
        """At an optimizer's first step (a global pre-step hook). An optimizer built before tp_compile
        holds the replaced plain Parameters: it would never update the model (an error). State given
        to it before the model was planned (a resumed checkpoint) is shaped like the parameters were
        then, replicated: it is stored like its parameter now (``_state_like_parameters``)."""
        for g in optimizer.param_groups:
            for p in g["params"]:
                r = self.retired.get(id(p))
                if r is not None and r() is p:
                    raise TPParameterError(
                        "this optimizer was built before tp_compile: it holds the model's old plain Parameters, "
                        "which tp_compile replaced by tensor-parallel DTensors, so it would never update the "
                        "model. Build the optimizer after tp_compile (opt = AdamW(model.parameters()))."
                    )
        self._state_like_parameters(optimizer)

    def _state_like_parameters(self, optimizer) -> None:
        """Planning swaps a parameter's replicated value for its shard in place; optimizer state made
        before that (loaded, not stepped: a step needs a forward, which plans) keeps the replicated
        layout, and DTensor would run every in-place update of it (``exp_avg.lerp_(grad)``) on a
        redistributed copy: the state would never change again. Shard it the same way, in place."""
        from torch.distributed.tensor import DTensor, Replicate

        for p, st in optimizer.state.items():
            pp = self.layouts.get(self.fqn_of.get(id(p), ""))
            if pp is None or not pp.sharded:
                continue
            for v in st.values():
                if (isinstance(v, DTensor) and v.shape == p.shape and v.device_mesh == self.mesh
                        and all(isinstance(q, Replicate) for q in v.placements)):
                    torch.utils.swap_tensors(v, self._dtensor(pp, pp.stored(v._local_tensor, self.rank))[0])


def _stored_already(layouts: dict, pp: ParamPlan) -> bool:
    """True if ``pp.fqn`` is stored as ``pp`` already; stored otherwise is an error (the first graph decides)."""
    known = layouts.get(pp.fqn)
    if known is not None and not _same_layout(known, pp):
        raise TPShardingError(f"{pp.fqn}: a later graph needs it {pp.style} but it is stored {known.style}; "
                              f"pin one with plan={{{pp.fqn!r}: {known.style!r}}}.")
    return known is not None


def _known(store, fqn: str, lay: ParamPlan) -> ParamPlan:
    """The layout ``fqn`` is stored with, storing ``lay``'s if it has none yet; a different one is an error."""
    known = store.layouts.get(fqn)
    if known is None:  # first seen through a reused graph: the layout of the one it was planned for
        store.apply(renamed(lay, fqn))
        return store.layouts[fqn]
    if not _same_layout(known, lay):
        raise TPShardingError(
            f"{fqn}: this graph was planned for a parameter stored {lay.style} ({lay.fqn}), but {fqn} is "
            f"stored {known.style}; pin one with plan={{{fqn!r}: {known.style!r}}}."
        )
    return known


class StandinParameters:
    """``explain``'s parameters: layouts only. The model is never read or written; a graph takes
    memory-free stand-ins of the local shapes (ghost slices)."""

    def __init__(self, twin):
        self.layouts: dict[str, ParamPlan] = {}
        self.standins: dict[str, nn.Parameter] = {}
        self._ghosts = {twin.fqn_of[id(g)]: g for g in twin.ghosts}

    def apply(self, pp: ParamPlan) -> None:
        if _stored_already(self.layouts, pp):
            return
        g = self._ghosts[pp.fqn]
        self.standins[pp.fqn] = nn.Parameter(g[tuple(slice(0, n) for n in pp.local_shape)], g.requires_grad)
        self.layouts[pp.fqn] = pp

    def program_locals(self, fqns: Sequence[str], layouts: Sequence[ParamPlan], bind: bool = True) -> list:
        for fqn, lay in zip(fqns, layouts):
            _known(self, fqn, lay)
        return [self.standins[f] for f in fqns]

    examples = program_locals


_STORES: "weakref.WeakSet[TPParameters]" = weakref.WeakSet()
_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_HOOK = None


def watch_optimizers(store: TPParameters) -> None:
    """Check each optimizer once, at its first step, against every tp-compiled model's replaced parameters."""
    global _HOOK
    _STORES.add(store)
    if _HOOK is None:
        def pre_step(optimizer, args, kwargs):
            if optimizer in _CHECKED:
                return
            for s in list(_STORES):
                s.check_optimizer(optimizer)
            _CHECKED[optimizer] = True

        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _HOOK = register_optimizer_step_pre_hook(pre_step)


def on_tp_mesh(t) -> bool:
    """True for a DTensor on the TP mesh of a live tp-compiled model (its parameters, or views of them)."""
    mesh = getattr(t, "device_mesh", None)
    return mesh is not None and any(s.mesh == mesh for s in list(_STORES))


def _patch_dtensor_for_pieces() -> None:
    """Unequal fused pieces (``[q_r | k_r | v_r]``, q wider than k and v) are a layout no DTensor
    placement describes: the parameter is a ``Shard(dim)`` DTensor whose rows are in rank order.
    So that ``.full_tensor()`` of such a parameter or of its gradient is still the true full tensor
    (and ``redistribute`` a clear error, not a permuted one), both look at the layout they carry."""
    from torch.distributed._functional_collectives import all_gather_single_autograd
    from torch.distributed.tensor import DTensor

    if getattr(DTensor.full_tensor, "_tp_pieces", False):
        return
    full_tensor, redistribute, detach = DTensor.full_tensor, DTensor.redistribute, DTensor.detach

    def pieces_full_tensor(self, *, grad_placements=None):
        pp = self.__dict__.get("_tp_pieces")
        if pp is None:
            return full_tensor(self, grad_placements=grad_placements)
        local = self._local_tensor
        tp = self.device_mesh.size()
        gathered = all_gather_single_autograd(local.contiguous(), gather_dim=pp.dim, group=self.device_mesh.get_group())
        return pp.assemble(list(gathered.chunk(tp, pp.dim)))

    def pieces_redistribute(self, *args, **kwargs):
        pp = self.__dict__.get("_tp_pieces")
        if pp is not None:
            raise TPShardingError(
                f"{pp.fqn} holds unequal fused pieces {pp.pieces} (each split over tp on its own), a layout no DTensor "
                f"placement describes: redistribute() would move rows in rank order. Use .full_tensor() (which "
                f"places the pieces right) or tpcompile.full_state_dict.")
        return redistribute(self, *args, **kwargs)

    def pieces_detach(self):
        # state_dict() holds detached parameters: they must still gather to the true full tensor
        out = detach(self)
        pp = self.__dict__.get("_tp_pieces")
        return pp.mark(out) if pp is not None else out

    pieces_full_tensor._tp_pieces = True
    DTensor.full_tensor, DTensor.redistribute, DTensor.detach = pieces_full_tensor, pieces_redistribute, pieces_detach
