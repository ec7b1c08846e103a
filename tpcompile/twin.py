"""The ghost twin: the module tree Dynamo traces, with memory-free parameters of logical shape.

Dynamo must capture the single-device graph (logical shapes, plain tensors), while the
user's model holds this rank's shards as DTensors. The twin is a copy of the user's module
tree whose parameters are *ghosts*: ``Parameter``s of the logical shape that own one element
(stride 0). Buffers are shared with the user's model. Compiled graphs take ghosts as inputs
and swap each for the parameter registered under its FQN on the user's model at call time
(``tpcompile.params``), so a graph Dynamo reuses for another block binds that block.

Two things keep eagerly-run code right:

- every twin module's ``forward`` is a function of this file (one copy per class and position
  in the tree, ``position_of``), so a module called from code Dynamo runs eagerly (a frame
  skipped for a graph break inside the block loop: embedding, final norm, LM head) is compiled
  as its own small graph instead of computing on ghosts;
- a twin module whose user module got forward hooks after ``tp_compile`` (FSDP2's
  ``fully_shard`` on a block, or the user's own) graph-breaks and calls the *user's* module, so
  its hooks run there (FSDP unshards the block, registers its post-backward), with that
  module's ``forward`` redirected to the twin's compiled forward (``Twin.regions``). Hooks
  that were there before ``tp_compile`` were copied with the module and are traced into the
  graph, as without tpcompile.
"""
from __future__ import annotations

import copy
import functools
import re
import types
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn

from tpcompile.eager import eager_class
from tpcompile.errors import TPWarning


def trace_config() -> dict:
    """Dynamo settings of every trace of a twin (the forward, regions, the planning trace, explain).

    Graph breaks in nested frames resume there instead of ending the caller's graph, and logger
    calls Dynamo would break on are dropped inside compiled code: a harmless
    ``logger.warning_once(...)`` in a library model (Hugging Face's loss selection) would
    otherwise split the model into graphs planned apart, which costs collectives.

    A checkpointed block (``torch.utils.checkpoint``) with a Python side effect is traced, its side
    effect applied once (in the forward), not again in the backward's recompute: Hugging Face's
    layers (transformers >= 5.25) set and reset the ``kernels`` package's context variable around
    each attention forward, a side effect that Dynamo otherwise refuses inside the checkpoint and
    answers by running every checkpointed layer eagerly (unsharded, through ``tpcompile.eager``)."""
    import logging

    names = ("debug", "info", "warning", "warn", "error", "critical", "exception", "log", "warning_once", "info_once",
             "warning_advice")
    fns = {getattr(logging.Logger, n) for n in names if hasattr(logging.Logger, n)}
    return {"nested_graph_breaks": True,
            "ignore_logging_functions": set(torch._dynamo.config.ignore_logging_functions) | fns,
            "skip_fwd_side_effects_in_bwd_under_checkpoint": True}


def ghost(p: torch.Tensor, device: torch.device) -> nn.Parameter:
    """A Parameter of ``p``'s logical shape that owns one element of memory (stride 0); a 3-D one
    (MoE experts) one matrix shared by all of its shape (``_matrix_ghost``).

    The element is NaN (floats), so code that Dynamo leaves to run eagerly on a ghost
    poisons its result instead of quietly computing with garbage; ``forward`` checks.
    """
    fill = float("nan") if p.dtype.is_floating_point else 0
    if p.dim() == 3 and p.dtype.is_floating_point:  # MoE experts: see _matrix_ghost
        return nn.Parameter(_matrix_ghost(tuple(p.shape[-2:]), p.dtype, device).expand(p.shape),
                            requires_grad=p.requires_grad)
    g = torch.full((), fill, dtype=p.dtype, device=device).expand(p.shape)
    return nn.Parameter(g, requires_grad=p.requires_grad)


_MATRICES: dict = {}


