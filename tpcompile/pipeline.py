"""The one pipeline: a captured graph and its parameters' names in, one rank's program and a record out.

    program = tp_program(gm, param_fqns, options)

Pure: it reads nothing but its arguments and touches no parameter. The Dynamo backend
(``tp_compile``), ``explain`` and the planning trace (``example_inputs``) all call it; what
they do with the result (compile it, trace it, or only store the layouts) is theirs.
"""
from __future__ import annotations

import copy
import re
import time
import warnings
from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx

from tpcompile.dump import readable_code
from tpcompile.errors import TPWarning
from tpcompile.passes.graph_utils import module_path, op_name, source_line, value
from tpcompile.passes.fused_norm import FUSED_OP, fuse_norms
from tpcompile.passes.inline_checkpoint import CHECKPOINT, inline_checkpoints
from tpcompile.passes.layout import ParamPlan
from tpcompile.passes.normalize import normalize
from tpcompile.passes.placements import Partial, Shard
from tpcompile.passes.plan import GraphPlan, _style_for_fqn, make_plan
from tpcompile.passes.propagate import draws_random
from tpcompile.passes.regional import block_prefixes, body_of, inline_regions, is_region, operands, region_calls
from tpcompile.passes.rewrite import broadcast_cut, kv_copy_key, rewrite, token_source, whole_grad_inputs
from tpcompile.passes.sequence_parallel import floor_with_sp, sequence_parallel
from tpcompile.passes.sharded_outputs import keep_outputs_sharded, keep_state_sharded

COLLECTIVES = {
    "all_reduce": "all_reduce",
    "all_gather_into_tensor": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "all_to_all_single": "all_to_all",
}


@dataclass(frozen=True)
class Options:
    """What the rewrite depends on besides the graph: the group and the user's choices."""

    tp: int
    rank: int
    group_name: str
    overrides: dict = field(default_factory=dict)
    sequence_parallel: bool = False
    expert_parallel: bool = False  # MoE experts held whole, E / tp per rank (plan style "expert")
    sharded_outputs: bool = False
    regional: bool = False  # plan a repeated block's region (invoke_subgraph) once for every layer
    rewrite_one_rank: bool = False  # keep the TP program at tp=1 (TPCOMPILE_TP1_REWRITE=1: one-GPU checks)
    known: dict = field(default_factory=dict)  # FQN -> ParamPlan already stored (an earlier graph's)
    # fuse each row-parallel reduction + residual add + RMSNorm into one op (passes/fused_norm.py).
    # None: decided per graph by the backend (on when captured under no_grad)
    fuse_norm: bool | None = None
    needs_backward: bool = True  # the graph will be differentiated (captured with gradients enabled)


@dataclass
class Collective:
    kind: str  # all_reduce | all_gather | reduce_scatter | all_to_all
    phase: str  # forward | backward
    nbytes: int
    source: str  # the user's file:line `code`
    module: str = ""  # FQN of the module it serves ("" = the top module)
    fused: str = ""  # the fused op it runs inside ("reduce_add_rms_norm"), "" for a plain collective


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
    regions: dict = field(default_factory=dict)  # subgraph name -> block prefix per call, planned once for all
    fused_norms: list = field(default_factory=list)  # passes.fused_norm.FusedNorm, one per fused reduction
    inference: bool = False  # captured under no_grad: no backward graph
    returned_bytes: int = 0  # bytes of sharded outputs gathered whole at the end (-1: symbolic sizes)


@dataclass
class Program:
    """One rank's program for a captured graph, and what it takes."""

    gm: fx.GraphModule  # rewritten in place (or only planned, for ``plan_only``)
    record: GraphRecord
    layouts: dict[int, ParamPlan]  # placeholder index -> layout of the parameter it takes
    sharded_outputs: dict = field(default_factory=dict)  # output index -> (dim, full size), kept sharded
    state_outputs: dict = field(default_factory=dict)  # output index -> (placement, logical shape): a KV cache
    adopted: dict = field(default_factory=dict)  # placeholder index -> placement: a module buffer held sharded


