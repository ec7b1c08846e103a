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
from typing import Any, Callable

import torch
import torch.fx as fx

from tpcompile.errors import TPShardingError, TPWarning
from tpcompile.passes.graph_utils import value
from tpcompile.pipeline import Collective, GraphRecord, Options, collectives_of, communication_floor, tp_program

MODES = ("inductor", "aot_eager", "eager", "trace", "plan")


def _recording(record: GraphRecord, compile_one: Callable, on_graph: Callable | None = None) -> Callable:
    def inner(gm, example_inputs, *args, **kwargs):
        phase = "backward" if kwargs.get("is_backward", False) else "forward"
        record.compiled_graphs.append((phase, gm))
        record.collectives.extend(collectives_of(gm, phase))
        if on_graph is not None:
            on_graph(record)
        return compile_one(gm, example_inputs, *args, **kwargs)

    return inner


def _compile(gm: fx.GraphModule, inputs: list, record: GraphRecord, mode: str, on_graph: Callable | None = None,
             stand_in: Callable | None = None, inductor_options: dict | None = None):
    if mode == "inductor":
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        return compile_fx(gm, inputs, inner_compile=_recording(record, compile_fx_inner, on_graph),
                          config_patches=inductor_options or None)
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
        return gm.forward
    raise ValueError(f"tp_compile(backend={mode!r}): use 'inductor', 'aot_eager' or 'eager'")


def output_zeros(gm: fx.GraphModule) -> Callable:
    """A stand-in for ``gm`` returning zeros of its outputs' logical shapes, computing nothing.

    Call it on the captured graph (before the passes): the values Dynamo recorded there are
    what the rank's program returns, so code after a graph break still traces.
    """
    out = next(n for n in gm.graph.nodes if n.op == "output")
    vals = torch.utils._pytree.tree_map(lambda n: value(n) if isinstance(n, fx.Node) else n, out.args[0])

    def zeros(v):
        return torch.zeros(v.shape, dtype=v.dtype, device=v.device) if isinstance(v, torch.Tensor) else v

    return lambda *args: torch.utils._pytree.tree_map(zeros, vals)


class Backend:
    """Dynamo backend of one tp-compiled model. ``state`` gives the twin (ghost -> FQN), the
    parameters (layouts, binding), the pipeline options and where records go."""

    def __init__(self, state: Any, mode: str):
        if mode not in MODES:
            raise ValueError(f"tp_compile(backend={mode!r}): use 'inductor', 'aot_eager' or 'eager'")
        self.state, self.mode = state, mode

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        st, mode = self.state, self.mode
        twin, params = st.twin, st.params
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        param_fqns = {i: twin.fqn_of[id(ex)] for i, ex in enumerate(example_inputs) if id(ex) in twin.fqn_of}
        names = {n.name: twin.names[id(ex)] for n, ex in zip(placeholders, example_inputs) if id(ex) in twin.names}
        stand_in = output_zeros(gm) if mode in ("trace", "plan") else None
        program = tp_program(gm, param_fqns, st.options(param_fqns.values()), names, plan_only=mode == "plan")
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
        st.records.append(record)
        inputs = list(example_inputs)
        fake_mode = torch._guards.detect_fake_mode(example_inputs)
        for i, t in zip(index, params.examples([param_fqns[i] for i in index], layouts)):
            # fakify the local shard ourselves, with static shapes: left to AOTAutograd it gets
            # fresh symbols with no source, and a shape guard on one of them fails to build
            inputs[i] = fake_mode.from_tensor(t, static_shapes=True) if fake_mode is not None else t
        on_graph = functools.partial(st.dump, len(st.records) - 1) if st.dump_dir else None
        if on_graph:
            on_graph(record)
        compiled = _compile(gm, inputs, record, mode, on_graph, stand_in, st.inductor_options)
        sharded = program.sharded_outputs

        def run(*args):
            st.graph_calls += 1
            args = list(args)
            for i, t in zip(index, params.program_locals([fqn_of[id(args[i])] for i in index], layouts)):
                args[i] = t
            out = compiled(*args)
            return st.as_dtensors(out, sharded) if sharded else out

        return run


__all__ = ["Backend", "GraphRecord", "Collective", "TPShardingError", "TPWarning", "collectives_of",
           "communication_floor", "output_zeros"]
