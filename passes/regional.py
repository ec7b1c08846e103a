"""Regions: repeated blocks captured once (``invoke_subgraph``), planned once, run for every layer.

With regional compilation on, each repeated block's forward is a
``torch.compiler.nested_compile_region`` (``tpcompile.twin``): Dynamo traces the first block
into one subgraph and calls it from the model's graph once per layer, with that layer's
parameters as operands:

    out_k = invoke_subgraph(subgraph_0, "subgraph_0", x_k, *params_of_block_k)

A Megatron block is a TP region of its own: it takes the replicated residual stream and
gives it back replicated (its row-parallel reductions are inside it), so planning the
subgraph on its own gives the plan the whole graph gives its layers, and the same
collectives. This module finds the calls, says when that holds for a call site, and inlines
a region where it does not (the whole-graph path: same numbers, no reuse).
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.fx as fx

from .graph_utils import inline_call, stack_fqn

REGION = torch.ops.higher_order.invoke_subgraph


def is_region(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is REGION


def region_calls(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """``subgraph attribute name -> its call nodes``, in graph order."""
    out: dict[str, list[fx.Node]] = defaultdict(list)
    for n in gm.graph.nodes:
        if is_region(n) and isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr":
            out[n.args[0].target].append(n)
    return dict(out)


def body_of(gm: fx.GraphModule, call: fx.Node) -> fx.GraphModule:
    return getattr(gm, call.args[0].target)


def operands(call: fx.Node) -> list:
    return list(call.args[2:])


def inline_regions(gm: fx.GraphModule, names: set[str] | None = None, rebase: dict | None = None) -> int:
    """Inline the calls of the regions ``names`` (all if None) into ``gm``, in place: the graph
    is then what Dynamo captures without regions. Returns how many calls were inlined.

    ``rebase``: call node -> (prefix of the block the body was traced from, of the block this call
    runs), e.g. ``("h.0.", "h.2.")``: the inlined nodes name their call's modules (explain, dumps)."""
    g, done = gm.graph, 0
    for name, calls in region_calls(gm).items():
        if names is not None and name not in names:
            continue
        body = getattr(gm, name)
        for call in calls:
            hook = (lambda new, call=call: _rebase_stack(new, *rebase[call])) if rebase and call in rebase else None
            inline_call(gm, call, body, operands(call), hook)
            done += 1
        if not any(n.op == "get_attr" and n.target == name for n in g.nodes):
            delattr(gm, name)
    if done:
        g.lint()
        gm.recompile()
    return done


def _rebase_stack(node: fx.Node, first: str, at: str) -> None:
    stack = node.meta.get("nn_module_stack")
    if not stack or first == at:
        return
    out = {}
    for key, (path, cls) in stack.items():
        fqn = stack_fqn(path) + "."
        if fqn.startswith(first):
            path = "L['self']." + (at + fqn[len(first):]).rstrip(".")
        out[key] = (path, cls)
    node.meta["nn_module_stack"] = out


def block_prefix(fqns: list[str]) -> str:
    """``["h.3.ln_1.weight", "h.3.attn.q_proj.weight"]`` -> ``"h.3."``: the block a call site binds."""
    if not fqns:
        return ""
    first = fqns[0].split(".")
    common = first[:-1]
    for f in fqns[1:]:
        parts = f.split(".")[:-1]
        n = 0
        while n < min(len(common), len(parts)) and common[n] == parts[n]:
            n += 1
        common = common[:n]
    return ".".join(common) + "." if common else ""


def block_prefixes(sites: list[list[str]]) -> list[str]:
    """The block each call site binds, from the FQNs of its parameters: their common prefix, cut
    after the first name where the sites differ (the layer index), so a block whose only
    parameter operands sit in one submodule (``h.0.ln.weight``) is still ``"h.0."``."""
    prefixes = [block_prefix(f) for f in sites]
    parts = [p.split(".")[:-1] for p in prefixes]
    if len(parts) < 2 or any(len(p) != len(parts[0]) for p in parts):
        return prefixes
    cut = next((i for i in range(len(parts[0])) if len({p[i] for p in parts}) > 1), None)
    return prefixes if cut is None else [".".join(p[:cut + 1]) + "." for p in parts]


__all__ = ["block_prefixes", "REGION", "is_region", "region_calls", "body_of", "operands", "inline_regions", "block_prefix"]
