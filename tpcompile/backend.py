"""The torch.compile backend: captured graph -> passes -> one rank's program -> Inductor.

Dynamo traces a *twin* of the user's module whose parameters are memory-free ghosts of
their logical shapes (DESIGN.md §1), so the graph it hands us has logical shapes. We
normalize, plan, shard the real parameters in place (first time only), rewrite the graph
to local shapes and compile it. The returned callable swaps each ghost argument for the
rank's local shard, so gradients land in the user's own ``Parameter`` objects.
"""
from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from tpcompile.passes.graph_utils import source_line
from tpcompile.passes.normalize import normalize
from tpcompile.passes.plan import GraphPlan, ParamPlan, make_plan
from tpcompile.passes.propagate import TPShardingError
from tpcompile.passes.rewrite import rewrite

COLLECTIVES = {
    "all_reduce": "all_reduce",
    "all_gather_into_tensor": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "all_to_all_single": "all_to_all",
}


class TPWarning(UserWarning):
    """A part of the model stays replicated or needs an extra collective; the answer is still right."""


@dataclass
class Collective:
    kind: str  # all_reduce | all_gather | reduce_scatter | all_to_all
    phase: str  # forward | backward
    nbytes: int
    source: str


@dataclass
class GraphRecord:
    """What tpcompile did to one captured graph (one per Dynamo graph / recompile)."""

    plan: dict  # fqn -> ParamPlan
    original_code: str
    graph_code: str
    fallbacks: list  # messages
    rewrite_seconds: float
    collectives: list = field(default_factory=list)  # Collective, filled as AOT graphs compile
    compiled_graphs: list = field(default_factory=list)  # (phase, fx.GraphModule) Inductor / AOT compiled


def collectives_of(gm: fx.GraphModule, phase: str) -> list[Collective]:
    """The ``_c10d_functional`` collectives of a post-AOTAutograd graph, in order."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or getattr(n.target, "namespace", None) != "_c10d_functional":
            continue
        kind = COLLECTIVES.get(n.target._opname)
        if kind is None:
            continue
        val = n.meta.get("val")
        nbytes = val.numel() * val.element_size() if isinstance(val, torch.Tensor) and not _symbolic(val) else -1
        out.append(Collective(kind, phase, int(nbytes), source_line(n)))
    return out


def _op_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _symbolic(t: torch.Tensor) -> bool:
    return any(isinstance(s, torch.SymInt) for s in t.shape)


def _recording(record: GraphRecord, compile_one: Callable) -> Callable:
    def inner(gm, example_inputs, *args, **kwargs):
        phase = "backward" if kwargs.get("is_backward", False) else "forward"
        record.compiled_graphs.append((phase, gm))
        record.collectives.extend(collectives_of(gm, phase))
        return compile_one(gm, example_inputs, *args, **kwargs)

    return inner


def _compile(gm: fx.GraphModule, inputs: list, record: GraphRecord, inner: str):
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        return compile_fx(gm, inputs, inner_compile=_recording(record, compile_fx_inner))
    if inner == "aot_eager":
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        rec = _recording(record, lambda g, ex, *a, **k: make_boxed_func(g.forward))
        return aot_autograd(fw_compiler=rec, bw_compiler=functools.partial(rec, is_backward=True))(gm, inputs)
    if inner == "eager":
        return gm.forward
    raise ValueError(f"tp_compile(backend={inner!r}): use 'inductor', 'aot_eager' or 'eager'")


def shard_tensor(t: torch.Tensor, pp: ParamPlan, rank: int, tp: int) -> torch.Tensor:
    """This rank's slice of a full parameter, as a fresh tensor (the full one can be freed)."""
    if pp.style == "replicate":
        return t
    if pp.padded_shape is not None:  # a vocabulary tp does not divide: zero rows past the end
        n = pp.local_shape[pp.dim]
        pad = [0, 0] * (t.dim() - 1 - pp.dim) + [0, n * tp - t.shape[pp.dim]]
        return torch.nn.functional.pad(t, pad).narrow(pp.dim, rank * n, n).clone()
    pieces = t.chunk(pp.chunks, pp.dim)
    local = [p.narrow(pp.dim, rank * (p.shape[pp.dim] // tp), p.shape[pp.dim] // tp) for p in pieces]
    return torch.cat(local, pp.dim).clone() if len(local) > 1 else local[0].clone()


class Backend:
    """Dynamo backend bound to one ``TensorParallel`` state (group, params, plan so far)."""

    def __init__(self, state: Any):
        self.state = state

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        st = self.state
        t0 = time.perf_counter()
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        fqns, subs = {}, []
        for i, (node, ex) in enumerate(zip(placeholders, example_inputs)):
            real = st.real_of_ghost.get(id(ex))
            if real is not None:
                fqns[node] = st.fqn_of[id(real)]
                subs.append((i, real))
        original_code = gm.code
        normalize(gm, set(fqns))
        plan = make_plan(gm, st.tp, fqns, st.overrides)
        fallbacks = [self._warn_fallback(n, plan) for n in plan.prop.fallbacks]
        fallbacks += [self._warn_unsupported(n, mods) for n, mods in plan.unsupported.items()]
        for msg in plan.notes:
            warnings.warn(msg, TPWarning, stacklevel=2)
            fallbacks.append(msg)
        st.apply_plan(plan)
        rewrite(gm, plan, st.group_name, st.rank)
        record = GraphRecord(
            {pp.fqn: pp for pp in plan.params.values()}, original_code, gm.code, fallbacks, time.perf_counter() - t0
        )
        st.records.append(record)
        inputs = list(example_inputs)
        fake_mode = torch._guards.detect_fake_mode(example_inputs)
        for i, real in subs:
            # fakify the local shard ourselves, with static shapes: left to AOTAutograd it gets
            # fresh symbols with no source, and a shape guard on one of them fails to build
            inputs[i] = fake_mode.from_tensor(real, static_shapes=True) if fake_mode is not None else real
        compiled = _compile(gm, inputs, record, st.inner_backend)

        def run(*args):
            args = list(args)
            for i, real in subs:
                args[i] = real
            return compiled(*args)

        return run

    @staticmethod
    def _warn_unsupported(node: fx.Node, modules: list) -> str:
        msg = (
            f"tpcompile: no tensor-parallel rule for `{_op_name(node)}` at {source_line(node)}; "
            f"{', '.join(sorted(set(modules)))} stay replicated (correct, but not sharded)."
        )
        warnings.warn(msg, TPWarning, stacklevel=2)
        return msg

    @staticmethod
    def _warn_fallback(node: fx.Node, plan: GraphPlan) -> str:
        ins = {x.name: plan.prop.info[x].out for x in plan.prop.info[node].need if x in plan.prop.info}
        msg = (
            f"tpcompile: no tensor-parallel rule for `{_op_name(node)}` at {source_line(node)} (inputs {ins}); "
            f"its inputs are made whole first (extra collective), so the result stays correct. "
            f"To avoid the collective, keep the projections around it replicated with plan={{...: 'replicate'}}."
        )
        warnings.warn(msg, TPWarning, stacklevel=2)
        return msg


__all__ = ["Backend", "GraphRecord", "Collective", "TPShardingError", "TPWarning", "collectives_of", "shard_tensor"]
