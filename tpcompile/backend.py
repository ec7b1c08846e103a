"""The torch.compile backend: captured graph -> ``tp_program`` -> Inductor, parameters bound per call.

Dynamo traces the ghost twin (``tpcompile.twin``), so the graph it hands us has logical
shapes and takes ghosts where the parameters go. The pipeline plans and rewrites it; the
parameters are stored as its layouts say (``TPParameters.apply``); the program is compiled
on fakes of the local shards. The callable we return swaps each ghost argument for the local
shard of the parameter registered under that ghost's FQN *at call time*: a frame Dynamo
reuses for another block (or another model instance) runs with that block's parameters.

``mode``: ``"inductor"`` / ``"aot_eager"`` / ``"eager"`` compile and run; ``"trace"``
(``explain``) builds the forward and backward graphs and runs nothing; ``"plan"`` (the
planning trace of ``example_inputs``) only stores the layouts.
"""
from __future__ import annotations

import functools
import itertools
import warnings
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
import torch.fx as fx

from tpcompile import compile_once
from tpcompile.errors import TPShardingError, TPWarning
from tpcompile.passes.graph_utils import value
from tpcompile.passes.placements import local_size
from tpcompile.passes.regional import inline_regions
from tpcompile.twin import state_ghost, state_ghost_register, state_of
from tpcompile.pipeline import Collective, GraphRecord, Options, collectives_of, communication_floor, tp_program

USER_MODES = ("inductor", "aot_eager", "eager")  # what a user's ``backend=`` may be
MODES = USER_MODES + ("trace", "plan")  # explain's (trace, run nothing) and the planning trace's


def _recording(record: GraphRecord, compile_one: Callable, on_graph: Callable | None = None) -> Callable:
    def inner(gm, example_inputs, *args, **kwargs):
        phase = "backward" if kwargs.get("is_backward", False) else "forward"
        record.compiled_graphs.append((phase, gm))
        record.collectives.extend(collectives_of(gm, phase, record.regions))
        if on_graph is not None:
            on_graph(record)
        return compile_one(gm, example_inputs, *args, **kwargs)

    return inner


def _compile(gm: fx.GraphModule, inputs: list, record: GraphRecord, mode: str, on_graph: Callable | None = None,
             stand_in: Callable | None = None, inductor_options: dict | None = None, group: str = ""):
    if mode == "inductor":
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        patches = dict(inductor_options or {})
        if record.regions:
            # torch 2.13's Inductor reuses a buffer across a reused region's calls in the backward:
            # gradients of every block but the last come out wrong (plain torch.compile of a GPT with
            # nested_compile_region blocks, 3 layers: off by 133 on a gradient of 0.15). Not reusing
            # buffers gives them right (tests/test_parity.py checks every gradient regionally under Inductor at TP=4).
            patches["allow_buffer_reuse"] = False
        inner = compile_once.in_turn(group, compile_fx_inner)  # one rank of the host compiles, the others read its cache
        return compile_fx(gm, inputs, inner_compile=_recording(record, inner, on_graph),
                          config_patches=patches or None)
    if mode in ("aot_eager", "trace"):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        rec = _recording(record, lambda g, ex, *a, **k: make_boxed_func(g.forward), on_graph)
        compiled = aot_autograd(fw_compiler=rec, bw_compiler=functools.partial(rec, is_backward=True))
        if mode == "aot_eager":
            return compiled(gm, inputs)
        # "trace" (explain): build the real forward and backward graphs now, run nothing.
        with torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
            compiled(gm, inputs)
        return stand_in
    if mode == "eager":
        # run eagerly, the rewritten regions inline: torch 2.13's eager invoke_subgraph cannot run its
        # backward outside a fake mode ("fake_mode should be enabled for HOPs": a tp_compile(backend="eager")
        # model's first backward raised); inlined, the graph is the whole-graph rewrite (same numbers)
        inline_regions(gm)
        return gm.forward
    raise ValueError(f"tp_compile(backend={mode!r}): use 'inductor', 'aot_eager' or 'eager'")