def _matrix_ghost(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One NaN matrix per (shape, dtype, device), shared by every 3-D ghost of that shape, which expands it
    over the experts (strides ``(0, n, 1)``): ``torch._grouped_mm``'s fake kernel checks that one of the last
    two strides is 1 and the other spans its dim (16-byte aligned), which stride 0 fails, so Dynamo raised at
    the first call of a bf16 ``"grouped_mm"`` MoE. Costs one expert's matrix per shape, not one per layer."""
    key = (shape, dtype, str(device))
    m = _MATRICES.get(key)
    if m is None:
        m = _MATRICES[key] = torch.full(shape, float("nan"), dtype=dtype, device=device)
    return m


def _forward_of(module: nn.Module) -> Callable:
    """The function ``module`` runs as its forward, called as ``f(module, *args)``: its class's, or
    the one set on the instance before ``tp_compile`` (``module.forward = ...``, as accelerate's
    hooks and patching libraries do; it used to be skipped for the class's, silently)."""
    f = module._tp_fwd
    return type(module).forward if f is None else f


def _instance_forward(fwd: Callable, module: nn.Module, *args, **kwargs):
    return fwd(*args, **kwargs)


def _own_forward(twin: nn.Module) -> tuple[Callable | None, bool]:
    """(``_tp_fwd`` of a twin module, whether a compile region may run it for another block): None for
    the class's forward; a method bound to the module itself, as its function (region-safe); any
    other callable (a partial, a closure: it holds its own module), called as it is, not region-safe."""
    fwd = twin.__dict__.get("forward")
    if fwd is None:
        return None, True
    if isinstance(fwd, types.MethodType) and fwd.__self__ is twin:
        return fwd.__func__, True
    return functools.partial(_instance_forward, fwd), False


def _twin_forward(self, *args, **kwargs):
    if self._tp_route:  # the user's module has hooks (FSDP2): run them, around the compiled forward
        return _through_user_hooks(self, args, kwargs)
    return _forward_of(self)(self, *args, **kwargs)


def _block_forward(self, *args, **kwargs):
    """A repeated block's forward (regional compilation): its body is a compile region, traced
    once and called for every layer (``passes/regional.py``)."""
    if self._tp_route:
        return _through_user_hooks(self, args, kwargs)
    if self._tp_inline:  # this block's modules changed since capture (``Twin.sync``): traced inline, guarded
        return _forward_of(self)(self, *args, **kwargs)
    if not torch.is_grad_enabled() and not self.__dict__["_tp_owner"].regions_without_grad:
        return _forward_of(self)(self, *args, **kwargs)  # norms fused across blocks (generate): inline
    return self.__dict__["_tp_block_region"](self, *args, **kwargs)


def _block_body(module: nn.Module, *args, **kwargs):
    # the module is an operand of the region, not the bound ``self`` of a method: Dynamo reuses a
    # region traced from a bound method for another instance with the *first* instance's
    # parameters (checked, torch 2.13: silently wrong), an operand module lifts its own
    return _forward_of(module)(module, *args, **kwargs)


_COPIES: dict[tuple, Callable] = {}


def _copy_for(fn: Callable, cls: type, position: str) -> Callable:
    """``fn`` with a code object of its own per (class, position in the module tree).

    Dynamo caches compiled frames per code object and reuses one for every module that passes
    its guards. Modules at one position of every block (``h.*.attn.q_proj``) share a copy, so a
    frame compiled for one block is reused for the next (bound to that block's parameters);
    modules elsewhere (``o_proj``, of the same class and shapes but another layout) get another
    copy, so they never run a program planned for a different layout, and do not count against
    each other's recompile limit."""
    key = (fn, cls, position)
    out = _COPIES.get(key)
    if out is None:
        name = f"{cls.__name__}_{re.sub(r'[^0-9A-Za-z_]', '_', position)}_{fn.__name__.strip('_')}"
        code = fn.__code__.replace(co_name=name)
        out = _COPIES[key] = types.FunctionType(code, fn.__globals__, name)
    return out


def position_of(fqn: str) -> str:
    """``h.3.attn.q_proj`` -> ``h.*.attn.q_proj``: where a module sits, whatever block it is in."""
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", fqn)


class Twin:
    """The ghost copy of a user model, and the map from its ghosts back to parameter FQNs."""

    def __init__(self, model: nn.Module, device: torch.device, meta_buffers_as_ghosts: bool = False,
                 regional: bool = False):
        memo: dict[int, Any] = {}
        self.fqn_of: dict[int, str] = {}  # id(ghost) -> FQN of the parameter it stands for
        self.names: dict[int, str] = {}  # ghost / buffer id -> FQN, for readable graphs
        for fqn, p in model.named_parameters():
            g = ghost(p, p.device if p.device.type != "meta" else device)
            memo[id(p)] = g
            self.fqn_of[id(g)] = self.names[id(g)] = fqn
        for b in model.buffers():
            memo[id(b)] = ghost(b, device) if meta_buffers_as_ghosts and b.device.type == "meta" else b
        for fqn, b in model.named_buffers():
            self.names.setdefault(id(memo[id(b)]), fqn)
        # every name of a parameter (a tied weight has several) -> the FQN it is planned under
        self.aliases = {n: self.fqn_of[id(memo[id(p)])] for n, p in model.named_parameters(remove_duplicate=False)}
        self.module = copy.deepcopy(model, memo)
        for m in self.module.modules():  # untraced reads of a ghost get the real value (tpcompile.eager)
            if m._parameters:  # only a module's own parameters are read through its __getattr__
                m.__class__ = eager_class(type(m))
        self.ghosts = [memo[id(p)] for p in model.parameters()]  # keep ids stable
        self.eager = None  # tpcompile.eager.register: what an untraced read of a ghost gathers from
        self.pairs = list(zip(model.modules(), self.module.modules()))
        self.compile: Callable | None = None  # set by the owner: fn -> torch.compile(fn, backend=...)
        self.regions: dict[Callable, Callable] = {}
        names = {m: n for n, m in self.module.named_modules()}  # a module registered twice: its first name
        from tpcompile.data_parallel import find_blocks

        own = {id(m): _own_forward(m) for m in self.module.modules()}
        # a block whose forward was set on the instance as anything but its own method stays out of the region
        blocks = {id(b) for b in find_blocks(self.module) if own[id(b)][1]} if regional else set()
        self.regional = len(blocks) > 1
        self.warn_regional_off = False  # tp_compile(regional=True): a TPWarning when a graph break turns it off
        # trace regions under no_grad too (fuse_norm=False): otherwise those graphs fuse norms across the
        # blocks' ends and the pipeline would inline every region (a KV cache passed in cannot be traced in one)
        self.regions_without_grad = False
        self._blocks: list[tuple[nn.Module, str]] = []  # (twin block, position): regional forwards
        for i, (user, twin) in enumerate(self.pairs):
            if i == 0 or type(twin).forward is nn.Module.forward:
                continue  # the root (its hooks already ran: the user called it) and containers
            position = position_of(names.get(twin, ""))
            twin._tp_route = False
            twin._tp_fwd = own[id(twin)][0]
            if self.regional and id(twin) in blocks:
                twin._tp_inline = False
                twin.forward = types.MethodType(_copy_for(_block_forward, type(twin), position), twin)
                twin.__dict__["_tp_block_region"] = _block_region(type(twin), position)
                self._blocks.append((twin, position))
            else:
                twin.forward = types.MethodType(_copy_for(_twin_forward, type(twin), position), twin)
            twin.__dict__["_tp_user"] = user  # plain attributes, not submodules: never traced
            twin.__dict__["_tp_owner"] = self
            twin.__dict__["_tp_region"] = _copy_for(_region, type(twin), position)
        self._block_modules = {id(b): list(b.modules())[1:] for b, _ in self._blocks}
        self._blocks_checked = False  # the first sync checks the blocks' hooks (_inline_changed_blocks)

    def regional_off(self) -> None:
        """Trace the repeated blocks inline from now on (a graph break inside a block: Dynamo cannot
        capture a region that breaks)."""
        for twin, position in self._blocks:
            twin.forward = types.MethodType(_copy_for(_twin_forward, type(twin), position), twin)
        self._blocks, self._block_modules, self.regional = [], {}, False

    def follow_devices(self, params) -> None:
        """Keep each ghost on its parameter's device (a meta model allocated on another device)."""
        for g in self.ghosts:
            p = params.current(self.fqn_of[id(g)])
            if g.device != p.device:
                g.data = ghost(g, p.device).data

    def sync(self) -> None:
        """Carry the user modules' training flags and hooks over to the twin, before each call."""
        changed = False
        for i, (user, twin) in enumerate(self.pairs):
            if twin.training != user.training:
                twin.training, changed = user.training, True
            if i and (user._forward_pre_hooks or user._forward_hooks or twin._forward_pre_hooks or twin._forward_hooks):
                route = False
                for mine, theirs in ((user._forward_pre_hooks, twin._forward_pre_hooks),
                                     (user._forward_hooks, twin._forward_hooks)):
                    for k in [k for k in theirs if k not in mine]:
                        del theirs[k]  # removed from the user's module since: the twin forgets it too
                        changed = True
                    route = route or any(k not in theirs for k in mine)
                if twin.__dict__.get("_tp_route", route) != route:
                    twin._tp_route, changed = route, True
        if self._blocks and (changed or not self._blocks_checked):
            self._blocks_checked = True
            self._inline_changed_blocks()

    def _inline_changed_blocks(self) -> None:
        """Trace inline every repeated block whose modules differ from the first block's in hooks or
        training flags, or have a routed module (hooks registered on the user's model after
        ``tp_compile``). Dynamo (torch 2.13) checks a region's reuse for the next block against the
        guards of the first block's trace, which have none on hooks (``skip_nnmodule_hook_guards``),
        and guards a stamped-out region only on the block it was traced from: a forward hook on
        ``h[2].attn``, registered before ``tp_compile`` or after the first call, was silently skipped
        (loss 5e-4 off). Hooks alike in every block (Hugging Face's output-capturing ones: one closure
        per module over the same code and values) trace into the region the same for each.
        ``_tp_inline`` is read in the caller's frame, where Dynamo guards it for every block."""
        first = [_module_state(m) for m in self._block_modules[id(self._blocks[0][0])]]
        names, now_inline = {m: n for n, m in self.module.named_modules()}, []
        for block, _ in self._blocks:
            mods = self._block_modules[id(block)]
            inline = (any(m.__dict__.get("_tp_route", False) for m in mods) or len(mods) != len(first)
                      or not all(_same(_module_state(m), f) for m, f in zip(mods, first)))
            if block._tp_inline != inline:
                block._tp_inline = inline
                if inline:
                    now_inline.append(names.get(block, "?"))
        if now_inline and self.warn_regional_off:  # tp_compile(regional=True)
            warnings.warn(f"tpcompile: blocks {now_inline} are compiled inline, not as the repeated block's region: "
                          f"a module in them has hooks or a training flag unlike the first block's (a reused region "
                          f"would skip them). Correct; those layers compile in the model's graph.", TPWarning,
                          stacklevel=4)


def _module_state(m: nn.Module) -> tuple:
    """What a region traced from one block bakes in of each of its modules, beyond what Dynamo checks
    for reuse: the training flag and the hooks (with their kwargs / always-called flags)."""
    def hooks(d: dict, *flags: dict) -> list:
        return [(h, *(k in f for f in flags)) for k, h in d.items()]

    return (m.training, m.__dict__.get("_tp_fwd"), hooks(m._forward_pre_hooks, m._forward_pre_hooks_with_kwargs),
            hooks(m._forward_hooks, m._forward_hooks_with_kwargs, m._forward_hooks_always_called),
            hooks(m._backward_pre_hooks), hooks(m._backward_hooks))


def _same(a: Any, b: Any, depth: int = 0) -> bool:
    """Whether ``a`` and ``b`` behave alike when traced: equal plain values, or functions of one code
    object over alike defaults and closure cells (a closure made per module), partials and bound
    methods of alike parts. Anything else (or nested deeper than 6) only if it is the same object."""
    if a is b:
        return True
    if type(a) is not type(b) or depth > 6:
        return False
    same = functools.partial(_same, depth=depth + 1)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, (bool, int, float, str, bytes, type(None))):
        return a == b
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, types.FunctionType):
        return (a.__code__ is b.__code__ and a.__globals__ is b.__globals__ and same(a.__defaults__, b.__defaults__)
                and same(a.__kwdefaults__, b.__kwdefaults__) and same(_cells(a), _cells(b)))
    if isinstance(a, functools.partial):
        return same(a.func, b.func) and same(a.args, b.args) and same(a.keywords, b.keywords)
    if isinstance(a, types.MethodType):
        return a.__self__ is b.__self__ and same(a.__func__, b.__func__)
    return False


