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
  tokens only, is all-reduced; the graph's own inputs (parameters) share one
  ``copy_to_tp_bucketed`` at the top of the graph, so their gradients are all-reduced in one
  collective per backward;
- any other consumer of a region value (an op that is not per token, a graph output)
  gets the whole value back through ``gather_from_tp`` (all-gather; slice backward).

The token dim is the second-to-last dim of the activations ([B, T, H] -> T, [N, H] -> N).
Which ops are per token is the propagation rule table's answer, not a list kept here: an op
of a per-element family (pointwise, cast, dropout, norm, reduction, softmax) joins the region
when its rule keeps a shard on the token dim with no communication (LayerNorm / RMSNorm in any
spelling over the last dim, a ``mean(-1, keepdim=True)``, ...), and the rule's ``need`` says
how each input from outside the region enters it. A dropout in the region draws the whole
sequence's mask and keeps this rank's tokens (single device's mask under the same seed).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from tpcompile.errors import TPShardingError
from tpcompile.runtime import expert_parallel as EP
from tpcompile.runtime import mappings as M
from tpcompile.runtime import vocab_parallel as V

from .expert_dispatch import dispatch_experts
from .graph_utils import comes_before, same_shape, same_size, shape_str, size_expr, source_line, static_size, value
from .normalize import LINEARS
from .placements import Replicate, Shard
from .propagate import op_class, rule_through
from .normalize import LINEAR
from .rewrite import RECOMPUTE_TAGS, _inherit_meta, shard_dropout

# families whose ops compute each position from the same position (views are not: their literal
# sizes would need rewriting); the rule decides whether the token shard survives a given call
_PER_ELEMENT = {"pointwise", "cast", "dropout", "norm", "reduction", "softmax"}


@dataclass
class SPResult:
    """What the pass did, for the report and the floor."""

    tokens: int | None = None
    entries: list = field(default_factory=list)  # reduce-scatters (row outputs, embeddings)
    exits: list = field(default_factory=list)  # all-gathers before column-parallel linears
    grad_reductions: list = field(default_factory=list)  # replicated params/values all-reduced in backward
    slices: list = field(default_factory=list)  # replicated values with a token dim, sliced
    gathers: list = field(default_factory=list)  # region values made whole for other consumers
    bucketed: list = field(default_factory=list)  # parameters all-reduced together (copy_to_tp_bucketed)
    grad_buckets: int = 0  # their all-reduces: one per dtype
    merged: list = field(default_factory=list)  # groups of column linears on one gather, now one matmul
    skipped: str = ""  # why this graph is not token-sharded (a token count tp does not divide)
    dispatches: list = field(default_factory=list)  # expert-parallel MoE blocks on this rank's tokens (all-to-all)
    dispatch_warnings: list = field(default_factory=list)  # those left on the gathered path, and why


def _token_shard(x: fx.Node) -> Shard:
    return Shard(value(x).dim() - 2)


def _token_wise(node: fx.Node, tokens: int, region: set, tp: int):
    """The rule's answer (a ``NodeInfo``) if ``node`` computes each token from the same token only,
    keeping the token dim, with its inputs from ``region`` token-sharded; else None."""
    v = value(node)
    if not isinstance(v, torch.Tensor) or v.dim() < 2 or not same_size(v.shape[-2], tokens) \
            or op_class(node) not in _PER_ELEMENT:
        return None
    inside = {x: _token_shard(x) for x in node.all_input_nodes if x in region}
    ni = rule_through(node, inside, tp)
    if ni.out != Shard(v.dim() - 2) or any(ni.need.get(x, p) != p for x, p in inside.items()):
        return None
    return ni


def sequence_parallel(gm: fx.GraphModule, group: str, tp: int) -> SPResult:
    """Turn the replicated regions of a TP-rewritten ``gm`` into token-sharded ones (in place)."""
    g = gm.graph
    res = SPResult()
    _tokens_through_flattens(g)
    sources = [n for n in g.nodes if n.op == "call_function"  # row-parallel reductions, vocab embeddings
               and ((n.target is M.reduce_from_tp and _row_output(n.args[0])) or n.target is V.vocab_parallel_embedding)]
    if not sources:
        return res
    tokens = {size_expr(value(n).shape[-2]): value(n).shape[-2] for n in sources}
    if len(tokens) != 1:
        by_rank = sorted(sources, key=lambda n: value(n).dim())  # a token-flattened one first: [B*T, C]
        flat, whole = by_rank[0], by_rank[-1]
        raise TPShardingError(
            f"sequence_parallel=True: {source_line(flat)} reduces an activation of shape "
            f"{shape_str(value(flat).shape)} while {source_line(whole)} holds {shape_str(value(whole).shape)}: "
            f"token counts {sorted(str(t) for t in tokens)} along dim -2. The first has batch and tokens in one "
            f"dim (a linear on x.view(-1, C), like Hugging Face's Conv1D in GPT-2), and SP shards the tokens of "
            f"[..., tokens, hidden] activations only. Use sequence_parallel=False for this model, or apply the "
            f"linear to the [B, T, C] activation (F.linear / nn.Linear keep the token dim).")
    (T,) = tokens.values()
    res.tokens = static_size(T)
    # a symbolic token count: ``bool`` of the SymBool guards the graph on ``T % tp == 0`` (Dynamo
    # recompiles for a count that breaks it, and that graph is planned without SP): a guard, not a
    # specialisation
    if static_size(T) is not None and T % tp or static_size(T) is None and bool(T % tp != 0):
        res.skipped = (
            f"tpcompile: sequence_parallel=True: {source_line(sources[0])} has {T} tokens per sequence"
            f"{'' if static_size(T) is not None else f' ({T.node.hint} in this call)'} (dim -2 of "
            f"{shape_str(value(sources[0]).shape)}), not divisible by tp={tp}: this graph runs without sequence "
            f"parallelism (the same numbers; its activations between TP regions are whole on every rank, not "
            f"1/{tp}). A decode step of one token is such a graph. To keep SP here, pad the sequence length to a "
            f"multiple of {tp}.")
        return res

    def tdim(x: fx.Node) -> int:
        return value(x).dim() - 2

    region: set = set(sources)
    rules: dict = {}  # region op -> its rule's answer for token-sharded inputs
    order = list(sources)
    i = 0
    while i < len(order):  # grow the region along per-token consumers
        for u in list(order[i].users):
            if u in region or (u.op == "call_function" and u.target is M.copy_to_tp):
                continue
            ni = _token_wise(u, T, region, tp)
            if ni is not None:
                region.add(u)
                rules[u] = ni
                order.append(u)
        i += 1

    cache: dict = {}
    bucket: dict = {}  # parameter (placeholder) -> region ops that need its gradient all-reduced

    def insert(fn, x, before, *args):
        """``fn(x)``, made once for all its users, placed before the earliest of them (users are
        visited in no particular order: a later one may stand before the first)."""
        key = (fn, x)
        if key not in cache:
            with g.inserting_before(before):
                cache[key] = g.call_function(fn, (x, group, *args))
            cache[key].meta["tp_mapping"] = fn.__name__
            _inherit_meta(cache[key], before)
            if value(x) is not None:  # meta values stay logical (whole) shapes, as the rewrite's mappings
                cache[key].meta["example_value"] = value(x)
        elif comes_before(before, cache[key]):
            before.prepend(cache[key])
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
            ni = rules[n]
            for x, need in ni.need.items():  # values from outside the region, as the rule needs them
                if x in region:
                    continue
                if isinstance(need, Shard):
                    n.replace_input_with(x, insert(M.scatter_to_sp, x, n, need.dim))
                    res.slices.append(x)
                elif isinstance(need, Replicate) and getattr(value(x), "requires_grad", False):
                    if x.op == "placeholder":
                        bucket.setdefault(x, []).append(n)
                    else:
                        n.replace_input_with(x, insert(M.copy_to_tp, x, n))
                        res.grad_reductions.append(x)
            if ni.kind == "dropout":  # the full-sequence mask, this rank's tokens
                shard_dropout(n, tdim(n), T if static_size(T) is not None else _whole_size(g, n, tdim(n), tp), group)
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
    if any(n.op == "call_function" and n.target is EP.local_experts_linear for n in g.nodes):
        res.dispatches, res.dispatch_warnings = dispatch_experts(g, region, group, tp, bucket)
        res.slices = [x for x in res.slices if x not in res.dispatches]  # no longer sliced: computed per token
    if bucket:
        _bucket_grad_reductions(g, bucket, group)
        res.bucketed = [x.name for x in bucket]
        res.grad_buckets = len({value(x).dtype for x in bucket})
    for x in res.exits:
        res.merged += _async_tp_form(g, x)
    g.lint()
    gm.recompile()
    return res


_VIEWS = {"view", "reshape", torch.reshape}


def _row_output(x: fx.Node) -> bool:
    """``x`` is a linear's output, or a view of one (``_tokens_through_flattens``)."""
    return x.target in LINEARS or (_is_view(x) and x.args[0].target in LINEARS)


def _is_view(n: fx.Node) -> bool:
    return n.op in ("call_method", "call_function") and n.target in _VIEWS and isinstance(n.args[0], fx.Node) \
        and isinstance(value(n), torch.Tensor) and isinstance(value(n.args[0]), torch.Tensor)


def _whole_index(n: fx.Node) -> bool:
    """``x[:, 0:, :]`` (HF's ``hidden_states[:, slice(-logits_to_keep, None), :]`` with 0 to keep): every entry."""
    if n.op != "call_function" or n.target is not operator.getitem or not isinstance(n.args[0], fx.Node) \
            or not isinstance(value(n.args[0]), torch.Tensor):
        return False
    idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
    return all(isinstance(i, slice) and i.start in (None, 0) and i.stop is None and i.step in (None, 1) for i in idx)


def _flattens_tokens(flat: fx.Node, full: fx.Node) -> bool:
    """``flat`` ([N, C]) is ``full`` ([..., T, C], 3-D or more) with its leading dims in one: the same
    elements, the same last dim."""
    a, b = value(flat), value(full)
    return a.dim() == 2 and b.dim() >= 3 and same_size(a.shape[-1], b.shape[-1]) and same_size(a.numel(), b.numel())


def _tokens_through_flattens(g: fx.Graph) -> None:
    """Show SP the token dim where a linear runs on token-flattened activations (HF's ``Conv1D``:
    ``addmm(b, x.view(-1, C), W).view(B, T, C)``; ``x.view(-1, C) @ W``), in place, the numbers unchanged:

    - a row-parallel reduction of ``[B*T, C]`` whose result (plus a bias) is viewed back to
      ``[B, T, C]`` reduces that view instead (a view of a pending sum is a pending sum), so the
      reduce-scatter splits tokens, not rows of the flattened batch;
    - Megatron's f (``copy_to_tp``, identity forward) on ``x.view(-1, C)`` goes on ``x`` before the view,
      so the all-gather that replaces it gathers tokens and the view flattens the whole sequence (where
      f is the view's only reader);
    - views and slices that keep every entry in place (``x.view(-1, T, C)`` of a ``[B, T, C]`` x,
      ``x[:, 0:, :]``) are dropped: on a token shard their literal sizes would be wrong.
    """
    for n in list(g.nodes):
        if (_is_view(n) and same_shape(value(n).shape, value(n.args[0]).shape) and len(n.args[0].users) >= 1) \
                or (_whole_index(n) and same_shape(value(n).shape, value(n.args[0]).shape)):
            n.replace_all_uses_with(n.args[0])
            g.erase_node(n)
    for n in list(g.nodes):
        if n.op != "call_function":
            continue
        if n.target is M.reduce_from_tp and n.args[0].target in LINEARS and value(n).dim() == 2:
            chain, last = [], n
            while len(last.users) == 1:
                (u,) = last.users
                if _is_view(u) and _flattens_tokens(last, u):
                    _reduce_after_view(g, n, chain, u)
                    break
                if op_class(u) not in ("pointwise", "cast") or any(
                        x is not last and isinstance(value(x), torch.Tensor) and value(x).dim() > 1 for x in u.all_input_nodes):
                    break  # only a bias (1-D) or scalars may join on the way to the view
                chain.append(u)
                last = u
        elif n.target is M.copy_to_tp and n.meta.get("tp_mapping") == "copy_to_tp" and _is_view(n.args[0]) \
                and len(n.args[0].users) == 1 and _flattens_tokens(n.args[0], n.args[0].args[0]):
            # only f's own view: one also read elsewhere (Mixtral's router beside its experts) stays as it
            # was, gathered before the view; moved, the router would keep the old view, outside the MoE block
            # the expert dispatch takes, and the block would stay on the gathered path
            flat = n.args[0]
            n.replace_input_with(flat, flat.args[0])
            n.meta["example_value"] = value(flat.args[0])
            with g.inserting_after(n):
                again = g.create_node(flat.op, flat.target, (n, *flat.args[1:]), dict(flat.kwargs))
            _inherit_meta(again, flat, _KEYS)
            again.meta["example_value"] = value(flat)
            n.replace_all_uses_with(again, delete_user_cb=lambda u: u is not again)
            if not flat.users:
                g.erase_node(flat)


def _reduce_after_view(g: fx.Graph, red: fx.Node, chain: list, view: fx.Node) -> None:
    """``view(chain(reduce(y)))`` -> ``chain(reduce(view(y)))``: the view's sizes on ``y`` (the same numel
    and last dim), the reduction and the ops after it (a bias add) on the viewed shape."""
    y = red.args[0]
    with g.inserting_before(red):
        yv = g.create_node(view.op, view.target, (y, *view.args[1:]), dict(view.kwargs))
    _inherit_meta(yv, view, _KEYS)
    full = value(view).shape
    yv.meta["example_value"] = value(y).reshape(full)
    red.replace_input_with(y, yv)
    for n in (red, *chain):
        n.meta["example_value"] = value(n).reshape(full)
    view.replace_all_uses_with(chain[-1] if chain else red)
    g.erase_node(view)


def _bucket_grad_reductions(g: fx.Graph, bucket: dict, group: str) -> None:
    """One ``copy_to_tp_bucketed`` after the placeholders for every parameter in ``bucket``; each of
    its region users reads that parameter through it."""
    last = [n for n in g.nodes if n.op == "placeholder"][-1]
    xs = list(bucket)
    with g.inserting_after(last):
        b = g.call_function(M.copy_to_tp_bucketed, (xs, group))
    b.meta["tp_mapping"] = "copy_to_tp_bucketed"
    with g.inserting_after(b):
        outs = [g.call_function(operator.getitem, (b, i)) for i in range(len(xs))]
    for x, out, users in zip(xs, outs, bucket.values()):
        out.meta["example_value"] = value(x)
        for u in users:
            u.replace_input_with(x, out)


_KEYS = ("stack_trace", "nn_module_stack", *RECOMPUTE_TAGS)


def _async_tp_form(g: fx.Graph, gathered: fx.Node) -> list:
    """Emit the column-parallel linears fed by an SP all-gather in the form Inductor's async-TP pass
    (``_micro_pipeline_tp``) fuses, forward and backward: one bias-free ``mm`` with the gathered
    tokens as its left operand, the bias added after.

    Several linears on the same gathered value (q/k/v, gate/up) become one linear on their
    concatenated weight shards, its output split back: in backward the input gradient is then one
    ``mm`` feeding the reduce-scatter (a sum of several ``mm`` would not fuse). Costs a copy of the
    weight shards forward and of the output gradients backward. Returns the merged groups' names."""
    lins = [u for u in gathered.users if u.op == "call_function" and u.target in LINEARS and u.args[0] is gathered
            and not u.kwargs]
    for lin in lins:  # the bias after the matmul (addmm never fuses)
        bias = lin.args[2] if len(lin.args) > 2 else None
        if bias is None:
            continue
        lin.args = lin.args[:2]
        users = list(lin.users)
        with g.inserting_after(lin):
            out = g.call_function(operator.add, (lin, bias))
        _inherit_meta(out, lin, _KEYS)
        out.meta["example_value"] = value(lin)
        for u in users:
            u.replace_input_with(lin, out)
    order = {n: i for i, n in enumerate(g.nodes)}
    lins = sorted((n for n in lins if n.target is LINEAR), key=order.__getitem__)
    if len(lins) < 2:
        return []
    first, weights = lins[0], [n.args[1] for n in lins]
    tags = {tuple(n.meta.get(k) for k in RECOMPUTE_TAGS) for n in lins}
    if len({value(w).dtype for w in weights}) != 1 or len(tags) != 1 \
            or any(not isinstance(w, fx.Node) or order[w] > order[first] for w in weights):
        return []
    with g.inserting_before(first):  # each weight's local rows, read at run time (metadata has logical shapes)
        sizes = [g.call_function(torch.ops.aten.sym_size.int, (w, 0)) for w in weights]
        w_cat = g.call_function(torch.cat, (weights, 0))
        y = g.call_function(LINEAR, (gathered, w_cat))
        parts = g.call_function(torch.split, (y, sizes, -1))
        outs = [g.call_function(operator.getitem, (parts, i)) for i in range(len(lins))]
    for new in (*sizes, w_cat, y, parts, *outs):
        _inherit_meta(new, first, _KEYS)
    for lin, out in zip(lins, outs):
        out.meta["example_value"] = value(lin)
        lin.replace_all_uses_with(out)
        g.erase_node(lin)
    return [[w.name for w in weights]]


def _whole_size(g: fx.Graph, n: fx.Node, dim: int, tp: int) -> fx.Node:
    """A node computing the whole (symbolic) size of dim ``dim`` of ``n``'s input from its token shard."""
    with g.inserting_before(n):
        local = g.call_function(torch.ops.aten.sym_size.int, (n.args[0], dim))
        return g.call_function(operator.mul, (local, tp))


def floor_with_sp(res: SPResult, loss_collectives: int, kv_copy_weights: int = 0) -> dict:
    """DESIGN.md's floor with SP: the all-reduces' bytes as all-gathers + reduce-scatters, plus
    the backward all-reduces of replicated weights used on token shards (norm weights, biases)
    and of those kv-head copies are taken from."""
    fwd = {"reduce-scatter into SP": len(res.entries), "all-gather out of SP": len(res.exits),
           "vocab-parallel loss": loss_collectives,
           # per MoE block: the rows to their experts' ranks, each row's expert (int32), the results back
           "expert dispatch / combine all-to-all": 3 * len(res.dispatches)}
    bwd = {"all-gather (reduce-scatter's backward)": len(res.entries),
           "reduce-scatter (all-gather's backward)": len(res.exits),
           "replicated-weight gradient all-reduce": len(res.grad_reductions) + res.grad_buckets,
           "sliced input gradient all-gather": len(res.slices), "kv-copy weight gradient": kv_copy_weights,
           "expert dispatch / combine all-to-all (reversed)": 2 * len(res.dispatches)}
    return {"forward": {k: v for k, v in fwd.items() if v}, "backward": {k: v for k, v in bwd.items() if v}}


__all__ = ["sequence_parallel", "SPResult", "floor_with_sp"]