def output_zeros(gm: fx.GraphModule) -> Callable:
    """A stand-in for ``gm`` returning zeros of its outputs' logical shapes, computing nothing.

    Call it on the captured graph (before the passes): the values Dynamo recorded there are
    what the rank's program returns, so code after a graph break still traces. A dynamic graph's
    output sizes are expressions of its inputs' sizes: they are evaluated on each call's inputs.
    """
    out = next(n for n in gm.graph.nodes if n.op == "output")
    vals = torch.utils._pytree.tree_map(lambda n: value(n) if isinstance(n, fx.Node) else n, out.args[0])
    inputs = [value(n) for n in gm.graph.nodes if n.op == "placeholder"]

    def bindings(args) -> dict:
        known = {}
        for v, a in zip(inputs, args):
            if isinstance(v, torch.SymInt):
                known[v.node.expr] = int(a)
            elif isinstance(v, torch.Tensor) and isinstance(a, torch.Tensor):
                for s, n in zip(v.shape, a.shape):
                    if isinstance(s, torch.SymInt) and s.node.expr.is_Symbol:
                        known[s.node.expr] = int(n)
        return known

    def size(s, known: dict) -> int:
        return int(s.node.expr.xreplace(known)) if isinstance(s, torch.SymInt) else s

    def zeros(v, known: dict):
        if not isinstance(v, torch.Tensor):
            return size(v, known) if isinstance(v, torch.SymInt) else v
        return torch.zeros([size(s, known) for s in v.shape], dtype=v.dtype, device=v.device)

    def stand_in(*args):
        known = bindings(args)
        return torch.utils._pytree.tree_map(lambda v: zeros(v, known), vals)

    return stand_in


@dataclass
class Recorder:
    """What a model's backends did: one record per captured graph, and how many rewritten graphs ran
    (a call that runs none ran eagerly). ``dump_dir``: write each record there as it fills."""

    rank: int = 0
    dump_dir: str | None = None
    records: list[GraphRecord] = field(default_factory=list)
    calls: int = 0

    def add(self, record: GraphRecord) -> Callable | None:
        self.records.append(record)
        if not self.dump_dir:
            return None
        from tpcompile.dump import dump_record

        on_graph = functools.partial(dump_record, directory=self.dump_dir, rank=self.rank, index=len(self.records) - 1)
        on_graph(record)
        return on_graph


def outputs_as_dtensors(outputs: Any, sharded: dict, mesh, rank: int, tp: int) -> list:
    """A graph's flat outputs with those kept sharded (``{index: (dim, full size)}``) as DTensors.

    A vocabulary padded to ``ceil(V / tp)`` rows per rank is cut back to DTensor's uneven
    split (``torch.chunk``'s sizes), which is the same layout without the padding.
    """
    from torch.distributed.tensor import DTensor, Shard

    outputs = list(outputs)
    for i, (dim, full) in sharded.items():
        t = outputs[i]
        n = local_size(full, tp)
        real = max(0, min(n, full - rank * n))
        if real != t.shape[dim]:
            t = t.narrow(dim, 0, real)
        shape = t.shape[:dim] + (full,) + t.shape[dim + 1:]
        outputs[i] = DTensor.from_local(t, mesh, [Shard(dim)], run_check=False, shape=shape,
                                        stride=torch.empty(shape, device="meta").stride())
    return outputs