def collectives_of(gm: fx.GraphModule, phase: str, prefixes: dict | None = None) -> list[Collective]:
    """The ``_c10d_functional`` collectives of a post-AOTAutograd graph, in order; a region's
    (``invoke_subgraph``) once per call. ``prefixes``: subgraph identifier -> block prefix of each
    call in forward order (``GraphRecord.regions``), so a collective of the region names the
    layer it ran for (the body was traced from the first block)."""
    out = []
    seen: dict = {}
    for n in gm.graph.nodes:
        if is_region(n):
            body = getattr(gm, n.args[0].target)
            inner = collectives_of(body, phase, prefixes)
            sites = _sites(n.args[1], prefixes or {})
            if sites:
                k = seen[n.args[1]] = seen.get(n.args[1], -1) + 1
                at = sites[k if phase == "forward" else len(sites) - 1 - k] if k < len(sites) else sites[0]
                inner = [replace(c, module=_rebase(c.module, sites[0], at)) for c in inner]
            out += inner
        if n.op == "call_function" and n.target is FUSED_OP:  # its collectives run inside the op
            out += _fused_collectives(n, phase)
            continue
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


def _sites(identifier: str, prefixes: dict) -> list:
    """The call prefixes of the region an AOT graph's ``invoke_subgraph`` identifier stands for
    (AOTAutograd names them after Dynamo's subgraph: ``___forward_subgraph_0_post_graph``, ...)."""
    for name, sites in prefixes.items():
        if re.search(rf"(^|_){re.escape(name)}(_|$)", identifier):
            return sites
    return []


def _rebase(module: str, first: str, at: str) -> str:
    """``module`` of the first block (``first``: ``"h.0."``) as the same module of block ``at``; the
    block itself (``"h.0"``, a collective at its residual add) too."""
    if not first or not (module + ".").startswith(first):
        return module
    return (at + module[len(first):]) if len(module) >= len(first) else at.rstrip(".")


def _fused_collectives(n: fx.Node, phase: str) -> list[Collective]:
    """The all-reduce (no SP) or reduce-scatter + all-gather (SP) of a ``reduce_add_rms_norm`` node."""
    partial, sp_dim = n.args[0].meta.get("val"), n.args[4]
    normed = n.meta.get("val")[0] if isinstance(n.meta.get("val"), (tuple, list)) else None

    def nbytes(t):
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) and not _symbolic(t) else -1

    kinds = [("all_reduce", partial)] if sp_dim is None else [("reduce_scatter", partial), ("all_gather", normed)]
    return [Collective(k, phase, int(nbytes(t)), source_line(n), module_path(n), fused="reduce_add_rms_norm")
            for k, t in kinds]


def _symbolic(t: torch.Tensor) -> bool:
    return any(isinstance(s, torch.SymInt) for s in t.shape)


def communication_floor(plan: GraphPlan) -> dict:
    """Megatron's minimum for this plan: per phase, how many collectives and why.

    Forward: one reduction per row-parallel linear and per vocab-parallel embedding, one
    collective per vocab-parallel loss, one per MoE layer after its weighted combine. Backward: one
    reduction of the input gradient per distinct activation that feeds column-parallel linears
    (q, k, v share one; experts count the tokens before dispatch), one of the gradient of each
    replicated weight that kv-head copies are taken from (``kv_copy_weights``), and one per whole
    value that scales a pending sum (MoE routing weights, a shared expert's gate: each rank's
    summand gives a summand of their gradient), and one per whole value broadcast into a shard
    (``rewrite.broadcast_cut``).
    """
    kinds = [ni.kind for ni in plan.prop.info.values()]
    col_inputs = {(token_source(n.args[0])[1] if ni.extra.get("grouped") or ni.kind == "expert_dispatch" else n.args[0])
                  for n, ni in plan.prop.info.items() if ni.kind in ("colwise", "kvcopy", "expert_dispatch")}
    pending = sum(1 for ni in plan.prop.info.values() if ni.kind == "rowwise" and ni.extra.get("pending"))
    fwd = {"row-parallel linear": kinds.count("rowwise") - pending, "vocab-parallel embedding": kinds.count("vocab"),
           "vocab-parallel loss": kinds.count("vocab_ce"),
           "expert combine": kinds.count("expert_rowwise") + kinds.count("expert_combine"),
           "vocab-parallel selection": kinds.count("vocab_select")}
    if plan.inference:  # captured under no_grad: no backward graph, no backward collective
        return {"forward": {k: v for k, v in fwd.items() if v}, "backward": {}}
    # whole values scaling a pending sum (MoE routing weights, a shared expert's gate): summands of their gradient
    scales = {x for n, ni in plan.prop.info.items() if isinstance(ni.out, Partial) for x in whole_grad_inputs(n, ni)}
    # whole values broadcast into a shard (MLA's rotary key beside head-sharded keys): f on the source
    broadcasts = {x.args[0] for n, ni in plan.prop.info.items() for x, need in ni.need.items()
                  if broadcast_cut(x, plan.prop.placement(x), need) and getattr(value(x), "requires_grad", False)}
    bwd = {"column-parallel input": len(col_inputs), "kv-copy weight gradient": kv_copy_weights(plan),
           "scale of a pending sum": len(scales), "broadcast into a shard": len(broadcasts)}
    return {"forward": {k: v for k, v in fwd.items() if v}, "backward": {k: v for k, v in bwd.items() if v}}


