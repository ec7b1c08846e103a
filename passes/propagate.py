"""Propagate placements through a captured graph: one rule per op family, in one table.

``propagate`` walks the graph in order. For every node, the rule of its op family says
which placement each tensor input must have (``need``) and what the output placement is.
Where an input's placement differs from what the rule needs, the rewrite pass inserts a
mapping op on that edge. Rules never guess: an op with no rule needs Replicate inputs
(a correct gather / reduce) and is reported, so the answer stays right.

Linear and Embedding rules ask ``style_of`` (the plan) how their weight is laid out; the
plan pass runs this propagation to choose those styles.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph_utils import is_tensor, norm_dim, numel_expr, same_shape, same_size, shape, static_size, value
from .normalize import GROUPED, LINEAR, LINEAR_IO, SDPA, weight_in_dim, weight_out_dim
from .placements import P, R, ExpertRows, Partial, Placement, Replicate, Shard
from tpcompile.runtime.fused_norm import NormForm


@dataclass
class NodeInfo:
    out: Any  # Placement, a tuple of them (multi-output ops), or None for non-tensors
    need: dict = field(default_factory=dict)  # input node -> placement the rule needs
    kind: str = "replicate"  # the rule that decided; the rewrite dispatches on it
    extra: dict = field(default_factory=dict)  # facts for the rewrite (new sizes, styles, ...)


@dataclass
class Propagation:
    info: dict  # node -> NodeInfo
    origins: dict  # node -> frozenset of column-parallel linear nodes whose shard it carries
    good_sinks: set  # column linears whose shard reaches a row linear or a vocab-parallel loss
    fallbacks: list  # ops with no rule that had to gather / reduce
    blocked: dict = field(default_factory=dict)  # column linear -> ops with no rule its shard ran into
    vocab_sinks: set = field(default_factory=set)  # column linears whose shard reaches the vocab-parallel loss
    gathered: set = field(default_factory=set)  # column linears / tables whose shard some consumer needs otherwise
    returned: set = field(default_factory=set)  # LM heads (widening column linears) whose shard reaches the graph's output

    def placement(self, node):
        return self.info[node].out if node in self.info else None


class Ctx:
    """What a rule may look at: placements of inputs, logical shapes, tp, the plan."""

    def __init__(self, tp: int, style_of: Callable[[fx.Node, Any], str], chunks_of: Callable[[fx.Node], int],
                 copies_of: Callable[[fx.Node], int] = lambda n: 1, pending: frozenset = frozenset()):
        self.tp = tp
        self.style_of = style_of
        self.chunks_of = chunks_of
        self.copies_of = copies_of
        self.pending = pending  # row linears whose sum stays pending (joined to a MoE combine's, see plan)
        self.inference = False  # the graph has no backward (decode): a shard may be returned gathered
        self.place: dict = {}
        self.buffers: set = set()  # module-buffer placeholders (a hand-written KV cache may be adopted sharded)

    def pl(self, x) -> Placement | None:
        if not isinstance(x, fx.Node):
            return None
        p = self.place.get(x)
        return p if not isinstance(p, tuple) else None


# --------------------------------------------------------------------------- helpers
def _tensors(node: fx.Node) -> list[fx.Node]:
    return [x for x in node.all_input_nodes if is_tensor(x)]


def _replicate_all(node, ctx, kind="replicate") -> NodeInfo:
    out = R if is_tensor(node) else (tuple(R for _ in value(node)) if isinstance(value(node), (tuple, list)) else None)
    return NodeInfo(out, {x: R for x in _tensors(node)}, kind)


def _arg(node, i, name, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _sharded(ctx, node):
    """(input node, Shard) pairs among the tensor inputs of ``node``."""
    return [(x, ctx.pl(x)) for x in _tensors(node) if isinstance(ctx.pl(x), Shard)]


# --------------------------------------------------------------------------- rules
def pointwise(node, ctx) -> NodeInfo:
    """Elementwise with broadcasting: a shard survives; replicated operands that are full-size
    on the sharded dim are split locally to match (no communication forward)."""
    if not is_tensor(node):  # maths on sizes (``SymInt`` / ``SymFloat`` under dynamic shapes)
        return _replicate_all(node, ctx)
    out_nd = value(node).dim()
    ins = _tensors(node)
    rows = _expert_rows_through(node, ctx, ins)
    if rows is not None:
        return rows
    partial = _partial_through(node, ctx, ins)
    if partial is not None:
        return partial
    # a shard of a dim that broadcasts (size 1 against a longer one: a ``[N, 1]`` gate times ``[N, H]``)
    # is no shard of the output: that input is made whole, like any replicated one
    sh = [(x, p) for x, p in _sharded(ctx, node)
          if same_size(shape(x)[p.dim], shape(node)[p.dim + out_nd - value(x).dim()])]
    if not sh:
        return NodeInfo(R, {x: R for x in ins}, "pointwise")
    x0, s0 = next(((x, p) for x, p in sh if not p.copies), sh[0])  # kv copies meet a plain shard as one
    o = s0.dim + out_nd - value(x0).dim()
    need = {}
    for x in ins:
        nd = value(x).dim()
        d = o - (out_nd - nd)
        if d >= 0 and ctx.pl(x) == s0.moved(d):  # sharded alike (kv copies of one head: a dim of size 1)
            need[x] = s0.moved(d)
        elif d < 0 or same_size(shape(x)[d], 1):
            need[x] = R
        else:
            need[x] = s0.moved(d)
    return NodeInfo(s0.moved(o), need, "pointwise")


_LINEAR_IN_FIRST = {operator.mul, torch.mul, "mul", operator.truediv, torch.div, "div", operator.neg, torch.neg, "neg"}
_SUM_OF = {operator.add, torch.add, "add"}


def _no_bigger(node, x) -> bool:
    """``node`` has no more elements than ``x``: a pending sum carried on to it is reduced no larger."""
    a, b = numel_expr(shape(node)), numel_expr(shape(x))
    return a == b or (a.is_Integer and b.is_Integer and int(a) <= int(b))


def _partial_through(node, ctx, ins) -> NodeInfo | None:
    """A pending sum (Partial: each rank's summand of a row-parallel product) stays pending through
    ops linear in it, so that it is reduced once, later, on a value no larger: ``P * w`` and ``P / w``
    with ``w`` whole (the routing weights of a MoE combine), ``-P``, ``P + P``. Anything else reduces it
    first (the rule's Replicate need). None: the rule does not apply."""
    parts = [x for x in ins if isinstance(ctx.pl(x), Partial)]
    if not parts or any(isinstance(ctx.pl(x), Shard) for x in ins) or not all(_no_bigger(node, x) for x in parts):
        return None
    t = node.target
    if t in _LINEAR_IN_FIRST and len(parts) == 1 and (t not in (operator.truediv, torch.div, "div") or node.args[0] is parts[0]):
        return NodeInfo(P, {x: P if x is parts[0] else R for x in ins}, "pointwise")
    if t in _SUM_OF and len(parts) == len(ins) == 2 and not node.kwargs:
        return NodeInfo(P, {x: P for x in ins}, "pointwise")
    return None


def _rows_of(ctx, xs) -> ExpertRows | None:
    """The one ``ExpertRows`` placement among ``xs`` (None if none, or two of different routings)."""
    found = {ctx.pl(x) for x in xs if isinstance(ctx.pl(x), ExpertRows)}
    return found.pop() if len(found) == 1 else None


def _expert_rows_through(node, ctx, ins) -> NodeInfo | None:
    """Elementwise ops on the rows of this rank's experts (expert parallelism: ``act(gate) * up`` between
    the two expert matmuls) compute each row from the same row: the rows stay this rank's, every other
    operand is used whole. Only where each such input's dim 0 is the output's (no broadcast over rows)."""
    p = _rows_of(ctx, ins)
    if p is None:
        return None
    out = shape(node)
    if not all(value(x).dim() == len(out) and same_size(shape(x)[0], out[0])
               for x in ins if ctx.pl(x) == p):
        return None
    return NodeInfo(p, {x: p if ctx.pl(x) == p else R for x in ins}, "pointwise")


def _float_cast(node, x) -> bool:
    """A cast that keeps a floating value at least as wide (a pending sum may pass it)."""
    a, b = value(x), value(node)
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.is_floating_point() \
        and b.is_floating_point() and b.element_size() >= a.element_size()


def unary(node, ctx) -> NodeInfo:
    """Ops whose output has the layout of their first argument (casts, dropout, ``type_as``).
    A pending sum passes a cast that keeps it floating and no narrower (reduced later)."""
    x = node.args[0]
    p = ctx.pl(x)
    if isinstance(p, ExpertRows):  # a cast of this rank's expert rows: the same rows
        return NodeInfo(p, {x: p}, "pointwise")
    if isinstance(p, Partial) and _float_cast(node, x) and node.target != "requires_grad_":
        return NodeInfo(P, {x: P}, "pointwise")
    if isinstance(p, Partial) or p is None:
        p = R
    return NodeInfo(p, {x: p}, "pointwise")


def last2_unary(node, ctx) -> NodeInfo:
    """``tril``/``triu``: elementwise but position-dependent on the last two dims."""
    x = node.args[0]
    p = ctx.pl(x)
    if isinstance(p, Shard) and p.dim < value(x).dim() - 2:
        return NodeInfo(p, {x: p}, "pointwise")
    return _replicate_all(node, ctx)


def _factor_run(in_shape, out_shape, d: int) -> int | None:
    """Out dim where the factors of in dim ``d`` start through a reshape, or None.

    The in dims before ``d`` become the out dims before the run: matched dim by dim when they
    are the same sizes (``(B, T, C) -> (B, T, H, hd)``, whatever B and T are: a size-1 batch or
    one decode token included), else by their product (``(B*T, C) -> (B, T, C)``), size-1 out
    dims at the boundary then counted before the run (the prefix).
    """
    if d <= len(out_shape) and same_shape(in_shape[:d], out_shape[:d]):
        return d
    pre = numel_expr(in_shape[:d])
    starts = [s for s in range(len(out_shape)) if numel_expr(out_shape[:s]) == pre]
    if not starts:
        return None
    s = starts[0]
    while s + 1 < len(out_shape) and same_size(out_shape[s], 1) and numel_expr(out_shape[:s + 1]) == pre:
        s += 1
    return s


def _map_dim(in_shape, out_shape, d: int, tp: int):
    """Out dim that carries the shard of in dim ``d`` through a reshape: (o, ok), or (None, False).

    Sharding in-dim ``d`` into tp blocks equals sharding out-dim ``o`` into tp blocks iff the
    products of the dims before them agree (row-major order), and both sizes split by tp: ``o``
    is the first factor of ``d`` that is not 1. ``ok`` says whether out_shape[o] is a static size
    divisible by tp (the sharded dims come from weights; a symbolic batch / sequence dim never is).
    """
    s = _factor_run(in_shape, out_shape, d)
    if s is None:
        return None, False
    for o in range(s, len(out_shape)):
        if not same_size(out_shape[o], 1):
            b = static_size(out_shape[o])
            return o, b is not None and b % tp == 0
    return None, False


def _one_head(in_shape, out_shape, d: int) -> bool:
    """The view splits in dim ``d`` (a projection's whole width) into ``(1, width)``: one head (MQA).

    Only a split that adds exactly that one dim, after leading dims matched one by one: a
    size-1 batch or sequence dim next to the split (decode, ``(B, 1, C) -> (B, 1, H, hd)``) is
    not a head dim.
    """
    s = _factor_run(in_shape, out_shape, d)
    return (s == d and len(out_shape) == len(in_shape) + 1 and s + 1 < len(out_shape)
            and same_size(out_shape[s], 1) and same_size(out_shape[s + 1], in_shape[d]))


def _pieces_dim(in_shape, out_shape, p: Shard) -> int | None:
    """Out dim of a reshape that splits a fused ``chunks=k`` dim pieces-first, ``(k * C) -> (k, ...)``
    (``qkv.reshape(B, N, 3, heads, hd)``), or None. Row-major order makes index i of that dim the
    i-th piece: the pieces are whole rows of the fused dim, never mixed."""
    if p.chunks == 1 or p.sizes is not None or p.pad:
        return None
    o, _ = _map_dim(in_shape, out_shape, p.dim, 1)  # the first factor of the fused dim
    return o if o is not None and same_size(out_shape[o], p.chunks) and not same_size(in_shape[p.dim], p.chunks) else None


def _size_args(node):
    """(container, index offset) of the size list of a view-like call, as in ``view(*sizes)``."""
    t = node.target
    if t in ("view", "reshape", "expand", torch.reshape):
        first = 1
        if len(node.args) == first + 1 and isinstance(node.args[first], (tuple, list)):
            return "tuple", first
        return "varargs", first
    return None, None


def view_like(node, ctx) -> NodeInfo:
    """``view``/``reshape``/``flatten``/``unflatten``/``(un)squeeze``/``expand``: the shard moves
    onto the out dim it becomes (C -> (heads, head_dim) shards heads); literal sizes of that
    dim are rewritten to local sizes (``view(B, T, 12, 64)`` -> ``view(B, T, 12 // tp, 64)``)."""
    x = node.args[0]
    p = ctx.pl(x)
    if isinstance(p, Partial) and node.target != "expand" and node.target not in (torch.view_as_complex, torch.view_as_real):
        return NodeInfo(P, {x: P}, "view")  # the same elements: a pending sum stays pending
    if isinstance(p, ExpertRows) and node.target != "expand" and value(node).dim() >= 1 \
            and same_size(shape(node)[0], shape(x)[0]):
        return NodeInfo(p, {x: p}, "view")  # rows stay rows: this rank's expert rows
    if not isinstance(p, Shard):
        return NodeInfo(R, {x: R}, "view")
    in_shape, out_shape = shape(x), shape(node)
    one_head = False
    need = p
    pk = _pieces_dim(in_shape, out_shape, p) if node.target != "expand" else None
    if pk is not None:
        # (k * C) -> (k, heads, hd): the k fused pieces become a dim of their own, whole on every
        # rank (a rank's [q_r, k_r, v_r] is its slice of each piece), and each piece's shard lands
        # where a plain C would put it: a plain shard on heads (ViT's fused qkv)
        piece = (*in_shape[:p.dim], in_shape[p.dim] // p.chunks, *in_shape[p.dim + 1:])
        in_shape, out_shape, p = piece, (*out_shape[:pk], *out_shape[pk + 1:]), Shard(p.dim)
    if node.target == "expand":
        o = p.dim + len(out_shape) - len(in_shape)
        ok = True
    elif p.chunks > 1:
        # a fused piece-wise shard survives only a reshape that leaves its dim alone
        o, ok = _map_dim(in_shape, out_shape, p.dim, ctx.tp)
        ok = ok and o is not None and same_size(out_shape[o], in_shape[p.dim]) \
            and numel_expr(in_shape[p.dim:]) == numel_expr(out_shape[o:])
    elif p.copies and p.split_over(ctx.tp) == 1:
        # one kv head held by every rank (MQA): its shard stays on the head dim, of size 1
        o = _factor_run(in_shape, out_shape, p.dim)
        ok = o is not None and o < len(out_shape) and numel_expr(in_shape[p.dim:]) == numel_expr(out_shape[o:])
    else:
        o, ok = _map_dim(in_shape, out_shape, p.dim, p.split_over(ctx.tp))  # kv copies: tp / m blocks
        # C -> (1, head_dim) may be one head (MQA): its shard then lands on head_dim, which attention
        # contracts. Said to the plan (plan._indivisible_heads keeps k/v whole when a sibling q projection
        # has heads that split); the same shapes are a one-token ``(B*T, C) -> (B, 1, C)``, so the
        # shard itself goes on (it is the same split of the same elements either way)
        one_head = node.target in ("view", "reshape", torch.reshape) and _one_head(in_shape, out_shape, p.dim)
    if pk is not None and o is not None:
        o, out_shape = o + (o >= pk), shape(node)  # back to the reshape's own dims
    if p.pad and o is not None and p.chunks == 1:
        ok = static_size(out_shape[o]) is not None  # a padded vocabulary: ranks hold ceil(n / tp)
    if o is None or not ok:
        size = out_shape[o] if o is not None else None
        return NodeInfo(R, {x: R}, "view", {"unsplittable": (p, size)})
    new_sizes = {}
    form, first = _size_args(node)
    if form is not None:
        sizes = node.args[first] if form == "tuple" else node.args[first:]
        lit = sizes[o]
        full = static_size(out_shape[o])
        if isinstance(lit, int) and lit == full:
            new_sizes[o] = p.local(full, ctx.tp)
        elif isinstance(lit, int) and lit == -1:
            pass
        else:
            return NodeInfo(R, {x: R}, "view", {"unsplittable": (p, out_shape[o])})
    elif node.target in ("unflatten", torch.unflatten):
        dim = norm_dim(node.args[1], len(in_shape))
        sizes = node.args[2]
        if dim <= o < dim + len(sizes):
            k = o - dim
            if sizes[k] != -1:
                new_sizes[("unflatten", k)] = p.local(sizes[k], ctx.tp)
    extra = {"sizes": new_sizes}
    if one_head:
        extra["one_head"] = True
    return NodeInfo(p.moved(o), {x: need}, "view", extra)


def transpose(node, ctx) -> NodeInfo:
    x = node.args[0]
    p = ctx.pl(x)
    if not isinstance(p, Shard):
        return NodeInfo(R, {x: R}, "pointwise")
    nd = value(x).dim()
    if node.target in ("t", torch.t):
        perm = list(range(nd))[::-1] if nd == 2 else list(range(nd))
    elif node.target in ("permute", torch.permute):
        dims = node.args[1] if isinstance(node.args[1], (tuple, list)) else node.args[1:]
        perm = [norm_dim(d, nd) for d in dims]
    else:  # transpose / swapaxes
        a, b = norm_dim(node.args[1], nd), norm_dim(node.args[2], nd)
        perm = list(range(nd))
        perm[a], perm[b] = perm[b], perm[a]
    return NodeInfo(p.moved(perm.index(p.dim)), {x: p}, "pointwise")


def getitem(node, ctx) -> NodeInfo:
    src, idx = node.args
    srcp = ctx.place.get(src)
    if isinstance(srcp, tuple):  # picking one output of split / chunk / unbind
        return NodeInfo(srcp[idx], {}, "pointwise")
    p = ctx.pl(src)
    items = list(idx) if isinstance(idx, tuple) else [idx]
    index_nodes = [i for i in items if isinstance(i, fx.Node)]
    if is_tensor(src) and isinstance(p, Partial) and is_tensor(node) and _no_bigger(node, src):
        # picking rows of a pending sum (MoE's un-permute ``out[inv_perm]``) is linear in it
        return NodeInfo(P, {src: P, **{i: R for i in index_nodes if is_tensor(i)}}, "pointwise")
    if isinstance(p, ExpertRows) and is_tensor(node) and not index_nodes and _keeps_rows(items, value(src).dim()):
        return NodeInfo(p, {src: p}, "pointwise")  # ``[..., ::2]``: columns of this rank's expert rows
    if not is_tensor(src) or not isinstance(p, Shard):
        return _replicate_all(node, ctx, "pointwise")
    nd = value(src).dim()
    if any(isinstance(i, fx.Node) for i in items):
        return _replicate_all(node, ctx, "fallback")
    if Ellipsis in items:
        k = items.index(Ellipsis)
        used = sum(1 for i in items if i is not None and i is not Ellipsis)
        items = items[:k] + [slice(None)] * (nd - used) + items[k + 1:]
    in_d = out_d = 0
    for i in items:
        if i is None:
            out_d += 1
            continue
        if in_d == p.dim:
            if i == slice(None) or _whole_strides(i, shape(src)[p.dim], p, ctx.tp):
                return NodeInfo(p.moved(out_d), {src: p}, "pointwise")
            return _replicate_all(node, ctx, "fallback")
        in_d += 1
        out_d += 0 if isinstance(i, int) else 1
    return NodeInfo(p.moved(out_d + (p.dim - in_d)), {src: p}, "pointwise")


def _keeps_rows(items: list, nd: int) -> bool:
    """An index of constants (slices, ints) that leaves dim 0 whole and in place."""
    if None in items or not items:
        return False
    first = items[0]
    if first is Ellipsis:
        return len([i for i in items if i is not Ellipsis]) < nd
    return first == slice(None)


def _whole_strides(i, size, p: Shard, tp: int) -> bool:
    """``x[..., j::k]`` (j < k) on a plain shard whose every rank holds whole groups of k (gpt-oss's interleaved
    gate / up, ``gate_up[..., ::2]`` and ``[..., 1::2]``): each rank's ``x_r[..., j::k]`` is its shard of the
    result, the same slice taken locally."""
    n = static_size(size)
    return isinstance(i, slice) and isinstance(i.step, int) and i.step > 1 and i.stop is None \
        and (i.start or 0) in range(i.step) and p.plain and n is not None and n % (i.step * tp) == 0


def split(node, ctx) -> NodeInfo:
    """``split``/``chunk``/``unbind`` along an unsharded dim keep the shard in every piece. A split of
    a ``chunks=k`` shard into its k pieces gives k plain shards (fused QKV / gate-up)."""
    x = node.args[0]
    p = ctx.pl(x)
    n = len(value(node))
    if not isinstance(p, (Shard, ExpertRows)):
        return NodeInfo(tuple(R for _ in range(n)), {x: R}, "split")
    nd = value(x).dim()
    unbind = node.target in ("unbind", torch.unbind)
    dim = norm_dim(_arg(node, 1, "dim", 0) if unbind else _arg(node, 2, "dim", 0), nd)
    if isinstance(p, ExpertRows):  # gate, up = gate_up.chunk(2, -1): the same rows in each
        return NodeInfo(tuple(p if dim != 0 else R for _ in range(n)), {x: p if dim != 0 else R}, "split")
    if dim != p.dim:
        o = p.dim - (1 if unbind and dim < p.dim else 0)
        return NodeInfo(tuple(p.moved(o) for _ in range(n)), {x: p}, "split")
    piece_sizes = tuple(int(v.shape[dim]) for v in value(node))
    if p.chunks == n and (len(set(piece_sizes)) == 1 if p.sizes is None else p.sizes == piece_sizes):
        outs = tuple(Shard(dim, copies=(c,) if c > 1 else None) for c in p.piece_copies())  # k, v: their copies
        return NodeInfo(outs, {x: p}, "split", {"local_split": True})
    extra = {}
    odd = [s for s in piece_sizes if s % ctx.tp]
    if odd and p.plain and x.target in ("view", "reshape", torch.reshape) and value(x).dim() > value(x.args[0]).dim():
        # heads viewed out of a projection, then split into pieces tp does not divide (litgpt's per-group
        # qkv ``view(B, T, groups, q + 2, hd).split((q, 1, 1), 3)`` with fewer groups than tp): heads tp
        # does not divide, planned as such (``plan._indivisible_heads``), not an op with no rule
        extra["unsplittable"] = (p, min(odd))
    return NodeInfo(tuple(R for _ in range(n)), {x: R}, "fallback", extra)


def cat(node, ctx) -> NodeInfo:
    xs = node.args[0]
    nd = value(node).dim()
    dim = norm_dim(_arg(node, 1, "dim", 0), nd)
    stack = node.target in (torch.stack,)
    # ``cat`` skips 1-D empty tensors (a fresh KV cache is ``torch.tensor([])``): they stay as they are
    empty = set() if stack else {x for x in xs if isinstance(x, fx.Node) and same_shape(shape(x), (0,))}
    pls = {ctx.pl(x) for x in xs if x not in empty}
    if len(pls) == 1:
        (p,) = pls
        if isinstance(p, Shard) and p.chunks == 1:
            if stack:
                return NodeInfo(Shard(p.dim + (1 if dim <= p.dim else 0)), {x: p for x in xs}, "pointwise")
            if p.dim != dim:
                return NodeInfo(p, {x: R if x in empty else p for x in xs}, "pointwise")
        elif isinstance(p, Replicate):
            return NodeInfo(R, {x: R for x in xs}, "pointwise")
    # a plain shard beside whole values, joined on another dim (MLA's key: head-sharded k_nope beside the
    # rotary k_pe every head shares, expanded over the heads): the whole ones are cut to this rank's slice
    shards = {ctx.pl(x) for x in xs if isinstance(ctx.pl(x), Shard)}
    if not stack and len(shards) == 1 and pls <= shards | {R}:
        (p,) = shards
        if p.chunks == 1 and p.plain and p.dim != dim:
            return NodeInfo(p, {x: R if x in empty else p for x in xs}, "pointwise")
    return _replicate_all(node, ctx, "fallback")


def _over_vocab(x, p, dim) -> bool:
    """``dim`` is the one sharded dim of ``x``, a vocabulary-like block per rank (plain or padded, no
    pieces, no kv copies), and ``x`` is a floating value needing no gradient (decode: the selection ops
    of the runtime have no backward)."""
    v = value(x)
    return isinstance(p, Shard) and p.dim == dim and p.chunks == 1 and not p.copies \
        and isinstance(v, torch.Tensor) and v.is_floating_point() and not v.requires_grad


def softmax(node, ctx) -> NodeInfo:
    """Over an unsharded dim: per shard. Over the vocabulary (a vocab-sharded, gradient-free value):
    the runtime's vocab-parallel softmax, one all-gather of (max, sum-exp) per row, output sharded."""
    x = node.args[0]
    p = ctx.pl(x)
    dim = norm_dim(_arg(node, 1, "dim"), value(x).dim())
    if isinstance(p, Shard) and p.dim != dim:
        return NodeInfo(p, {x: p}, "pointwise")
    if _over_vocab(x, p, dim) and _arg(node, 3 if node.target in (F.softmax, F.log_softmax) else 2, "dtype") is None:
        form = "log_softmax" if node.target in ("log_softmax", F.log_softmax, torch.log_softmax) else "softmax"
        return NodeInfo(p, {x: p}, "vocab_select", {"op": form, "dim": dim})
    return _replicate_all(node, ctx, "fallback" if isinstance(p, Shard) else "replicate")


_SELECT = {"argmax": "argmax", torch.argmax: "argmax", "max": "max", torch.max: "max", "min": "min", torch.min: "min",
           "topk": "topk", torch.topk: "topk"}


def select(node, ctx) -> NodeInfo:
    """``argmax`` / ``max(dim)`` / ``min(dim)`` / ``topk`` (greedy and top-k sampling on logits; attention
    sinks' ``max`` over the keys of head-sharded scores).

    Over the vocabulary of a vocab-sharded, gradient-free value (the column-parallel LM head's
    output at decode): the runtime's vocab-parallel selection, each rank's own candidates and one
    all-gather of (value, index) pairs per row; the output is whole on every rank. Over an unsharded
    dim: per shard. ``torch.max(a, b)`` is elementwise; ``max()`` / ``argmax()`` with no dim reduce
    every dim: made whole first."""
    x = node.args[0]
    op = _SELECT[node.target]
    if op in ("max", "min") and isinstance(_arg(node, 1, "dim"), fx.Node):
        return pointwise(node, ctx)  # torch.max(a, b)
    p = ctx.pl(x)
    dim = _arg(node, 2, "dim", -1) if op == "topk" else _arg(node, 1, "dim")
    multi = isinstance(value(node), (tuple, list))
    if not isinstance(p, Shard) or not isinstance(dim, int):
        return _replicate_all(node, ctx, "fallback" if isinstance(p, Shard) else "replicate")
    nd = value(x).dim()
    dim = norm_dim(dim, nd)
    keep = op == "topk" or _arg(node, 2, "keepdim", False)
    if p.dim != dim:
        o = p.moved(p.dim if keep or dim > p.dim else p.dim - 1)
        return NodeInfo((o, o) if multi else o, {x: p}, "pointwise")
    k = _arg(node, 1, "k") if op == "topk" else None
    if op != "min" and _over_vocab(x, p, dim) and (op != "topk" or (isinstance(k, int) and isinstance(_arg(node, 3, "largest", True), bool))):
        extra = {"op": op, "dim": dim, "keepdim": bool(keep), "k": k, "largest": _arg(node, 3, "largest", True)}
        return NodeInfo((R, R) if multi else R, {x: p}, "vocab_select", extra)
    return _replicate_all(node, ctx, "fallback")


_LIKE = {torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like}
_RANDOM_LIKE = {torch.rand_like, torch.randn_like}
_RANDOM_FILLS = ("exponential_", "uniform_", "normal_", "bernoulli_", "geometric_", "log_normal_", "cauchy_")


def like(node, ctx) -> NodeInfo:
    """``empty_like`` / ``zeros_like`` / ... / ``rand_like``: a new value of its input's layout (only
    the shape is read; of a pending sum, a whole one). Random ones on a shard draw the whole tensor
    and keep this rank's slice (``runtime.random``): single device's draw, streams in step."""
    x = node.args[0]
    p = ctx.pl(x)
    if isinstance(p, Partial):
        return NodeInfo(R, {x: P}, "pointwise")
    if not isinstance(p, Shard):
        return NodeInfo(R, {x: R}, "pointwise")
    if node.target in _RANDOM_LIKE:
        if p.chunks == 1 and not p.copies:
            return NodeInfo(p, {x: p}, "sharded_random", {"dim": p.dim})
        return _replicate_all(node, ctx, "fallback")
    return NodeInfo(p, {x: p}, "pointwise")


def random_fill(node, ctx) -> NodeInfo:
    """``x.exponential_(1)`` and the other in-place random fills: on a one-block shard (plain or padded:
    a vocabulary), the whole tensor is drawn and this rank's slice kept, as for ``rand_like``; a pending
    sum is made whole first (every value is overwritten, whole on every rank)."""
    x = node.args[0]
    p = ctx.pl(x)
    if any(isinstance(a, fx.Node) for a in [*node.args[1:], *node.kwargs.values()]):
        return _replicate_all(node, ctx, "fallback" if isinstance(p, Shard) else "replicate")
    if isinstance(p, Shard) and p.chunks == 1 and not p.copies:
        return NodeInfo(p, {x: p}, "sharded_random", {"dim": p.dim})
    return _replicate_all(node, ctx, "fallback" if isinstance(p, Shard) else "replicate")


_SUMS = {"sum": False, torch.sum: False, "mean": True, torch.mean: True}  # target -> is a mean


def reduction(node, ctx) -> NodeInfo:
    """Reductions over unsharded dims keep the shard (``x.pow(2).mean(-1)`` on batch shards).

    A sum or mean over the sharded dim is a local sum (a mean: the local mean / tp) whose sum
    over ranks is the answer: ``Partial``, reduced where a consumer needs it whole (one
    all-reduce of the small result, where gathering the input would move all of it). The
    RMSNorm of a sharded q (OLMo-2's qk-norm) or of a hidden-sharded stream needs this.
    """
    x = node.args[0]
    p = ctx.pl(x)
    if isinstance(p, Partial) and node.target in _SUMS and is_tensor(node) and _arg(node, 3, "dtype") is None:
        return NodeInfo(P, {x: P}, "pointwise")  # a sum of pending sums (MoE's top-k combine)
    if not isinstance(p, Shard):
        return _replicate_all(node, ctx)
    nd = value(x).dim()
    dims = _arg(node, 1, "dim")
    dims = list(range(nd)) if dims is None else [norm_dim(d, nd) for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
    keep = _arg(node, 2, "keepdim", False)
    if p.dim in dims and node.target in _SUMS and p.plain and is_tensor(node) \
            and _arg(node, 3, "dtype") is None:
        return NodeInfo(Partial(), {x: p}, "partial_sum", {"mean": _SUMS[node.target]})
    if node.target in ("logsumexp", torch.logsumexp) and dims == [p.dim] and _over_vocab(x, p, p.dim):
        return NodeInfo(R, {x: p}, "vocab_select", {"op": "logsumexp", "dim": p.dim, "keepdim": bool(keep)})
    if p.dim in dims or not is_tensor(node):
        return _replicate_all(node, ctx, "fallback")
    o = p.dim if keep else p.dim - sum(d < p.dim for d in dims)
    return NodeInfo(p.moved(o), {x: p}, "pointwise")


def matmul(node, ctx) -> NodeInfo:
    """Batched matmul (attention scores, ``attn @ v``): a shard on a batch dim of both sides stays."""
    a, b = node.args[:2]
    pa, pb = ctx.pl(a), ctx.pl(b)
    na, nb = value(a).dim(), value(b).dim()
    out_nd = value(node).dim()
    if isinstance(pa, Shard) and pa.dim < na - 2:
        o = pa.dim + out_nd - na
        db = o - (out_nd - nb)
        need_b = R if db < 0 or same_size(shape(b)[db], 1) else Shard(db)
        return NodeInfo(Shard(o), {a: pa, b: need_b}, "pointwise")
    if isinstance(pb, Shard) and pb.dim < nb - 2:
        o = pb.dim + out_nd - nb
        da = o - (out_nd - na)
        need_a = R if da < 0 or same_size(shape(a)[da], 1) else Shard(da)
        return NodeInfo(Shard(o), {a: need_a, b: pb}, "pointwise")
    return _replicate_all(node, ctx, "fallback" if isinstance(pa, Shard) or isinstance(pb, Shard) else "replicate")


def _einsum_labels(node) -> tuple[list, str] | None:
    """(per operand its labels, one per dim; the output's labels) of ``torch.einsum(eq, *ops)``.
    An ellipsis becomes one label per dim it covers, aligned from the right (broadcasting)."""
    eq, ops = node.args[0], list(node.args[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if not isinstance(eq, str) or node.kwargs or not all(is_tensor(o) for o in ops):
        return None
    lhs, arrow, out = eq.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ops):
        return None
    n_ell = max((value(o).dim() - len(t.replace("...", "")) for o, t in zip(ops, terms) if "..." in t), default=0)
    ell = [chr(0x2460 + i) for i in range(n_ell)]  # labels no equation uses
    labels = []
    for o, t in zip(ops, terms):
        k = value(o).dim() - len(t.replace("...", ""))
        a, _, b = t.partition("...")
        labels.append(list(a) + (ell[n_ell - k:] if "..." in t else []) + list(b))
    if not arrow:  # implicit output: the ellipsis, then the labels used once, sorted
        once = sorted(c for c in set(lhs) if c.isalpha() and lhs.count(c) == 1)
        out_labels = ell + once
    else:
        a, _, b = out.partition("...")
        out_labels = list(a) + (ell if "..." in out else []) + list(b)
    if any(len(ls) != value(o).dim() for ls, o in zip(labels, ops)):
        return None
    return list(zip(ops, labels)), out_labels


def einsum(node, ctx) -> NodeInfo:
    """``torch.einsum`` whose operands are sharded on a label kept in the output (a batch-like
    label: the heads of ``'bhqd,bhkd->bhqk'``): a batched contraction, computed per shard. Every
    operand with that label takes the same shard (a size-1 dim broadcasts: replicated), the
    others stay whole; the output is sharded on the label. A shard on a contracted label is
    gathered (no rule yet)."""
    parsed = _einsum_labels(node)
    sh = [(x, p) for x, p in _sharded(ctx, node) if p.plain]
    if parsed is None or not sh:
        return _replicate_all(node, ctx, "fallback" if _sharded(ctx, node) else "replicate")
    ops, out_labels = parsed
    x0, s0 = sh[0]
    label = dict(ops)[x0][s0.dim]
    if label not in out_labels:
        return _replicate_all(node, ctx, "fallback")
    need = {}
    for x, ls in ops:
        d = ls.index(label) if label in ls else None
        need[x] = R if d is None or shape(x)[d] == 1 else Shard(d)
    return NodeInfo(Shard(out_labels.index(label)), need, "pointwise")


def sdpa(node, ctx) -> NodeInfo:
    """Attention on head-sharded q/k/v stays head-sharded; a mask follows by broadcasting.
    The rewrite (kind ``sdpa``) handles GQA with fewer kv heads than tp and SDPA's own dropout."""
    q, k, v = node.args[:3]
    pq = ctx.pl(q)
    nd = value(q).dim()
    if not isinstance(pq, Shard) or pq.dim >= nd - 2:
        return _replicate_all(node, ctx, "fallback" if isinstance(pq, Shard) else "replicate")
    need = {q: pq, k: Shard(pq.dim), v: Shard(pq.dim)}
    extra = {"dim": pq.dim, "q_heads": int(shape(q)[pq.dim]), "gqa": False}
    gqa = node.kwargs.get("enable_gqa", False) and int(shape(k)[pq.dim]) != int(shape(q)[pq.dim])
    pk = ctx.pl(k)
    if gqa and isinstance(pk, Shard) and pk.dim == pq.dim and pk.copies and ctx.pl(v) == pk and pq.plain \
            and int(shape(k)[pq.dim]) * pk.copies[0] == ctx.tp:
        # kv-head copies: each rank holds the one kv head its query heads use, SDPA's GQA runs locally
        need[k] = need[v] = pk
    elif gqa and not isinstance(pk, Shard) and int(shape(k)[pq.dim]) % ctx.tp:
        # SDPA's own GQA with fewer kv heads than tp (k/v projections kept whole): each rank
        # takes the kv heads of its own query heads (see rewrite ``kv_for_rank``)
        need[k] = need[v] = R
        extra["gqa"] = True
    mask = _arg(node, 3, "attn_mask")
    if isinstance(mask, fx.Node):
        md = pq.dim - (nd - value(mask).dim())
        need[mask] = R if md < 0 or same_size(shape(mask)[md], 1) else Shard(md)
    return NodeInfo(Shard(pq.dim), need, "sdpa", extra)


def layer_norm(node, ctx) -> NodeInfo:
    x = node.args[0]
    p = ctx.pl(x)
    k = len(_arg(node, 1, "normalized_shape"))
    need = {w: R for w in _tensors(node) if w is not x}
    if isinstance(p, Shard) and p.dim < value(x).dim() - k:
        need[x] = p
        return NodeInfo(p, need, "pointwise")
    need[x] = R
    return NodeInfo(R, need, "fallback" if isinstance(p, Shard) else "replicate")


def linear(node, ctx) -> NodeInfo:
    """``linear(x, W, b)``; the plan says how W is laid out.

    colwise: W split on out-features. x must be whole; the output is sharded on its last dim.
    rowwise: W split on in-features. x must be sharded on its last dim; the local products are
             summed across ranks (all-reduce), then the bias is added once.
    replicate: shards of x on batch dims pass through.
    """
    x, w = node.args[:2]
    b = _arg(node, 2, "bias")
    nd = value(x).dim()
    px = ctx.pl(x)
    style = ctx.style_of(node, px)
    od = weight_out_dim(node)  # [out, in] (nn.Linear) or [in, out] (Conv1D, x @ W)
    need = {}
    if style == "colwise":
        c = ctx.chunks_of(node)  # k equal pieces, or a tuple of unequal piece sizes
        chunks, sizes = (len(c), tuple(c)) if isinstance(c, tuple) else (c, None)
        pad = chunks == 1 and int(shape(w)[od]) % ctx.tp != 0  # allowed for a vocabulary only (plan checks)
        need[x] = R
        need[w] = Shard(od, chunks, pad, sizes)
        if isinstance(b, fx.Node):
            need[b] = Shard(0, chunks, pad, sizes)
        return NodeInfo(Shard(value(node).dim() - 1, chunks, pad, sizes), need, "colwise")
    if style == "kvcopy":
        # k / v of grouped-query attention with fewer kv heads than tp: W stays whole (stored replicated);
        # the program takes the rows of this rank's kv head (rewrite: take_rows). Pieces [q | k | v]: q split
        # plainly, the narrower k, v pieces as copies
        c, m = ctx.chunks_of(node), ctx.copies_of(node)
        chunks, sizes = (len(c), tuple(c)) if isinstance(c, tuple) else (c, None)
        copies = tuple(m if s < max(sizes) else 1 for s in sizes) if sizes else (m,) * chunks
        place = Shard(od, chunks, False, sizes, copies)
        need[x], need[w] = R, place
        if isinstance(b, fx.Node):
            need[b] = place.moved(0)
        return NodeInfo(place.moved(value(node).dim() - 1), need, "kvcopy")
    if style == "rowwise":
        need[x] = Shard(nd - 1)
        need[w] = Shard(1 - od)
        if isinstance(b, fx.Node):
            need[b] = R
        elif node in ctx.pending:  # a shared expert: its sum is reduced with the routed experts' (one all-reduce)
            return NodeInfo(P, need, "rowwise", {"pending": True})
        return NodeInfo(R, need, "rowwise")
    need[w] = R
    if isinstance(b, fx.Node):
        need[b] = R
    if isinstance(px, Shard) and px.dim < nd - 1:
        need[x] = px
        return NodeInfo(px, need, "replicate")
    need[x] = R
    return NodeInfo(R, need, "fallback" if isinstance(px, Shard) else "replicate")


def grouped_linear(node, ctx) -> NodeInfo:
    """``grouped_linear(x, W, route, form, out_dim)`` (``passes/normalize.py``): a linear per expert of
    the 3-D weight ``W``; the plan lays ``W`` out as for a linear, every expert at once.

    colwise: each expert's out-features split (W on ``out_dim``, fused gate|up as pieces); x whole,
             the output sharded on its last dim. The routing (``route``) is whole on every rank.
    rowwise: each expert's in-features split; x sharded on its last dim; the output is a pending
             sum (Partial), reduced once after the weighted combine, where the model needs it whole.
    """
    x, w, route = node.args[:3]
    od, idim = weight_out_dim(node), weight_in_dim(node)
    style = ctx.style_of(node, ctx.pl(x))
    if style == "expert":
        # expert parallelism: W split on its expert dim (whole experts per rank); each rank computes the
        # rows routed to its experts (runtime/expert_parallel.py). Tokens whole in: the rows come out as
        # this rank's (ExpertRows); those rows in (the second matmul of the pair): a pending sum out, zero
        # off this rank's rows, reduced once after the weighted combine as with expert-TP
        n_local = int(shape(w)[0]) // ctx.tp
        rows = ExpertRows(route, node.args[3], n_local)
        if ctx.pl(x) == rows:
            return NodeInfo(P, {x: rows, w: Shard(0), route: R}, "expert_combine", {"n_local": n_local})
        return NodeInfo(rows, {x: R, w: Shard(0), route: R}, "expert_dispatch", {"n_local": n_local})
    if style == "colwise":
        c = ctx.chunks_of(node)
        chunks, sizes = (len(c), tuple(c)) if isinstance(c, tuple) else (c, None)
        return NodeInfo(Shard(1, chunks, False, sizes), {x: R, w: Shard(od, chunks, False, sizes), route: R}, "colwise",
                        {"grouped": True})
    if style == "rowwise":
        return NodeInfo(P, {x: Shard(1), w: Shard(idim), route: R}, "expert_rowwise")
    return NodeInfo(R, {x: R, w: R, route: R}, "replicate")


def embedding(node, ctx) -> NodeInfo:
    """vocab: the table split on its rows, a masked local lookup summed over ranks (rewrite).
    colwise: the table split on its columns; each rank looks up its own, the output is sharded
    on its last dim (no communication). replicate: a shard of the indices passes through."""
    idx, w = node.args[:2]
    style = ctx.style_of(node, ctx.pl(idx))
    if style == "vocab":
        return NodeInfo(R, {idx: R, w: Shard(0, 1, int(shape(w)[0]) % ctx.tp != 0)}, "vocab")
    if style == "colwise":
        return NodeInfo(Shard(value(node).dim() - 1), {idx: R, w: Shard(1)}, "column_embedding")
    p = ctx.pl(idx)
    p = p if isinstance(p, Shard) else R
    return NodeInfo(p, {idx: p, w: R}, "replicate")


def cross_entropy(node, ctx) -> NodeInfo:
    """``F.cross_entropy`` on logits sharded over the class dim becomes the vocab-parallel loss:
    the logits are never gathered."""
    x, target = node.args[:2]
    p = ctx.pl(x)
    class_dim = 0 if value(x).dim() == 1 else 1
    plain = _arg(node, 2, "weight") is None and _arg(node, 3, "size_average") is None and _arg(node, 5, "reduce") is None
    if isinstance(p, Shard) and p.dim == class_dim and p.chunks == 1 and plain:
        return NodeInfo(R, {x: p, target: R}, "vocab_ce")
    return _replicate_all(node, ctx, "fallback" if isinstance(p, Shard) else "replicate")


def output(node, ctx) -> NodeInfo:
    return NodeInfo(None, {x: R for x in _tensors(node)}, "output")


def no_tensor_in(node, ctx) -> NodeInfo:
    """Factories (``arange``, ``ones``, ...) and scalar maths: replicated by construction."""
    return _replicate_all(node, ctx)


_POINTWISE_FNS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow, operator.neg,
    operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.and_, operator.or_,
    operator.invert, operator.iadd, operator.imul, operator.isub, operator.itruediv, operator.mod,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.exp, torch.log, torch.tanh, torch.sigmoid,
    torch.rsqrt, torch.sqrt, torch.pow, torch.where, torch.abs, torch.sin, torch.cos, torch.erf, torch.clamp,
    torch.masked_fill, torch.maximum, torch.minimum, torch.logical_not, torch.square, torch.reciprocal,
    F.gelu, F.silu, F.relu, F.sigmoid, F.tanh, F.softplus, F.leaky_relu, F.elu, F.mish, F.hardtanh, F.relu6,
    torch._C._nn.gelu, torch.relu, torch.exp2, torch.log1p, torch.expm1,
]
_POINTWISE_METHODS = [
    "add", "sub", "mul", "div", "neg", "exp", "log", "tanh", "sigmoid", "rsqrt", "sqrt", "pow", "abs", "sin",
    "cos", "masked_fill", "masked_fill_", "clamp", "relu", "add_", "mul_", "sub_", "div_", "__and__", "__or__",
    "eq", "ne", "lt", "le", "gt", "ge", "square", "reciprocal", "where", "logical_not", "erf", "maximum", "minimum",
    "sign", "log1p", "expm1",
]
_UNARY = [
    "float", "half", "bfloat16", "double", "int", "long", "bool", "to", "type", "type_as", "contiguous", "clone",
    "detach", torch.clone, "requires_grad_",
]

def repeat_interleave(node, ctx) -> NodeInfo:
    """``k.repeat_interleave(n_rep, dim=heads)`` (GQA): each rank repeats its own kv heads, which
    are exactly the ones its query heads use; any other dim keeps the shard as well."""
    x = node.args[0]
    p = ctx.pl(x)
    repeats, dim = _arg(node, 1, "repeats"), _arg(node, 2, "dim")
    if isinstance(p, Shard) and isinstance(repeats, int) and dim is not None and p.chunks == 1 and not p.pad:
        return NodeInfo(p, {x: p}, "pointwise")
    return _replicate_all(node, ctx, "fallback" if isinstance(p, Shard) else "replicate")


def size_of(node, ctx) -> NodeInfo:
    """``x.size(d)`` / ``aten.sym_size.int(x, d)`` (a symbolic size, e.g. from the einops rewrite in
    ``passes/normalize.py``): the logical size of an unsharded dim is the local one, read from the
    shard as it is; reading the sharded dim needs x whole."""
    x = node.args[0]
    p = ctx.pl(x)
    d = _arg(node, 1, "dim")
    if node.target in ("numel", torch.numel) or (isinstance(p, Shard) and d is not None
                                                   and norm_dim(d, value(x).dim()) == p.dim):
        if isinstance(p, Shard) and not p.pad:  # every rank holds 1/tp of the dim: local size * tp
            return NodeInfo(None, {x: p}, "sharded_size")
    if isinstance(p, Shard) and (d is None or norm_dim(d, value(x).dim()) == p.dim):
        return NodeInfo(None, {x: R}, "fallback")
    return NodeInfo(None, {}, "pointwise")


@dataclass(frozen=True)
class DropoutCall:
    """A dropout call's arguments, read in one place for every spelling (their defaults and
    argument orders differ). ``mask_dims``: 0 for an elementwise mask; k for a feature dropout,
    whose mask spans the first k dims of the input and is 1 (broadcast) on the others."""

    p: float
    training: bool
    inplace: bool
    mask_dims: int
    alpha: bool


# target -> (mask dims given the input's ndim, alpha, in-place (None: an argument), default training).
# F.dropout1d / 3d add a batch dim to unbatched inputs; F.dropout2d treats 3-D input as (N, C, L).
_DROPOUTS = {
    F.dropout: (lambda nd: 0, False, None, True),
    F.dropout1d: (lambda nd: 2 if nd == 3 else 1, False, None, True),
    F.dropout2d: (lambda nd: 2, False, None, True),
    F.dropout3d: (lambda nd: 2 if nd == 5 else 1, False, None, True),
    F.alpha_dropout: (lambda nd: 0, True, None, False),
    F.feature_alpha_dropout: (lambda nd: 2, True, None, False),
    torch.dropout: (lambda nd: 0, False, False, None),
    torch.dropout_: (lambda nd: 0, False, True, None),
    torch.feature_dropout: (lambda nd: 2, False, False, None),
    torch.feature_dropout_: (lambda nd: 2, False, True, None),
    torch.alpha_dropout: (lambda nd: 0, True, False, None),
    torch.alpha_dropout_: (lambda nd: 0, True, True, None),
    torch.feature_alpha_dropout: (lambda nd: 2, True, False, None),
    torch.feature_alpha_dropout_: (lambda nd: 2, True, True, None),
}


def dropout_call(node: fx.Node) -> DropoutCall | None:
    """The arguments of a dropout node, or None where ``p`` / ``training`` are not constants."""
    mask_dims, alpha, inplace, default_training = _DROPOUTS[node.target]
    if default_training is None:  # torch.dropout(input, p, train)
        p, training = _arg(node, 1, "p"), _arg(node, 2, "train")
    else:
        p, training = _arg(node, 1, "p", 0.5), _arg(node, 2, "training", default_training)
        inplace = _arg(node, 3, "inplace", False)
    if not isinstance(p, (int, float)) or not isinstance(training, bool) or not isinstance(inplace, bool):
        return None
    return DropoutCall(float(p), training, inplace, mask_dims(value(node.args[0]).dim()), alpha)


# ops that draw from the RNG (besides dropouts and SDPA's dropout_p)
_RANDOM = {torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like, torch.randint_like,
           torch.bernoulli, torch.multinomial, torch.normal, torch.randperm, torch.poisson, "bernoulli", "bernoulli_",
           "uniform_", "normal_", "exponential_", "geometric_", "log_normal_", "cauchy_", "random_", "multinomial"}


def draws_random(node: fx.Node) -> bool:
    """Whether ``node`` draws random numbers: a dropout in training with p > 0 (or p / training not
    constants), SDPA with ``dropout_p > 0``, ``torch.rand`` and kin. A compile region that draws
    is inlined (``pipeline._regions``): whether Inductor's RNG gives each call of a reused region
    fresh draws is not checked."""
    t = node.target if node.op in ("call_function", "call_method") else None
    if t in _DROPOUTS:
        call = dropout_call(node)
        return call is None or (call.training and call.p > 0)
    if t is torch._C._nn.scaled_dot_product_attention:
        p = _arg(node, 4, "dropout_p", 0.0)
        return not isinstance(p, (int, float)) or p > 0
    try:
        return t in _RANDOM
    except TypeError:  # an unhashable target
        return False


def dropout(node, ctx) -> NodeInfo:
    """Dropout keeps its input's placement. On a plain shard it becomes the runtime's
    ``sharded_dropout``: every rank draws the whole tensor's mask, as single device does, and
    keeps its slice (independent masks per rank, RNG streams in step). A shard it cannot slice
    that way (fused pieces, padding, a non-constant ``p``) is gathered first."""
    x = node.args[0]
    p = ctx.pl(x)
    call = dropout_call(node)
    if call is not None and (not call.training or call.p == 0):
        return unary(node, ctx)  # the identity
    if isinstance(p, Shard):
        if p.plain and call is not None:
            return NodeInfo(p, {x: p}, "dropout")
        return _replicate_all(node, ctx, "fallback")
    return unary(node, ctx)


@dataclass
class RMSNormCall:
    """An RMSNorm over the last dim of ``x``, in a spelling the rules know (``rms_norm_of``).

    ``out``: the normed value; ``nodes``: the ops from ``x`` to ``out`` (``out`` last), which
    nothing else reads; ``weight``: the node multiplied in (before any cast / offset), or None;
    ``form``: the same arithmetic in the same order, so a fused op can reproduce the spelling bitwise.
    """

    x: fx.Node
    out: fx.Node
    nodes: list
    weight: fx.Node | None
    form: NormForm
    weight_nodes: list = field(default_factory=list)  # the ``w.float()`` / ``1 + w`` ops the norm alone reads


_ADDS = (operator.add, torch.add, "add")
_MULS = (operator.mul, torch.mul, "mul")


def _only_user(n: fx.Node) -> fx.Node | None:
    return next(iter(n.users)) if len(n.users) == 1 else None


def _other(node: fx.Node, x: Any) -> Any:
    """The operand of a binary ``node`` that is not ``x`` (None unless exactly one is ``x``)."""
    a = list(node.args[:2])
    if len(a) != 2 or node.kwargs or (a[0] is x) == (a[1] is x):
        return None
    return a[1] if a[0] is x else a[0]


def _is_float32_cast(n: fx.Node, x: fx.Node) -> bool:
    return op_class(n) == "cast" and n.args[0] is x and value(n).dtype == torch.float32 \
        and same_shape(shape(n), shape(x))


def _weight_term(t: Any, width: Any) -> tuple | None:
    """``(w, offset, upcast, nodes)`` if ``t`` is ``w``, ``w.float()``, ``1 + w`` or ``1 + w.float()`` for a 1-D
    ``w`` of the normalized width (Gemma's ``1 + w``); else None."""
    if not isinstance(t, fx.Node) or not is_tensor(t):
        return None
    offset, nodes = 0.0, []
    if t.target in _ADDS and len(t.users) == 1 and not t.kwargs:
        consts = [a for a in t.args[:2] if isinstance(a, (int, float))]
        nodes = [a for a in t.args[:2] if isinstance(a, fx.Node)]
        if len(consts) != 1 or len(nodes) != 1 or consts[0] == 0:
            return None
        nodes, offset, t = [t], float(consts[0]), nodes[0]
    upcast = op_class(t) == "cast" and value(t).dtype == torch.float32 and len(t.users) == 1 \
        and isinstance(t.args[0], fx.Node) and same_shape(shape(t), shape(t.args[0]))
    w = t.args[0] if upcast else t
    if not is_tensor(w) or value(w).dim() != 1 or not same_size(shape(w)[0], width):
        return None
    return w, offset, upcast, nodes + ([t] if upcast else [])


def rms_norm_of(x: fx.Node) -> RMSNormCall | None:
    """The RMSNorm that ``x`` feeds, if it is one the rules know: ``torch.rms_norm`` over the last
    dim, or the hand-written ``x * rsqrt(mean(x^2, -1, keepdim) + eps)`` (optionally on ``x.float()``)
    followed by casts back to ``x``'s dtype and one multiply by ``w`` / ``w.float()`` / ``1 + w`` in
    any order (Llama's, Gemma's, T5's spellings). None otherwise, or when a step's value is read
    by anything outside the norm."""
    if not is_tensor(x):
        return None
    users = list(x.users)
    width = shape(x)[-1]
    for u in users:  # torch.rms_norm(x, (H,), w, eps)
        if op_class(u) == "norm" and u.target in (F.rms_norm, torch.rms_norm) and u.args[0] is x:
            ns, w, eps = _arg(u, 1, "normalized_shape"), _arg(u, 2, "weight"), _arg(u, 3, "eps")
            if len(ns) != 1 or not (eps is None or isinstance(eps, float)):
                return None
            eps = torch.finfo(value(x).dtype).eps if eps is None else eps
            return RMSNormCall(x, u, [u], w, NormForm(float(eps), aten=True))
    for xf in [u for u in users if _is_float32_cast(u, x)] + [x]:
        call = _hand_written_rms_norm(x, xf, width)
        if call is not None:
            return call
    return None


def _hand_written_rms_norm(x: fx.Node, xf: fx.Node, width: Any) -> RMSNormCall | None:
    """``rms_norm_of`` for ``xf * rsqrt(mean(xf^2, -1, keepdim) + eps)`` (``xf``: ``x`` or its float cast)."""
    sq = [u for u in xf.users if (u.target in ("pow", torch.pow) and u.args[0] is xf and _arg(u, 1, "exponent") == 2
                                  and len(u.args) == 2 and not u.kwargs)
          or (u.target in _MULS and u.args[:2] == (xf, xf) and not u.kwargs)
          or (u.target in ("square", torch.square) and u.args == (xf,))]
    if len(sq) != 1:
        return None
    mean = _only_user(sq[0])
    if mean is None or op_class(mean) != "reduction" or mean.target not in ("mean", torch.mean) \
            or _arg(mean, 3, "dtype") is not None or not _arg(mean, 2, "keepdim", False):
        return None
    dims = _arg(mean, 1, "dim")
    dims = dims if isinstance(dims, (tuple, list)) else [dims]
    if [norm_dim(d, value(xf).dim()) if isinstance(d, int) else None for d in dims] != [value(xf).dim() - 1]:
        return None
    add = _only_user(mean)
    eps = _other(add, mean) if add is not None and add.target in _ADDS else None
    if not isinstance(eps, float):
        return None
    rs = _only_user(add)
    if rs is None or rs.target not in (torch.rsqrt, "rsqrt") or rs.args != (add,) or rs.kwargs:
        return None
    y = _only_user(rs)
    if y is None or y.target not in _MULS or _other(y, rs) is not xf:
        return None
    if xf is not x and len(xf.users) != 2:  # the cast feeds the square and the multiply, nothing else
        return None
    nodes = ([xf] if xf is not x else []) + [sq[0], mean, add, rs, y]
    out, tail, weight, offset, w_up, w_nodes = y, "", None, 0.0, False, []
    while len(out.users) == 1 and len(tail) < 3:
        u = _only_user(out)
        if op_class(u) == "cast" and u.args[0] is out and value(u).dtype == value(x).dtype \
                and same_shape(shape(u), shape(out)) and (u.target != "type_as" or u.args[1] is x) \
                and all(not isinstance(a, fx.Node) or a is x for a in u.args[1:]) and not u.kwargs:
            tail += "c"
        elif u.target in _MULS and weight is None and (term := _weight_term(_other(u, out), width)) is not None:
            weight, offset, w_up, w_nodes = term
            tail += "w"
        else:
            break
        nodes.append(u)
        out = u
    return RMSNormCall(x, out, nodes, weight, NormForm(eps, False, xf is not x, tail, offset, w_up), w_nodes)


_FACTORIES = (torch.zeros, torch.empty, torch.full, torch.ones)


def _fresh_buffer(x: fx.Node, node: fx.Node, ctx) -> bool:
    """``x`` is a buffer this graph creates (``torch.zeros(B, H, L, hd)``: a static KV cache's lazy
    allocation) or a module buffer (a hand-written loop's ``k_cache``), and ``node`` its first use:
    it can be held as a shard instead (created so, or adopted by the backend)."""
    created = x.op == "call_function" and x.target in _FACTORIES
    return (created or x in ctx.buffers) and next(iter(x.users), None) is node


def index_copy(node, ctx) -> NodeInfo:
    """``cache.index_copy_(dim, positions, new)`` (a static KV cache written in place): with the new
    values sharded on another dim (heads), the cache holds the same shard and each rank writes
    its own heads. The cache must already be held so (state an earlier graph returned sharded),
    or be a buffer this graph creates for it (then created as a shard, ``extra["shard_buffer"]``);
    otherwise the new values are made whole and the whole cache written."""
    dest, idx, src = node.args[0], node.args[2], node.args[3]
    dim = norm_dim(node.args[1], value(dest).dim())
    pd, ps = ctx.pl(dest), ctx.pl(src)
    writes = {"writes": dest} if node.target != "index_copy" and node.target is not torch.index_copy else {}
    if isinstance(ps, Shard) and ps.dim != dim and ps.chunks == 1 and not ps.pad:
        if pd == ps:
            return NodeInfo(ps, {dest: ps, idx: R, src: ps}, "pointwise", writes)
        if isinstance(pd, Replicate) and _fresh_buffer(dest, node, ctx):
            return NodeInfo(ps, {dest: ps, idx: R, src: ps}, "pointwise", {"shard_buffer": dest, **writes})
    if isinstance(pd, Shard) and (pd.dim == dim or pd.chunks != 1 or pd.pad):
        from tpcompile.errors import TPShardingError

        from .graph_utils import source_line

        raise TPShardingError(
            f"tpcompile: `{node.name}` at {source_line(node)} writes along dim {dim} of a tensor sharded as {pd}: "
            f"the positions are global, each rank holds a slice. Keep the projections feeding it replicated "
            f"with plan={{...: 'replicate'}}.")
    p = pd if isinstance(pd, Shard) else R  # written in place: the cache keeps its placement
    return NodeInfo(p, {dest: p, idx: R, src: p}, "fallback" if isinstance(ps, Shard) or p != R else "replicate")


def setitem(node, ctx) -> NodeInfo:
    """``cache[:, :, pos] = new`` (a hand-written static KV cache): whole slices up to and on the
    cache's sharded dim, ``new`` sharded on that same dim: each rank writes its own heads. The
    cache is held sharded as for ``index_copy``; anything else makes ``new`` whole."""
    dest, idx, src = node.args
    pd, ps = ctx.pl(dest), ctx.pl(src)
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if isinstance(ps, Shard) and ps.chunks == 1 and not ps.pad and is_tensor(src) \
            and value(src).dim() == value(dest).dim() and Ellipsis not in items and None not in items \
            and all(i == slice(None) for i in items[: ps.dim + 1]):
        tensors = [i for i in items if isinstance(i, fx.Node)]
        need = {dest: ps, src: ps, **{i: R for i in tensors if is_tensor(i)}}
        if pd == ps:
            return NodeInfo(None, need, "pointwise", {"writes": dest})
        if isinstance(pd, Replicate) and _fresh_buffer(dest, node, ctx):
            return NodeInfo(None, need, "pointwise", {"shard_buffer": dest, "writes": dest})
    if isinstance(pd, Shard):  # written in place: gathering it first would write into a copy
        from tpcompile.errors import TPShardingError

        from .graph_utils import source_line

        raise TPShardingError(
            f"tpcompile: `{node.name}` at {source_line(node)} writes into a tensor sharded as {pd} with an index "
            f"or value ({ps}) that has no tensor-parallel rule (only whole slices up to the sharded dim and a "
            f"value sharded the same way). Write the cache with `cache[:, :, pos] = new` / "
            f"`cache.index_copy_(dim, pos, new)`, or keep the projections feeding it replicated with "
            f"plan={{...: 'replicate'}}.")
    return NodeInfo(None, {x: R for x in _tensors(node)}, "fallback" if isinstance(ps, Shard) else "replicate")


RULES: dict[Any, Callable[[fx.Node, Ctx], NodeInfo]] = {
    operator.setitem: setitem,
    **{f: index_copy for f in ("index_copy_", "index_copy", torch.index_copy)},
    **{f: pointwise for f in _POINTWISE_FNS},
    **{m: pointwise for m in _POINTWISE_METHODS},
    **{u: unary for u in _UNARY},
    **{f: last2_unary for f in ("tril", "triu", torch.tril, torch.triu)},
    **{f: view_like for f in ("view", "reshape", torch.reshape, "flatten", torch.flatten, "unflatten",
                               torch.unflatten, "squeeze", "unsqueeze", torch.squeeze, torch.unsqueeze, "expand",
                               torch.view_as_complex, torch.view_as_real)},
    **{f: transpose for f in ("transpose", torch.transpose, "permute", torch.permute, "t", torch.t, "swapaxes")},
    **{f: split for f in ("split", torch.split, "chunk", torch.chunk, "unbind", torch.unbind)},
    **{f: cat for f in (torch.cat, torch.concat, torch.stack)},
    **{f: softmax for f in ("softmax", torch.softmax, F.softmax, "log_softmax", F.log_softmax, torch.log_softmax)},
    **{f: select for f in _SELECT},
    **{f: like for f in (*_LIKE, *_RANDOM_LIKE)},
    **{f: random_fill for f in _RANDOM_FILLS},
    **{f: reduction for f in ("sum", "mean", "amax", "amin", torch.sum, torch.mean, torch.amax, torch.amin,
                               "var", "std", torch.var, "logsumexp", torch.logsumexp, "norm")},
    **{f: matmul for f in (operator.matmul, torch.matmul, "matmul", torch.bmm, "bmm")},
    **{f: einsum for f in (torch.einsum, "einsum")},
    **{f: size_of for f in (torch.ops.aten.sym_size.int, "size", "numel", torch.numel)},
    SDPA: sdpa,
    **{f: layer_norm for f in (F.layer_norm, torch.layer_norm, F.rms_norm, torch.rms_norm)},
    LINEAR: linear,
    LINEAR_IO: linear,
    GROUPED: grouped_linear,
    **{f: dropout for f in _DROPOUTS},
    "repeat_interleave": repeat_interleave,
    torch.repeat_interleave: repeat_interleave,
    F.embedding: embedding,
    F.cross_entropy: cross_entropy,
    operator.getitem: getitem,
}
# One name per rule: the op's family, which every pass asks (sequence parallelism's per-token
# region, the plan's walks) instead of keeping its own list of ops.
OP_CLASS: dict[Callable, str] = {
    pointwise: "pointwise", unary: "cast", last2_unary: "mask", view_like: "view", transpose: "transpose",
    split: "split", cat: "cat", softmax: "softmax", reduction: "reduction", matmul: "matmul", sdpa: "attention",
    layer_norm: "norm", linear: "linear", grouped_linear: "grouped_linear", embedding: "embedding", cross_entropy: "loss", dropout: "dropout",
    repeat_interleave: "repeat", getitem: "index", output: "output", no_tensor_in: "factory",
    index_copy: "index_copy", setitem: "index_copy", select: "selection", like: "like", random_fill: "random",
}


def op_class(node: fx.Node) -> str | None:
    """The family of ``node``'s op ("pointwise", "cast", "dropout", "norm", "reduction", "view", ...),
    ``"transfer"`` for a ``.to(device)``, None for an op with no rule."""
    rule = rule_for(node)
    if rule is unary and node.target == "to" and any(isinstance(a, (torch.device, str)) for a in node.args[1:]):
        return "transfer"
    return OP_CLASS.get(rule)


def rule_through(node: fx.Node, placements: dict, tp: int) -> NodeInfo:
    """What ``node``'s rule says for the given placements of its tensor inputs (absent ones:
    Replicate), e.g. whether a shard on the token dim survives it with no communication."""
    ctx = Ctx(tp, lambda n, p: "replicate", lambda n: 1)
    ctx.place = {x: placements.get(x, R) for x in _tensors(node)}
    return (rule_for(node) or (lambda n, c: _replicate_all(n, c, "fallback")))(node, ctx)


def rule_for(node: fx.Node):
    if node.op == "output":
        return output
    if node.op not in ("call_function", "call_method"):
        return None
    r = RULES.get(node.target)
    if r is not None:
        return r
    if not _tensors(node):
        return no_tensor_in
    return None


def _widening(lin: fx.Node, info: dict) -> bool:
    """A column-parallel linear with more out- than in-features (an LM head: vocabulary > width)."""
    if info[lin].kind != "colwise" or lin.target not in (LINEAR, LINEAR_IO):
        return False
    w = shape(lin.args[1])
    od = weight_out_dim(lin)
    out, inp = static_size(w[od]), static_size(w[1 - od])
    return out is not None and inp is not None and out > inp


def _merge_origins(prop_origins, node, info):
    """Column linears whose shard this node carries: the union over its sharded inputs."""
    src = set()
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node) and not info.need:
        return prop_origins.get(node.args[0], frozenset())  # one piece of a split: its shard's origins
    for x, need in info.need.items():
        if isinstance(need, Shard):
            src |= prop_origins.get(x, frozenset())
    return frozenset(src)


# rules that lay out a parameter: the sizes they shard are checked by the plan (``plan._param_plans``
# names the parameter and the tp values that work)
_LAYOUT_KINDS = frozenset({"colwise", "rowwise", "kvcopy", "vocab", "column_embedding", "expert", "expert_colwise",
                           "expert_rowwise", "expert_combine", "expert_dispatch", "vocab_ce", "placeholder"})


def _shard_fits(p: Placement, size, tp: int) -> bool:
    """A shard of a dim of ``size`` entries gives every rank the same whole, non-empty part of each
    piece: ``size`` (or each piece) divides by the number of distinct blocks. Padding (a vocabulary)
    and symbolic sizes (batch, tokens) are the rules' own business."""
    if not isinstance(p, Shard) or p.pad:
        return True
    full = static_size(size)
    if full is None:
        return True
    pieces = p.sizes or ((full // p.chunks,) * p.chunks if full % p.chunks == 0 else None)
    if pieces is None:
        return False
    return all(n > 0 and n * c % tp == 0 for n, c in zip(pieces, p.piece_copies()))


def _splits_evenly(node: fx.Node, ni: NodeInfo, tp: int) -> bool:
    """Every shard a rule produces or asks for splits its dim evenly over tp (see ``_shard_fits``).

    The one place that makes a plan giving a rank zero heads (or a ragged part of one) impossible
    by construction, whichever rule would have produced it: the op then runs on whole inputs (a
    correct gather, reported as a fallback) and the plan replicates what led there."""
    outs = ni.out if isinstance(ni.out, tuple) else (ni.out,)
    vals = value(node) if isinstance(ni.out, tuple) else (value(node),)
    for p, v in zip(outs, vals or ()):
        if isinstance(p, Shard) and isinstance(v, torch.Tensor) and p.dim < v.dim() and not _shard_fits(p, v.shape[p.dim], tp):
            return False
    for x, p in ni.need.items():
        if isinstance(p, Shard) and is_tensor(x) and p.dim < value(x).dim() and not _shard_fits(p, shape(x)[p.dim], tp):
            return False
    return True


def propagate(gm: fx.GraphModule, tp: int, params: set, style_of: Callable, chunks_of: Callable = lambda n: 1,
              copies_of: Callable = lambda n: 1, state: dict | None = None,
              buffers: set = frozenset(), pending: frozenset = frozenset(), inference: bool = False,
              outputs_sharded: bool = False) -> Propagation:
    """Placement of every node of ``gm``.

    Inputs are replicated (the same batch on every rank), except ``state`` (placeholder ->
    placement): sharded state an earlier graph returned as this rank's shard (a KV cache). A parameter takes the placement its
    first consumer needs (that is how it will be stored); later consumers that need another
    one get a mapping op like any other value.
    ``style_of(node, input_placement)``: the plan's layout for a linear / embedding node;
    ``chunks_of(node)``: pieces of a fused column-parallel projection; ``copies_of(node)``: ranks
    sharing one kv head of a ``kvcopy`` projection; ``pending``: row linears whose output stays a
    pending sum (Partial) instead of being reduced at once. ``inference``: the graph has no backward;
    a column linear's shard that reaches the vocab-parallel selection ops or the graph's output (the
    LM head at decode: its logits returned) counts as a sink (kept column-parallel, 1/tp of its weight
    per rank, the returned part gathered), where in training it would only add a collective.
    ``outputs_sharded``: outputs are returned as their shards (``tp_compile(sharded_outputs=True)``):
    a shard reaching the output costs no collective, so it counts as a sink in training too.
    """
    ctx = Ctx(tp, style_of, chunks_of, copies_of, pending)
    ctx.inference = inference
    ctx.outputs_sharded = outputs_sharded
    ctx.buffers = set(buffers)
    info: dict = {}
    origins: dict = {}
    good: set = set()
    vocab: set = set()
    bad: set = set()
    returned: set = set()
    fallbacks: list = []
    blocked: dict = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            p = None if node in params or not is_tensor(node) else (state or {}).get(node, R)
            info[node] = NodeInfo(p, {}, "placeholder")
        elif node.op == "get_attr":
            info[node] = NodeInfo(R if is_tensor(node) else None, {}, "replicate")
        else:
            rule = rule_for(node)
            if rule is None:
                ni = _replicate_all(node, ctx, "fallback")
            else:
                ni = rule(node, ctx)
                if ni.kind not in _LAYOUT_KINDS and not _splits_evenly(node, ni, tp):
                    ni = _replicate_all(node, ctx, "fallback")  # e.g. 2 heads at tp=4: no rank gets zero
            for x, need in ni.need.items():  # a parameter is stored the way its first consumer needs
                if x in params and ctx.place.get(x) is None:  # (kv copies are taken from a replicated one)
                    ctx.place[x] = info[x].out = R if isinstance(need, Shard) and need.copies else need
            buf = ni.extra.get("shard_buffer")
            if buf is not None:  # a buffer created for this in-place writer: created as its shard
                ctx.place[buf] = need = ni.need[buf]
                info[buf] = NodeInfo(need, {}, "shard_buffer", {"dim": need.dim})
            # what each sharded input's origin linears learn from this consumer
            for x, need in ni.need.items():
                have = ctx.pl(x)
                if isinstance(have, Shard) and need != have:
                    bad |= origins.get(x, frozenset())
                    if ni.kind == "fallback":
                        for o in origins.get(x, ()):
                            blocked.setdefault(o, []).append(node)
                # a column-parallel table counts only beside a column linear's shard (T5's bias added to
                # head-sharded scores); alone it would have split a whole activation (the residual stream)
                if ni.kind in ("rowwise", "expert_rowwise", "vocab_ce") and isinstance(have, Shard) and need == have \
                        and any(info[o].kind in ("colwise", "kvcopy") for o in origins.get(x, ())):
                    good |= origins.get(x, frozenset())
                    if ni.kind == "vocab_ce":
                        vocab |= origins.get(x, frozenset())
                # the LM head at decode: its logits selected from (argmax, top-k, softmax over the vocabulary)
                # or returned (gathered at the end). A head, not a MoE router (E scores, top-k routed: kept
                # replicated, no collective) nor a classifier: wider out than in
                heads = {o for o in origins.get(x, ()) if _widening(o, info)}
                if isinstance(have, Shard) and heads and ni.kind == "output":
                    returned |= heads
                if isinstance(have, Shard) and heads and (ni.kind == "vocab_select" and need == have or (
                        ni.kind == "output" and (ctx.inference or ctx.outputs_sharded) and have.chunks == 1
                        and not have.copies)):
                    good |= heads
                    vocab |= heads
            if ni.kind == "fallback" and any(isinstance(ctx.pl(x), (Shard, Partial)) and ni.need.get(x) != ctx.pl(x) for x in ni.need):
                fallbacks.append(node)
            elif any(isinstance(ctx.pl(x), ExpertRows) and need != ctx.pl(x) for x, need in ni.need.items()):
                fallbacks.append(node)  # expert rows made whole for an op with no rule for them: an all-reduce
            info[node] = ni
            origins[node] = frozenset({node}) if ni.kind in ("colwise", "column_embedding", "kvcopy") \
                else _merge_origins(origins, node, ni)
            if "writes" in ni.extra:  # in place: later reads of the written tensor carry the shard too
                w = ni.extra["writes"]
                origins[w] = origins.get(w, frozenset()) | origins[node]
        ctx.place[node] = info[node].out
    return Propagation(info, origins, good, fallbacks, blocked, vocab, bad, returned)