class Backend:
    """Dynamo backend of one tp-compiled model: ``twin`` says which inputs are ghosts (of which
    parameter), ``params`` stores and binds the parameters, ``options`` are the pipeline's (the
    user's overrides; parameters already stored keep their layout), ``recorder`` gets the records."""

    def __init__(self, twin, params, options: Options, mode: str, recorder: Recorder, *,
                 inductor_options: dict | None = None, mesh=None):
        if mode not in MODES:
            raise ValueError(f"tp_compile(backend={mode!r}): use 'inductor', 'aot_eager' or 'eager'")
        self.twin, self.params, self.options, self.mode, self.recorder = twin, params, options, mode, recorder
        self.inductor_options, self.mesh = inductor_options, mesh
        self._key = next(_KEYS)
        _LIVE[self._key] = self

    # A library that wraps torch.compile may copy its keyword arguments (Lightning, imported by litgpt,
    # deep-copies them). A copy of this backend would plan into copies of the model's parameters and
    # group, so copies keep identity, as a backend function of torch's own does.
    def __copy__(self) -> "Backend":
        return self

    def __deepcopy__(self, memo: dict) -> "Backend":
        return self

    def __reduce__(self):
        return _live_backend, (self._key,)

    def options_for(self, fqns) -> Options:
        """The pipeline's options for one graph: the layouts already stored, and whether to fuse the
        norms (``fuse_norm=None``: when captured under ``no_grad``; Dynamo guards on grad mode, so a
        call with gradients gets a graph of its own, unfused unless ``fuse_norm=True``)."""
        grad = torch.is_grad_enabled()
        fuse = (not grad) if self.options.fuse_norm is None else self.options.fuse_norm
        return replace(self.options, fuse_norm=fuse, needs_backward=grad,
                       known={f: self.params.layouts[f] for f in fqns if f in self.params.layouts})

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        mode, twin, params, rec = self.mode, self.twin, self.params, self.recorder
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        param_fqns = {i: twin.fqn_of[id(ex)] for i, ex in enumerate(example_inputs) if id(ex) in twin.fqn_of}
        names = {n.name: twin.names[id(ex)] for n, ex in zip(placeholders, example_inputs) if id(ex) in twin.names}
        stand_in = output_zeros(gm) if mode in ("trace", "plan") else None
        state_in = {i: st[1] for i, ex in enumerate(example_inputs) if (st := state_of(ex)) is not None}
        options = self.options_for(param_fqns.values())
        with warnings.catch_warnings():
            if options.tp == 1 and mode != "plan" and not (options.sharded_outputs or options.rewrite_one_rank):
                # one rank runs torch.compile's graph: the plan's fallbacks (kept in the record) cost nothing
                warnings.simplefilter("ignore", TPWarning)
            program = tp_program(gm, param_fqns, options, names, plan_only=mode == "plan", state=state_in)
        for lay in program.layouts.values():
            params.apply(lay)
        index = list(program.layouts)
        layouts = tuple(program.layouts[i] for i in index)
        fqn_of = twin.fqn_of
        if mode == "plan":
            def plan_only(*args):  # a reused frame (another block) plans that block's parameters the same way
                params.program_locals([fqn_of[id(args[i])] for i in index], layouts, bind=False)
                return stand_in(*args)

            return plan_only
        record = program.record
        on_graph = rec.add(record)
        inputs = list(example_inputs)
        fake_mode = torch._guards.detect_fake_mode(example_inputs)
        for i, t in zip(index, params.examples([param_fqns[i] for i in index], layouts)):
            # fakify the local shard ourselves, with static shapes: left to AOTAutograd it gets
            # fresh symbols with no source, and a shape guard on one of them fails to build
            inputs[i] = fake_mode.from_tensor(t, static_shapes=True) if fake_mode is not None else t
        adopted = {i: p for i, p in program.adopted.items() if i not in state_in}
        for i, p in {**state_in, **adopted}.items():  # a KV cache shard: the logical sizes (symbolic kept), its dim cut
            inputs[i] = _local_like(value(placeholders[i]), p, self.options.tp, fake_mode)
        try:
            compiled = _compile(gm, inputs, record, mode, on_graph, stand_in, self.inductor_options, self.options.group_name)
        except torch._dynamo.exc.RestartAnalysis:
            # Dynamo traces the frame again (AOTAutograd's ``tensorify_python_scalars`` specialises a
            # float under ``dynamic=True``): this graph is never run, the next one replaces it
            rec.records.remove(record)
            raise
        sharded, opts, mesh = program.sharded_outputs, self.options, self.mesh
        state_out = program.state_outputs

        def run(*args):
            rec.calls += 1
            args = list(args)
            for i, t in zip(index, params.program_locals([fqn_of[id(args[i])] for i in index], layouts)):
                args[i] = t
            for i in state_in:
                args[i] = _state_local(args[i], state_in[i])
            for i, p in adopted.items():  # a module buffer written with sharded values: held as its shard
                args[i] = _adopt(args[i], p, opts.rank, opts.tp)
            out = compiled(*args)
            if state_out:
                out = list(out)
                for i, (p, _) in state_out.items():
                    shape = list(out[i].shape)
                    shape[p.dim] = state_out[i][1][p.dim]  # heads: static, the logical count
                    out[i] = state_ghost(out[i], tuple(shape), p)
            return outputs_as_dtensors(out, sharded, mesh, opts.rank, opts.tp) if sharded else out

        return run


