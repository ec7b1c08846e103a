"""Sequence parallelism (Korthikanti et al. 2022), as a pass over a TP-rewritten graph.

Between a row-parallel output and the next column-parallel input, a TP graph computes
the same thing on every rank: the residual stream, its norms, dropout. Those ops are
per token, so each rank can instead keep ``1/tp`` of the tokens:

- ``reduce_from_tp`` (all-reduce) after a row-parallel linear, and the vocab-parallel
  embedding's reduction, become ``reduce_scatter_to_sp`` (reduce-scatter over tokens);
- ``copy_to_tp`` (Megatron's f) before column-parallel linears becomes ``gather_from_sp``
  (all-gather forward, reduce-scatter backward);
- a replicated value *with* a token dim entering the region (a learned position
  embedding) is sliced (``scatter_to_sp``: all-gather of its gradient);
- a replicated value *without* one that needs a gradient (LayerNorm / RMSNorm weights,
  row-parallel biases) goes through ``copy_to_tp``: its gradient, computed on this rank's
  tokens only, is all-reduced;
- any other consumer of a region value (an op that is not per token, a graph output)
  gets the whole value back through ``gather_from_tp`` (all-gather; slice backward).

The token dim is the second-to-last dim of the activations ([B, T, H] -> T, [N, H] -> N).
The region's ops are those the placement rules call pointwise / unary, LayerNorm/RMSNorm
over the last dim, and reductions over the last dim with ``keepdim=True``.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from tpcompile.errors import TPShardingError
from tpcompile.runtime import mappings as M
from tpcompile.runtime import vocab_parallel as V

from .graph_utils import same_size, shape_str, size_expr, source_line, static_size, value
from .normalize import LINEARS
from .propagate import dropout, layer_norm, pointwise, rule_for, unary
from .rewrite import _inherit_meta, shard_dropout

_REDUCTIONS = {"sum", "mean", "amax", "amin", torch.sum, torch.mean, torch.amax, torch.amin}


@dataclass
class SPResult:
    """What the pass did, for the report and the floor."""

    tokens: int | None = None
    entries: list = field(default_factory=list)  # reduce-scatters (row outputs, embeddings)
    exits: list = field(default_factory=list)  # all-gathers before column-parallel linears
    grad_reductions: list = field(default_factory=list)  # replicated params/values all-reduced in backward
    slices: list = field(default_factory=list)  # replicated values with a token dim, sliced
    gathers: list = field(default_factory=list)  # region values made whole for other consumers


def _token_wise(node: fx.Node, tokens: int) -> bool:
    """True if ``node`` computes each token from the same token only, keeping the token dim."""
    v = value(node)
    if not isinstance(v, torch.Tensor) or v.dim() < 2 or not same_size(v.shape[-2], tokens):
        return False
    rule = rule_for(node)
    if rule in (pointwise, unary, dropout):
        return not (node.target == "to" and any(isinstance(a, (torch.device, str)) for a in node.args[1:]))
    if rule is layer_norm:
        norm_shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        return len(norm_shape) == 1
    if node.target in _REDUCTIONS:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = dim if isinstance(dim, (list, tuple)) else [dim]
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        return keep and all(d is not None and d % v.dim() == v.dim() - 1 for d in dims)
    return False


_DROPOUTS = {torch.nn.functional.dropout}


def sequence_parallel(gm: fx.GraphModule, group: str, tp: int, rank: int = 0) -> SPResult:
    """Turn the replicated regions of a TP-rewritten ``gm`` into token-sharded ones (in place)."""
    g = gm.graph
    res = SPResult()
    sources = [n for n in g.nodes if n.op == "call_function"  # row-parallel reductions, vocab embeddings
               and ((n.target is M.reduce_from_tp and n.args[0].target in LINEARS) or n.target is V.vocab_parallel_embedding)]
    if not sources:
        return res
    tokens = {size_expr(value(n).shape[-2]): value(n).shape[-2] for n in sources}
    if len(tokens) != 1:
        raise TPShardingError(f"sequence_parallel=True: activations with different token counts "
                              f"{sorted(str(t) for t in tokens)}.")
    (T,) = tokens.values()
    res.tokens = static_size(T)
    # a symbolic token count: ``bool`` of the SymBool guards the graph on ``T % tp == 0`` (Dynamo
    # recompiles for a count that breaks it, and that graph raises here): a guard, not a specialisation
    if static_size(T) is not None and T % tp or static_size(T) is None and bool(T % tp != 0):
        raise TPShardingError(
            f"sequence_parallel=True: {source_line(sources[0])} has {T} tokens per sequence"
            f"{'' if static_size(T) is not None else f' ({T.node.hint} in this call)'} (dim -2 of "
            f"{shape_str(value(sources[0]).shape)}), not divisible by tp={tp}. Use a sequence length divisible by "
            f"{tp} (pad the batch), or sequence_parallel=False."
        )

    def tdim(x: fx.Node) -> int:
        return value(x).dim() - 2

    region: set = set(sources)
    order = list(sources)
    i = 0
    while i < len(order):  # grow the region along per-token consumers
        for u in list(order[i].users):
            if u not in region and u.op == "call_function" and u.target is M.copy_to_tp:
                continue
            if u not in region and _token_wise(u, T):
                region.add(u)
                order.append(u)
        i += 1

    cache: dict = {}

    def insert(fn, x, before, *args):
        key = (fn, x)
        if key not in cache:
            with g.inserting_before(before):
                cache[key] = g.call_function(fn, (x, group, *args))
            cache[key].meta["tp_mapping"] = fn.__name__
            _inherit_meta(cache[key], before)
        return cache[key]

    for n in [n for n in g.nodes if n in region]:
        if n.target is M.reduce_from_tp:
            n.target, n.args = M.reduce_scatter_to_sp, (n.args[0], group, tdim(n))
            n.meta["tp_mapping"] = "reduce_scatter_to_sp"
            n._rename("reduce_scatter_to_sp")
            res.entries.append(n)
        elif n.target is V.vocab_parallel_embedding:
            n.kwargs = {**n.kwargs, "sp_dim": tdim(n)}
            res.entries.append(n)
        else:
            for x in n.all_input_nodes:  # values from outside the region
                if x in region or not isinstance(value(x), torch.Tensor):
                    continue
                xv = value(x)
                if xv.dim() >= 2 and same_size(xv.shape[-2], T):
                    n.replace_input_with(x, insert(M.scatter_to_sp, x, n, xv.dim() - 2))
                    res.slices.append(x)
                elif xv.requires_grad:
                    n.replace_input_with(x, insert(M.copy_to_tp, x, n))
                    res.grad_reductions.append(x)
            if n.target in _DROPOUTS:  # the full-sequence mask, this rank's tokens
                shard_dropout(n, tdim(n), T if static_size(T) is not None else _whole_size(g, n, tdim(n), tp), rank)
        for u in list(n.users):  # consumers outside the region
            if u in region or u.target is torch.ops.aten.sym_size.int:  # a size read (``_whole_size``)
                continue
            if u.op == "call_function" and u.target is M.copy_to_tp and u.meta.get("tp_mapping") == "copy_to_tp":
                u.target, u.args = M.gather_from_sp, (n, group, tdim(n))
                u.meta["tp_mapping"] = "gather_from_sp"
                u._rename("gather_from_sp")
                res.exits.append(u)
            else:
                u.replace_input_with(n, insert(M.gather_from_tp, n, u, tdim(n)))
                res.gathers.append(u)
    g.lint()
    gm.recompile()
    return res


def _whole_size(g: fx.Graph, n: fx.Node, dim: int, tp: int) -> fx.Node:
    """A node computing the whole (symbolic) size of dim ``dim`` of ``n``'s input from its token shard."""
    with g.inserting_before(n):
        local = g.call_function(torch.ops.aten.sym_size.int, (n.args[0], dim))
        return g.call_function(operator.mul, (local, tp))


def floor_with_sp(res: SPResult, loss_collectives: int) -> dict:
    """DESIGN.md's floor with SP: the all-reduces' bytes as all-gathers + reduce-scatters, plus
    the backward all-reduces of replicated weights used on token shards (norm weights, biases)."""
    fwd = {"reduce-scatter into SP": len(res.entries), "all-gather out of SP": len(res.exits),
           "vocab-parallel loss": loss_collectives}
    bwd = {"all-gather (reduce-scatter's backward)": len(res.entries),
           "reduce-scatter (all-gather's backward)": len(res.exits),
           "replicated-weight gradient all-reduce": len(res.grad_reductions),
           "sliced input gradient all-gather": len(res.slices)}
    return {"forward": {k: v for k, v in fwd.items() if v}, "backward": {k: v for k, v in bwd.items() if v}}


__all__ = ["sequence_parallel", "SPResult", "floor_with_sp"]