def _cells(f: types.FunctionType) -> list:
    """A closure's cell contents (itself, a recursive closure, and an empty cell as markers)."""
    out = []
    for c in f.__closure__ or ():
        try:
            v = c.cell_contents
        except ValueError:
            v = "<empty cell>"
        out.append("<itself>" if v is f else v)
    return out


_BLOCK_REGIONS: dict[tuple, Callable] = {}


def _block_region(cls: type, position: str) -> Callable:
    """One compile region per (class, position) of the repeated blocks."""
    key = (cls, position)
    if key not in _BLOCK_REGIONS:
        _BLOCK_REGIONS[key] = torch.compiler.nested_compile_region(_copy_for(_block_body, cls, position))
    return _BLOCK_REGIONS[key]


def _region(module: nn.Module, *args, **kwargs):
    """What a routed module compiles (one copy per class and position): the twin module's own
    forward (its children route as usual)."""
    return _forward_of(module)(module, *args, **kwargs)


@torch._dynamo.disable(recursive=True)
def _through_user_hooks(twin: nn.Module, args: tuple, kwargs: dict):
    owner, user, fn = twin.__dict__["_tp_owner"], twin.__dict__["_tp_user"], twin.__dict__["_tp_region"]
    region = owner.regions.get(fn)
    if region is None:
        region = owner.regions[fn] = owner.compile(fn)
    had = "forward" in user.__dict__
    saved = user.__dict__.get("forward")
    user.forward = lambda *a, **k: region(twin, *a, **k)
    try:
        return user(*args, **kwargs)
    finally:
        if had:
            user.forward = saved
        else:
            del user.forward