def _local_like(fake, placement, tp: int, fake_mode):
    """A fake of this rank's shard of a state input whose logical fake (Dynamo's, symbolic sizes
    kept: a cache grows every token) is ``fake``."""
    sizes = list(fake.shape)
    sizes[placement.dim] = placement.local(sizes[placement.dim], tp)  # heads: static
    if fake_mode is None:
        return torch.empty(sizes, dtype=fake.dtype, device=fake.device)
    with fake_mode:
        return torch.empty(sizes, dtype=fake.dtype, device=fake.device)


def _state_local(t: torch.Tensor, placement) -> torch.Tensor:
    """The shard a state ghost stands for (contiguous: the layout the program was compiled for)."""
    st = state_of(t)
    if st is None or st[1] != placement:
        raise TPShardingError(
            f"tpcompile: a sharded state input (a KV cache, placement {placement}) was replaced by another tensor "
            f"({'a plain tensor' if st is None else st[1]}) between calls of a compiled graph. Pass back the cache "
            f"the model returned; rebuild it (reset the cache) to start over.")
    return st[0].contiguous()


def _adopt(t: torch.Tensor, placement, rank: int, tp: int) -> torch.Tensor:
    """This rank's shard of a module buffer (a hand-written KV cache) that the program writes with
    sharded values: the buffer object itself becomes a state ghost of the same shape (its whole
    memory is freed), so every later graph takes it back sharded."""
    st = state_of(t)
    if st is not None:
        return _state_local(t, placement)
    full = t.shape[placement.dim]
    local = t.detach().narrow(placement.dim, placement.start(full, rank, tp), placement.local(full, tp)).clone()
    shape = tuple(t.shape)
    ghost = state_ghost(local, shape, placement)
    with torch.no_grad():
        t.set_(ghost.untyped_storage(), 0, shape, [0] * len(shape))
    state_ghost_register(t, local, placement)
    return local


_KEYS = itertools.count()
_LIVE: "weakref.WeakValueDictionary[int, Backend]" = weakref.WeakValueDictionary()


def _live_backend(key: int) -> Backend:
    """Unpickling a backend gives the live one (pickle keeps identity, like a module-level function)."""
    b = _LIVE.get(key)
    if b is None:
        raise RuntimeError("a tpcompile backend is bound to the model and process that made it; it cannot be "
                           "unpickled in another process or after its model is gone. Call tp_compile there.")
    return b


def compile_twin(twin, params, options: Options, mode: str, recorder: Recorder, *, mesh=None,
                 compile_options: dict | None = None, inductor_options: dict | None = None) -> tuple[Callable, Callable]:
    """The twin's module compiled with a tpcompile backend, and how routed modules
    (``tpcompile.twin``) compile their regions: with a backend of the same kind."""
    compile_options = compile_options or {}

    def backend():
        return Backend(twin, params, options, mode, recorder, inductor_options=inductor_options, mesh=mesh)

    regions = backend()
    return (torch.compile(twin.module, backend=backend(), **compile_options),
            lambda fn: torch.compile(fn, backend=regions, **compile_options))


__all__ = ["Backend", "Recorder", "compile_twin", "outputs_as_dtensors", "GraphRecord", "Collective",
           "TPShardingError", "TPWarning", "collectives_of", "communication_floor", "output_zeros"]
