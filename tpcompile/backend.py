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

from tpcompile.dump import readable_code
from tpcompile.passes.graph_utils import module_path, source_line, value
from tpcompile.passes.inline_checkpoint import inline_checkpoints
from tpcompile.passes.normalize import normalize
from tpcompile.passes.plan import GraphPlan, ParamPlan, make_plan
from tpcompile.passes.propagate import TPShardingError
from tpcompile.passes.rewrite import rewrite
from tpcompile.passes.sequence_parallel import floor_with_sp, sequence_parallel
from tpcompile.passes.sharded_outputs import keep_outputs_sharded

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
    source: str  # the user's file:line `code`
    module: str = ""  # FQN of the module it serves ("" = the top module)


@dataclass
class GraphRecord:
    """What tpcompile did to one captured graph (one per Dynamo graph / recompile)."""

    plan: dict  # fqn -> ParamPlan
    original_code: str
    graph_code: str
    fallbacks: list  # messages
    rewrite_seconds: float
    floor: dict  # phase -> {reason: count}: the fewest collectives this plan can need (DESIGN.md)
    names: dict  # placeholder name -> parameter / buffer FQN
    rewritten: fx.GraphModule | None = None
    collectives: list = field(default_factory=list)  # Collective, filled as AOT graphs compile
    compiled_graphs: list = field(default_factory=list)  # (phase, fx.GraphModule) Inductor / AOT compiled
    ends_at: str = ""  # the user's source line of the graph's last op (where a graph break, if any, is)
    exit_mappings: list = field(default_factory=list)  # mapping ops that make outputs whole at the graph's end