# --------------------------------------------------------------------------- sharded state
# A KV cache lives outside the graph (Hugging Face's DynamicCache holds the ``cat`` of past and
# new k / v as Python state): the graph returns it and takes it back on the next call. Made
# whole at the graph's end it would cost an all-gather per layer per token and tp times the
# memory. Instead the backend returns it as a *state ghost*: a memory-free tensor of the logical
# shape (what Dynamo traces and guards on, like a parameter's ghost) that carries this rank's
# shard; a graph taking it back swaps the shard in and starts it with the same placement.
_STATE: "torch.utils.weak.WeakIdKeyDictionary" = None  # ghost -> (local shard, placement)


def _state_table():
    global _STATE
    if _STATE is None:
        from torch.utils.weak import WeakIdKeyDictionary

        _STATE = WeakIdKeyDictionary()
    return _STATE


def state_ghost(local: torch.Tensor, shape: tuple, placement: Any) -> torch.Tensor:
    """A NaN ghost of logical ``shape`` standing for ``local``, this rank's shard (``placement``).
    Not a view (``expand`` would be one): Dynamo replays a view from its base, whose sizes then
    never turn symbolic, and a growing cache would recompile every token."""
    one = torch.full((1,), float("nan") if local.is_floating_point() else 0, dtype=local.dtype, device=local.device)
    g = torch.empty(0, dtype=local.dtype, device=local.device).set_(one.untyped_storage(), 0, shape, [0] * len(shape))
    state_ghost_register(g, local, placement)
    return g


def state_ghost_register(g: torch.Tensor, local: torch.Tensor, placement: Any) -> None:
    """``g`` (a ghost: NaN, stride 0) stands for ``local`` from now on."""
    _state_table()[g] = (local, placement)


def state_of(t: Any) -> tuple | None:
    """(local shard, placement) if ``t`` is a state ghost, else None."""
    return _state_table().get(t) if isinstance(t, torch.Tensor) else None


def state_bytes(obj: Any) -> tuple[int, int]:
    """(bytes this rank holds, logical bytes) of the state ghosts and plain tensors in ``obj``
    (a Hugging Face cache, a list of tensors): what a KV cache costs per rank."""
    seen, held, logical = set(), 0, 0
    stack = [obj]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            st = state_of(x)
            local = st[0] if st else x
            held += local.numel() * local.element_size()
            logical += x.numel() * x.element_size()
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif hasattr(x, "__dict__") and not isinstance(x, (type, nn.Module)):
            stack.extend(vars(x).values())
    return held, logical