_EXIT_GATHERS = ("gather_from_tp", "gather_padded_from_tp", "gather_pieces_from_tp")


def returned_whole(gm: fx.GraphModule) -> list[fx.Node]:
    """The gathers that make outputs of a rewritten graph whole at its end (the LM head's logits that HF
    ``generate()`` reads at decode; not a KV cache, kept sharded): one all-gather each."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return [n for n in out.all_input_nodes if n.meta.get("tp_mapping") in _EXIT_GATHERS]


def _whole_bytes(nodes: list) -> int:
    """Bytes of the (logical, whole) values of ``nodes``; -1 if any size is symbolic."""
    vals = [value(n) for n in nodes]
    if any(not isinstance(v, torch.Tensor) or _symbolic(v) for v in vals):
        return -1
    return sum(v.numel() * v.element_size() for v in vals)


def kv_copy_weights(plan: GraphPlan) -> int:
    """Groups (``rewrite.kv_copy_key``: the k / v weights and biases of one attention) of replicated values
    needing a gradient that kv-head copies are taken from: one backward all-reduce each."""
    groups = {kv_copy_key(n, ni) for n, ni in plan.prop.info.items() for x, need in ni.need.items()
              if isinstance(need, Shard) and need.copies and not isinstance(plan.prop.placement(x), Shard)
              and getattr(value(x), "requires_grad", False)}
    return len(groups)


def plan_graph(gm: fx.GraphModule, fqns: dict, tp: int, overrides: dict,
               known: dict | None = None, buffers: set | None = None,
               state: dict | None = None, inference: bool = False,
               expert_parallel: bool = False, outputs_sharded: bool = False) -> tuple[GraphPlan, list[str]]:
    """The graph passes before any sharding: inline checkpointed blocks, normalize, plan.
    ``buffers``: the placeholders that are module buffers (state, not the user's inputs);
    ``state``: placeholder -> placement of sharded state inputs (a KV cache an earlier graph returned).

    Returns the plan and warnings of the inlining (selective policies not honoured).
    """
    notes = [
        f"tpcompile: the selective activation checkpointing policy (context_fn) at {line} is not honoured: "
        f"the block is sharded and recomputed whole in the backward (correct; more compute than the policy "
        f"asks). Drop context_fn to silence this."
        for line, selective in inline_checkpoints(gm) if selective
    ]
    normalize(gm, set(fqns))
    return make_plan(gm, tp, fqns, overrides, known, buffers, state, inference, expert_parallel,
                     outputs_sharded), notes


def tp_program(gm: fx.GraphModule, param_fqns: dict[int, str], options: Options, names: dict[str, str] | None = None,
               plan_only: bool = False, state: dict | None = None) -> Program:
    """Plan ``gm`` (placeholder index -> parameter FQN in ``param_fqns``) and, unless ``plan_only``,
    rewrite it in place into the program of every rank (no constant of it depends on the rank).
    Warns (``TPWarning``) for every part left replicated or made whole. ``state``: placeholder index -> placement of the sharded state
    (KV cache) inputs; outputs that grow it stay sharded (``Program.state_outputs``)."""
    t0 = time.perf_counter()
    names = names or {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for n in gm.graph.nodes:  # a block region inside a checkpointed call: traced whole, recomputed by the checkpoint
        if n.target is CHECKPOINT and isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr":
            inline_regions(getattr(gm, n.args[0].target))  # (the fuzzer: kept, it was silently off single device)
    regions = _regions(gm, placeholders, param_fqns, options, names, plan_only)
    param_fqns = {i: f for i, f in param_fqns.items() if i not in regions.layouts}
    fqns = {placeholders[i]: f for i, f in param_fqns.items()}
    original_code = readable_code(gm.graph, names)
    buffers = {n for n in placeholders if n.name in names and n not in fqns}
    state_nodes = {placeholders[i]: p for i, p in (state or {}).items()}
    plan, notes = plan_graph(gm, fqns, options.tp, options.overrides, options.known, buffers, state_nodes,
                             inference=not options.needs_backward, expert_parallel=options.expert_parallel,
                             outputs_sharded=options.sharded_outputs)
    layouts = {i: plan.params[placeholders[i]] for i in param_fqns}
    fallbacks = [_warn_fallback(n, plan) for n in plan.prop.fallbacks]
    fallbacks += [_warn_unsupported(n, mods) for n, mods in plan.unsupported.items()]
    for msg in notes + plan.notes:
        warnings.warn(msg, TPWarning, stacklevel=2)
        fallbacks.append(msg)
    fallbacks += [_warn_subgraph(n, fqns) for n in gm.graph.nodes
                  if n.op == "call_function" and isinstance(n.target, torch._ops.HigherOrderOperator)
                  and not is_region(n)]
    rewritten = not plan_only and (options.tp > 1 or options.sharded_outputs or options.rewrite_one_rank)
    floor = _add_floors(communication_floor(plan), regions.floors) if rewritten or plan_only \
        else {"forward": {}, "backward": {}}
    sharded: dict = {}
    returned: list = []
    fused: list = []
    kept_state: dict = {}
    # one rank: every shard is the whole tensor and every mapping op an identity, so the captured
    # graph is the program (torch.compile's); sharded_outputs keeps the rewrite for its DTensor outputs,
    # and TPCOMPILE_TP1_REWRITE=1 keeps it to check the TP program on one GPU (make gpu-check)
    if rewritten:
        rewrite(gm, plan, options.group_name)
        kept_state = keep_state_sharded(gm, set(state_nodes), plan.prop.info)
        if options.sequence_parallel:
            sp = sequence_parallel(gm, options.group_name, options.tp)
            for msg in ([sp.skipped] if sp.skipped else []) + sp.dispatch_warnings:
                warnings.warn(msg, TPWarning, stacklevel=2)
                fallbacks.append(msg)
            if not sp.skipped:
                selections = floor["forward"].get("vocab-parallel selection", 0)
                floor = floor_with_sp(sp, floor["forward"].get("vocab-parallel loss", 0), kv_copy_weights(plan))
                if selections:
                    floor["forward"]["vocab-parallel selection"] = selections
                if plan.inference:
                    floor["backward"] = {}
        fused = fuse_norms(gm, options.group_name, options.needs_backward) if options.fuse_norm else []
        sharded = keep_outputs_sharded(gm) if options.sharded_outputs else {}
        returned = returned_whole(gm) if plan.inference else []
        if returned:
            floor["forward"]["sharded output returned whole"] = len(returned)
    record = GraphRecord(
        {pp.fqn: pp for pp in plan.params.values()}, original_code, readable_code(gm.graph, names), fallbacks,
        time.perf_counter() - t0, floor, names, gm,
    )
    layouts.update(regions.layouts)
    record.plan.update(regions.plan)
    record.fallbacks[:0] = regions.fallbacks
    record.graph_code += regions.code
    record.regions = regions.calls
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    record.fused_norms = fused
    record.inference, record.returned_bytes = plan.inference, _whole_bytes(returned)
    record.exit_mappings = [n.meta["tp_mapping"] for n in out_node.all_input_nodes if "tp_mapping" in n.meta]
    last = [n for n in gm.graph.nodes if n.op == "call_function" and n.meta.get("stack_trace")]
    record.ends_at = source_line(last[-1]) if last else ""
    adopted = {i: plan.prop.info[n].out for i, n in enumerate(placeholders)
               if n in plan.prop.info and plan.prop.info[n].kind == "shard_buffer"}
    return Program(gm, record, layouts, sharded, kept_state, adopted)


@dataclass
class Regions:
    """What the regions of a graph contribute to its program: the layouts of the outer placeholders
    that feed them (every layer's parameters), their plan, floors, code and fallbacks."""

    layouts: dict = field(default_factory=dict)  # outer placeholder index -> ParamPlan
    plan: dict = field(default_factory=dict)  # fqn -> ParamPlan, every call site's
    floors: list = field(default_factory=list)  # (floor of one call, number of calls)
    fallbacks: list = field(default_factory=list)
    code: str = ""
    calls: dict = field(default_factory=dict)  # subgraph name -> block prefix of each call ("h.0.", ...)


def _regions(gm: fx.GraphModule, placeholders: list, param_fqns: dict, options: Options, names: dict,
             plan_only: bool) -> Regions:
    """Plan and rewrite each repeated block's subgraph once, for all its call sites; inline the
    ones that cannot be (``passes/regional.py`` says when).

    A region is kept only when the block is a TP region of its own: its outputs come back
    replicated (no mapping at the end of the subgraph), its parameters feed nothing but its
    calls, every call site has the same overrides and any layout already stored for a call's
    parameters is the first call's. Otherwise (or with sequence parallelism, where the
    residual stream between blocks is sharded over tokens, or with fused norms, which fuse a block's
    last reduction with the next block's norm) the calls are inlined and the graph is planned whole,
    as without regions: the same plan, collectives and numbers either way."""
    out = Regions()
    calls = region_calls(gm)
    if not calls:
        return out
    # one rank: torch.compile. Fused norms: a block's last reduction fuses with the residual add and
    # the *next* block's norm (passes/fused_norm.py), across the region's boundary
    keep = options.regional and not options.sequence_parallel and options.tp > 1 and not options.fuse_norm
    index = {n: i for i, n in enumerate(placeholders)}
    for name, sites in calls.items():
        site_fqns = [{j: param_fqns[index[a]] for j, a in enumerate(operands(c))
                      if isinstance(a, fx.Node) and index.get(a) in param_fqns} for c in sites]
        own = all(all(is_region(u) for u in a.users) for c in sites for a in operands(c)
                  if isinstance(a, fx.Node) and index.get(a) in param_fqns)
        # an operand computed from a parameter outside the region (Dynamo hoists a view of it, Falcon's
        # ``self.weight.T``, out of the region): the body would see an activation where the whole graph sees the parameter
        own = own and not any(isinstance(a, fx.Node) and a.op != "placeholder" and a.args
                              and index.get(a.args[0]) in param_fqns for c in sites for a in operands(c))
        same = all(f.keys() == site_fqns[0].keys() and
                   all(_style_for_fqn(f[j], options.overrides) == _style_for_fqn(site_fqns[0][j], options.overrides)
                       for j in f) for f in site_fqns)
        prefixes = block_prefixes([list(f.values()) for f in site_fqns])
        rebase = {c: (prefixes[0], at) for c, at in zip(sites, prefixes)}
        # a block that draws random numbers (dropout in training): one program reused per layer would
        # need Inductor's RNG to give every call its own draws (propagate.draws_random)
        rng = any(draws_random(n) for m in body_of(gm, sites[0]).modules() if isinstance(m, fx.GraphModule)
                  for n in m.graph.nodes)
        # called once (blocks of one class that trace apart): nothing to reuse
        if not (keep and own and same) or rng or len(sites) < 2:
            inline_regions(gm, {name}, rebase)
            continue
        body = body_of(gm, sites[0])
        backup = fx.GraphModule(body, copy.deepcopy(body.graph))
        sub_ph = [p for p in body.graph.nodes if p.op == "placeholder"]
        sub_names = {p.name: names[a.name] for p, a in zip(sub_ph, operands(sites[0]))
                     if isinstance(a, fx.Node) and a.name in names}
        sub = tp_program(body, site_fqns[0], replace(options, sharded_outputs=False), sub_names, plan_only)
        site_layouts = [{j: replace(sub.layouts[j], fqn=f[j]) for j in f} for f in site_fqns]
        stored_elsewhere = any(f in options.known and options.known[f] != lay for s in site_layouts
                               for f, lay in ((lay.fqn, lay) for lay in s.values()))
        if sub.record.exit_mappings or stored_elsewhere or sub.sharded_outputs:
            setattr(gm, name, backup)
            inline_regions(gm, {name}, rebase)
            continue
        for c, lays in zip(sites, site_layouts):
            for j, lay in lays.items():
                out.layouts[index[operands(c)[j]]] = lay
                out.plan[lay.fqn] = lay
        out.floors.append((sub.record.floor, len(sites)))
        out.fallbacks += sub.record.fallbacks
        for at in prefixes[1:]:  # warned once, for the first block: each other layer's, as the whole graph warns
            for msg in sub.record.fallbacks:
                msg = msg.replace(prefixes[0], at)
                warnings.warn(msg, TPWarning, stacklevel=3)
                out.fallbacks.append(msg)
        out.calls[name] = prefixes
        out.code += f"\n# {name}: one block, called {len(sites)} times\n" + sub.record.graph_code
    return out


def _add_floors(floor: dict, more: list) -> dict:
    out = {phase: dict(v) for phase, v in floor.items()}
    for sub, times in more:
        for phase, reasons in sub.items():
            for reason, n in reasons.items():
                out.setdefault(phase, {})
                out[phase][reason] = out[phase].get(reason, 0) + n * times
    order = ("row-parallel linear", "vocab-parallel embedding", "vocab-parallel loss")  # communication_floor's
    return {ph: dict(sorted(v.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
            for ph, v in out.items()}


def _warn_unsupported(node: fx.Node, modules: list) -> str:
    msg = (
        f"tpcompile: no tensor-parallel rule for `{op_name(node)}` at {source_line(node)}; "
        f"{', '.join(sorted(set(modules)))} stay replicated (correct, but not sharded)."
    )
    warnings.warn(msg, TPWarning, stacklevel=3)
    return msg


def _warn_subgraph(node: fx.Node, fqns: dict) -> str:
    """A higher-order op other than a checkpointed block (inlined by ``inline_checkpoints``) runs
    its own subgraph, which the passes do not rewrite: it computes on whole values with
    replicated parameters."""
    inside = [fqns[x] for x in node.all_input_nodes if x in fqns]
    shown = ", ".join(inside[:3]) + (", ..." if len(inside) > 3 else "")
    msg = (
        f"tpcompile: `{op_name(node)}` at {source_line(node)} runs a subgraph that is not rewritten "
        f"(only activation-checkpointed blocks are); its {len(inside)} parameters ({shown}) stay replicated "
        f"(correct, but not sharded)."
    )
    warnings.warn(msg, TPWarning, stacklevel=3)
    return msg


def _warn_fallback(node: fx.Node, plan: GraphPlan) -> str:
    ins = {x.name: plan.prop.info[x].out for x in plan.prop.info[node].need if x in plan.prop.info}
    msg = (
        f"tpcompile: no tensor-parallel rule for `{op_name(node)}` at {source_line(node)} (inputs {ins}); "
        f"its inputs are made whole first (extra collective), so the result stays correct. "
        f"To avoid the collective, keep the projections around it replicated with plan={{...: 'replicate'}}."
    )
    warnings.warn(msg, TPWarning, stacklevel=3)
    return msg


__all__ = ["Options", "Program", "GraphRecord", "Collective", "tp_program", "plan_graph", "collectives_of",
           "communication_floor"]