def collectives_of(gm: fx.GraphModule, phase: str) -> list[Collective]:
    """The ``_c10d_functional`` collectives of a post-AOTAutograd graph, in order."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or getattr(n.target, "namespace", None) != "_c10d_functional":
            continue
        kind = COLLECTIVES.get(n.target._opname)
        if kind is None:
            continue
        # nbytes: the whole buffer a collective reduces or gathers (a reduce-scatter's input), so
        # that an all-reduce of N bytes and its SP pair (all-gather + reduce-scatter) both read N
        val = (n.args[0] if kind == "reduce_scatter" else n).meta.get("val")
        nbytes = val.numel() * val.element_size() if isinstance(val, torch.Tensor) and not _symbolic(val) else -1
        out.append(Collective(kind, phase, int(nbytes), source_line(n), module_path(n)))
    return out


def _op_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _symbolic(t: torch.Tensor) -> bool:
    return any(isinstance(s, torch.SymInt) for s in t.shape)


def communication_floor(plan: GraphPlan) -> dict:
    """Megatron's minimum for this plan: per phase, how many collectives and why.

    Forward: one reduction per row-parallel linear and per vocab-parallel embedding, one
    collective per vocab-parallel loss. Backward: one reduction of the input gradient per
    distinct activation that feeds column-parallel linears (q, k, v share one).
    """
    kinds = [ni.kind for ni in plan.prop.info.values()]
    col_inputs = {n.args[0] for n, ni in plan.prop.info.items() if ni.kind == "colwise"}
    fwd = {"row-parallel linear": kinds.count("rowwise"), "vocab-parallel embedding": kinds.count("vocab"),
           "vocab-parallel loss": kinds.count("vocab_ce")}
    bwd = {"column-parallel input": len(col_inputs)}
    return {"forward": {k: v for k, v in fwd.items() if v}, "backward": {k: v for k, v in bwd.items() if v}}


def _recording(record: GraphRecord, compile_one: Callable, on_graph: Callable | None = None) -> Callable:
    def inner(gm, example_inputs, *args, **kwargs):
        phase = "backward" if kwargs.get("is_backward", False) else "forward"
        record.compiled_graphs.append((phase, gm))
        record.collectives.extend(collectives_of(gm, phase))
        if on_graph is not None:
            on_graph(record)
        return compile_one(gm, example_inputs, *args, **kwargs)

    return inner


def _compile(gm: fx.GraphModule, inputs: list, record: GraphRecord, inner: str, on_graph: Callable | None = None,
             stand_in: Callable | None = None):
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        return compile_fx(gm, inputs, inner_compile=_recording(record, compile_fx_inner, on_graph))
    if inner in ("aot_eager", "trace"):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        rec = _recording(record, lambda g, ex, *a, **k: make_boxed_func(g.forward), on_graph)
        compiled = aot_autograd(fw_compiler=rec, bw_compiler=functools.partial(rec, is_backward=True))
        if inner == "aot_eager":
            return compiled(gm, inputs)
        # "trace" (explain): build the real forward and backward graphs now, run nothing.
        with torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
            compiled(gm, inputs)
        return stand_in
    if inner == "eager":
        return gm.forward
    raise ValueError(f"tp_compile(backend={inner!r}): use 'inductor', 'aot_eager' or 'eager'")


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


def param_placeholders(state: Any, gm: fx.GraphModule, example_inputs: list) -> tuple[dict, list]:
    """Which placeholders of ``gm`` are parameters: ({node: FQN}, [(input index, real Parameter)])."""
    fqns, subs = {}, []
    for i, (node, ex) in enumerate(zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs)):
        real = state.real_of_ghost.get(id(ex))
        if real is not None:
            fqns[node] = state.fqn_of[id(real)]
            subs.append((i, real))
    return fqns, subs


def shard_tensor(t: torch.Tensor, pp: ParamPlan, rank: int, tp: int) -> torch.Tensor:
    """This rank's slice of a full parameter, as a fresh tensor (the full one can be freed)."""
    if pp.style == "replicate":
        return t
    if pp.padded_shape is not None:  # a vocabulary tp does not divide: zero rows past the end
        n = pp.local_shape[pp.dim]
        pad = [0, 0] * (t.dim() - 1 - pp.dim) + [0, n * tp - t.shape[pp.dim]]
        return torch.nn.functional.pad(t, pad).narrow(pp.dim, rank * n, n).clone()
    pieces = t.split(list(pp.pieces), pp.dim) if pp.pieces else t.chunk(pp.chunks, pp.dim)
    local = [p.narrow(pp.dim, rank * (p.shape[pp.dim] // tp), p.shape[pp.dim] // tp) for p in pieces]
    return torch.cat(local, pp.dim).clone() if len(local) > 1 else local[0].clone()


def plan_graph(gm: fx.GraphModule, fqns: dict, tp: int, overrides: dict) -> tuple[GraphPlan, list[str]]:
    """The graph passes before any sharding: inline checkpointed blocks, normalize, plan.

    Shared by the backend and checkpoint's planning-only trace, so that both plan the same
    graph. Returns the plan and warnings of the inlining (selective policies not honoured).
    """
    notes = [
        f"tpcompile: the selective activation checkpointing policy (context_fn) at {line} is not honoured: "
        f"the block is sharded and recomputed whole in the backward (correct; more compute than the policy "
        f"asks). Drop context_fn to silence this."
        for line, selective in inline_checkpoints(gm) if selective
    ]
    normalize(gm, set(fqns))
    return make_plan(gm, tp, fqns, overrides), notes


class Backend:
    """Dynamo backend bound to one ``TensorParallel`` state (group, params, plan so far)."""

    def __init__(self, state: Any):
        self.state = state

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        st = self.state
        t0 = time.perf_counter()
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        fqns, subs = param_placeholders(st, gm, example_inputs)
        stand_in = output_zeros(gm) if st.inner_backend == "trace" else None
        names = {n.name: st.name_of[id(ex)] for n, ex in zip(placeholders, example_inputs) if id(ex) in st.name_of}
        original_code = readable_code(gm.graph, names)
        plan, notes = plan_graph(gm, fqns, st.tp, st.overrides)
        fallbacks = [self._warn_fallback(n, plan) for n in plan.prop.fallbacks]
        fallbacks += [self._warn_unsupported(n, mods) for n, mods in plan.unsupported.items()]
        for msg in notes + plan.notes:
            warnings.warn(msg, TPWarning, stacklevel=2)
            fallbacks.append(msg)
        fallbacks += [self._warn_subgraph(n, fqns) for n in gm.graph.nodes
                      if n.op == "call_function" and isinstance(n.target, torch._ops.HigherOrderOperator)]
        st.apply_plan(plan)
        floor = communication_floor(plan)
        rewrite(gm, plan, st.group_name, st.rank)
        if st.sequence_parallel:
            sp = sequence_parallel(gm, st.group_name, st.tp, st.rank)
            floor = floor_with_sp(sp, floor["forward"].get("vocab-parallel loss", 0))
        sharded = keep_outputs_sharded(gm) if st.sharded_outputs else {}
        record = GraphRecord(
            {pp.fqn: pp for pp in plan.params.values()}, original_code, readable_code(gm.graph, names), fallbacks,
            time.perf_counter() - t0, floor, names, gm,
        )
        out_node = next(n for n in gm.graph.nodes if n.op == "output")
        record.exit_mappings = [n.meta["tp_mapping"] for n in out_node.all_input_nodes if "tp_mapping" in n.meta]
        last = [n for n in gm.graph.nodes if n.op == "call_function" and n.meta.get("stack_trace")]
        record.ends_at = source_line(last[-1]) if last else ""
        st.records.append(record)
        subs = [(i, st.local_param(st.fqn_of[id(real)])) for i, real in subs]
        inputs = list(example_inputs)
        fake_mode = torch._guards.detect_fake_mode(example_inputs)
        for i, real in subs:
            # fakify the local shard ourselves, with static shapes: left to AOTAutograd it gets
            # fresh symbols with no source, and a shape guard on one of them fails to build
            inputs[i] = fake_mode.from_tensor(real, static_shapes=True) if fake_mode is not None else real
        on_graph = functools.partial(st.dump, len(st.records) - 1) if st.dump_dir else None
        if on_graph:
            on_graph(record)
        compiled = _compile(gm, inputs, record, st.inner_backend, on_graph, stand_in)

        def run(*args):
            st.graph_calls += 1
            args = list(args)
            for i, real in subs:
                args[i] = real
            out = compiled(*args)
            return st.as_dtensors(out, sharded) if sharded else out

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
    def _warn_subgraph(node: fx.Node, fqns: dict) -> str:
        """A higher-order op other than a checkpointed block (inlined by ``inline_checkpoints``) runs
        its own subgraph, which the passes do not rewrite: it computes on whole values with
        replicated parameters."""
        inside = [fqns[x] for x in node.all_input_nodes if x in fqns]
        shown = ", ".join(inside[:3]) + (", ..." if len(inside) > 3 else "")
        msg = (
            f"tpcompile: `{_op_name(node)}` at {source_line(node)} runs a subgraph that is not rewritten "
            f"(only activation-checkpointed blocks are); its {len(inside)} parameters ({shown}) stay replicated "
            f"(correct, but not sharded)."
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


__all__ = [
    "Backend", "GraphRecord", "Collective", "TPShardingError", "TPWarning", "collectives_of", "communication_floor",
    "shard_tensor",
]
