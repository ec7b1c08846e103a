"""Rewrite a planned graph into the local program of every rank (DESIGN.md §5).

- every edge whose placement changes gets one mapping op (shared by all consumers of the
  same value that need the same placement), see ``_REDISTRIBUTE``;
- column-parallel inputs pass through Megatron's f (identity forward, all-reduce backward),
  one per input value, shared by every column projection that reads it (q, k, v);
- row-parallel linears drop their bias, all-reduce, then add the bias once;
- vocab-parallel Embedding / cross-entropy become the runtime's vocab-parallel ops;
- literal sizes of sharded dims (``view(B, T, 12, 64)``, ``split(768, -1)``) become local.
Mapping ops are single ``call_function`` nodes on plain functions of ``tpcompile.runtime``
so that AOTAutograd traces their forward and backward collectives. No constant of the program
depends on the rank (vocab offsets, kv-copy rows, dropout slices, splits): the ops read it when
they run (``runtime.mappings.tp_rank``), so every rank compiles the same graph and shares one
Inductor cache entry.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from tpcompile.runtime import expert_parallel as EP
from tpcompile.runtime import mappings as M
from tpcompile.runtime import random as R_
from tpcompile.runtime import vocab_parallel as V

from .graph_utils import is_tensor, same_size, shape, static_size, value
from .layout import piece_blocks
from .plan import GraphPlan
from .placements import ExpertRows, Partial, Replicate, Shard, local_size
from .propagate import NodeInfo, dropout_call


def gather_pieces_from_tp(x: torch.Tensor, group: str, dim: int, chunks: int, sizes: tuple | None = None,
                          copies: tuple | None = None) -> torch.Tensor:
    """All-gather a ``chunks``-piece shard and put the pieces back in logical order.

    Each rank holds [p0_r, p1_r, ...]; the gather gives [p0_0, p1_0, .., p0_1, ..] and the
    logical order is [p0_0, p0_1, .., p1_0, ..]. ``sizes``: logical piece sizes if unequal.
    ``copies``: per piece, ranks holding the same block (kv-head copies): the first rank of each
    group gives it, so the backward hands the whole gradient of a block to one rank of its group.
    """
    full = M.gather_from_tp(x, group, dim)
    tp = full.shape[dim] // x.shape[dim]
    copies = copies or (1,) * chunks
    if sizes:
        local = [s * c // tp for s, c in zip(sizes, copies)]
    else:
        local = [x.shape[dim] // chunks] * chunks
    per_rank = [r.split(local, dim) for r in full.split(x.shape[dim], dim)]
    return torch.cat([per_rank[r][i] for i in range(len(local)) for r in range(0, tp, copies[i])], dim)


def _rows_at_rank(x: torch.Tensor, group: str, dim: int, rows: tuple) -> torch.Tensor:
    parts = [M.narrow_at_rank(x, dim, n, group, start, div) for start, n, div in rows]
    return torch.cat(parts, dim) if len(parts) > 1 else parts[0]


def take_rows(x: torch.Tensor, group: str, dim: int, rows: tuple) -> torch.Tensor:
    """This rank's rows along ``dim`` of a replicated ``x``, through Megatron's f: kv-head copies
    taken from a replicated k / v weight (``ParamPlan.program_rows``). ``rows``: per piece
    ``(start, length, div)`` (``layout.piece_blocks``), the rank read at run time.
    The rows' gradient comes from this rank's query heads only; f's all-reduce makes it whole."""
    return _rows_at_rank(M.copy_to_tp(x, group), group, dim, rows)


def take_rows_of(group: str, specs: tuple, *xs: torch.Tensor) -> tuple:
    """``take_rows`` of several replicated tensors (the k / v weights and biases of one attention) through
    ONE f: their gradients are all-reduced together, one collective in the backward. ``specs``: per
    tensor ``(dim, rows)``."""
    flat = M.copy_to_tp(torch.cat([x.reshape(-1) for x in xs]), group)
    out, at = [], 0
    for x, (dim, rows) in zip(xs, specs):
        whole = flat.narrow(0, at, x.numel()).view(x.shape)
        at += x.numel()
        out.append(_rows_at_rank(whole, group, dim, rows))
    return tuple(out)


def kv_copy_key(consumer: fx.Node, ni: NodeInfo):
    """What kv copies taken for ``consumer`` are grouped by (one backward all-reduce per group): the
    input activation of a ``kvcopy`` projection (k and v of one attention share it), else the consumer."""
    return ("input", consumer.args[0]) if ni.kind == "kvcopy" else ("op", consumer)


def copies_to_shard(x: torch.Tensor, group: str, dim: int, copies: int) -> torch.Tensor:
    """A kv-copy block as the plain shard of the same dim: this rank's ``1 / copies`` of its group's
    block (the repeated kv heads of this rank's query heads). No communication."""
    return M.narrow_at_rank(x, dim, x.shape[dim] // copies, group, mod=copies)


def scatter_pieces_to_tp(x: torch.Tensor, group: str, dim: int, chunks: int, sizes: tuple | None = None) -> torch.Tensor:
    """Keep this rank's part of each of the ``chunks`` pieces of ``x`` along ``dim``."""
    pieces = x.split(list(sizes), dim) if sizes else x.chunk(chunks, dim)
    return torch.cat([M.scatter_to_tp(p, group, dim) for p in pieces], dim)


def gather_padded_from_tp(x: torch.Tensor, group: str, dim: int, full: int) -> torch.Tensor:
    """All-gather a padded vocabulary shard and drop the padding past the ``full`` entries."""
    return M.gather_from_tp(x, group, dim).narrow(dim, 0, full)


def scatter_padded_to_tp(x: torch.Tensor, group: str, dim: int) -> torch.Tensor:
    """This rank's part of ``x`` along ``dim``, zero-padded so that every rank's part has the same size."""
    tp = M.group_size(group)
    n = -(-x.shape[dim] // tp)
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, n * tp - x.shape[dim]]
    return M.scatter_to_tp(torch.nn.functional.pad(x, pad), group, dim)


def kv_for_rank(kv: torch.Tensor, group: str, dim: int, q_heads: int) -> torch.Tensor:
    """The kv heads that this rank's query heads use, repeated to one per query head.

    For SDPA ``enable_gqa`` when tp does not divide the kv heads: ``kv`` is whole on every
    rank; Megatron's f (all-reduce backward) makes its gradient whole again.
    """
    tp = M.group_size(group)
    n_rep, local = q_heads // kv.shape[dim], q_heads // tp
    kv = M.copy_to_tp(kv, group).repeat_interleave(n_rep, dim)
    return M.narrow_at_rank(kv, dim, local, group)


_GATHERS = {operator.getitem, "repeat_interleave", torch.repeat_interleave, "to", "float", "contiguous"}


def token_source(x: fx.Node) -> tuple[fx.Node | None, fx.Node]:
    """(first op, its input) of the chain that dispatches tokens to an expert matmul: row picks
    ``h[perm // k]``, ``h.repeat_interleave(k, 0)`` and casts, walked back from ``x``. Megatron's f
    commutes with each of them (all linear in the rows), so it goes on the tokens before the chain:
    one all-reduce of the ``[N, H]`` input gradient in the backward, not of ``[N * k, H]``, and the
    same f as a shared expert or any other column linear reading those tokens."""
    top, src = None, x
    while src.op in ("call_function", "call_method") and src.target in _GATHERS and isinstance(src.args[0], fx.Node) \
            and is_tensor(src.args[0]) and value(src.args[0]).dim() == value(x).dim():
        top, src = src, src.args[0]
    return top, src


def _redistribute_call(have, need, group, full=None, tp=1):
    """(function, extra args) turning placement ``have`` into ``need``. No argument depends on the
    rank: the ops read it when the program runs, so every rank's program is the same."""
    if isinstance(have, ExpertRows):  # rows of this rank's experts: zero the others (a summand), then sum
        if isinstance(need, Partial):
            return EP.expert_rows_zeroed, (have.route, have.form, have.n_local, group)
        if isinstance(need, Replicate):
            return EP.expert_rows_to_replicate, (have.route, have.form, have.n_local, group)
        return None
    if isinstance(have, Replicate) and isinstance(need, Shard) and need.copies:
        sizes = need.sizes or (full // need.chunks,) * need.chunks
        return take_rows, (group, need.dim, tuple(piece_blocks(sizes, need.copies, tp)))
    if isinstance(have, Shard) and have.copies:
        if isinstance(need, Replicate):
            return gather_pieces_from_tp, (group, have.dim, have.chunks, have.sizes, have.copies)
        if isinstance(need, Shard) and need.plain and need.dim == have.dim and have.chunks == 1:
            return copies_to_shard, (group, have.dim, have.copies[0])
        return None
    if isinstance(have, Shard) and have.pad and isinstance(need, Replicate):
        return gather_padded_from_tp, (group, have.dim, full)
    if isinstance(have, Replicate) and isinstance(need, Shard) and need.pad:
        return scatter_padded_to_tp, (group, need.dim)
    if isinstance(have, Partial) and isinstance(need, Replicate):
        return M.reduce_from_tp, (group,)
    if isinstance(have, Shard) and isinstance(need, Replicate):
        if have.chunks > 1:
            return gather_pieces_from_tp, (group, have.dim, have.chunks, have.sizes)
        return M.gather_from_tp, (group, have.dim)
    if isinstance(have, Replicate) and isinstance(need, Shard):
        if need.chunks > 1:
            return scatter_pieces_to_tp, (group, need.dim, need.chunks, need.sizes)
        return M.scatter_to_tp, (group, need.dim)
    return None


def _inherit_meta(new: fx.Node, src: fx.Node, keys: tuple = ("stack_trace", "nn_module_stack")) -> None:
    """A mapping op reports the user's line and module of the op it serves (explain, errors).

    It does not take the activation-checkpoint tags (``RECOMPUTE_TAGS``) of a node inside a
    checkpointed block: an untagged collective is saved for the backward, never re-run, so
    checkpointing adds no communication (``passes/inline_checkpoint.py``).
    """
    for k in keys:
        if k in src.meta:
            new.meta[k] = src.meta[k]


RECOMPUTE_TAGS = ("recompute", "ac_graph_id")


def _untag(node: fx.Node) -> None:
    """An op that now communicates in its forward is saved, not recomputed, by a checkpoint."""
    for k in RECOMPUTE_TAGS:
        node.meta.pop(k, None)


def shard_dropout(node: fx.Node, dim: int, full: int, group: str) -> None:
    """Make a dropout on this rank's slice of ``dim`` (size ``full`` whole) draw the whole
    mask and keep the slice: single device's mask under the same seed, RNG streams in step.
    The rule table has checked that its arguments are constants (``dropout_call``); the slice is
    the rank's of ``group``, read at run time."""
    call = dropout_call(node)
    node.target = R_.sharded_dropout
    node.args = (node.args[0], call.p, call.training, dim, full, group)
    node.kwargs = {"mask_dims": call.mask_dims, "alpha": call.alpha, "inplace": call.inplace}


def whole_grad_inputs(node: fx.Node, ni: NodeInfo) -> set:
    """Replicated inputs that need a gradient, used whole by an op whose output is sharded.

    Each rank's backward then gives only its shard's part of their gradient (a norm weight
    on head-sharded q, a broadcast ``rsqrt`` of a gathered mean): they need Megatron's f
    (all-reduce backward) on that edge, as a column-parallel linear's input does. Not on
    edges into replicated ops, whose gradient is already whole on every rank.
    """
    if ni.kind not in ("pointwise", "dropout", "sdpa") or not isinstance(ni.out, (Shard, Partial, ExpertRows)):
        return set()  # (a Partial output: each rank's backward gives its summand's part of their gradient)
    kv = set(node.args[1:3]) if ni.kind == "sdpa" and ni.extra.get("gqa") else set()  # kv_for_rank has its f
    return {x for x, need in ni.need.items()
            if isinstance(need, Replicate) and x not in kv and getattr(value(x), "requires_grad", False)}


def broadcast_cut(x: fx.Node, have, need) -> bool:
    """``x`` is whole and needed as a plain shard on a dim it only broadcasts over: ``src.expand(..., n, ...)``
    with ``src`` of size 1 there (MLA's rotary key, one for all heads, beside head-sharded keys). It is then
    expanded to this rank's ``n / tp`` instead of cut, and ``src`` goes through Megatron's f: its gradient (a
    sum over this rank's slice) is all-reduced, n times smaller than the all-gather a cut's backward would be."""
    if not (isinstance(have, Replicate) and isinstance(need, Shard) and need.plain) \
            or x.op != "call_method" or x.target != "expand" or not isinstance(x.args[0], fx.Node):
        return False
    src, d = x.args[0], need.dim
    sizes = x.args[1] if len(x.args) == 2 and isinstance(x.args[1], (tuple, list)) else x.args[1:]
    return is_tensor(src) and value(src).dim() == value(x).dim() == len(sizes) and same_size(shape(src)[d], 1) \
        and isinstance(sizes[d], int) and sizes[d] == static_size(shape(x)[d])


def _writes_first(node: fx.Node) -> bool:
    """An in-place method (``x.add_(y)``): it writes into its first operand."""
    return node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_") \
        and not node.target.startswith("_") and node.target != "requires_grad_"


class _Rewriter:
    def __init__(self, gm: fx.GraphModule, plan: GraphPlan, group: str):
        self.gm, self.g, self.plan, self.group = gm, gm.graph, plan, group
        self.info = plan.prop.info
        self.cache: dict = {}
        self.alias: dict = {}  # a rewritten node -> the node that now carries its value
        self.keys: dict = {}  # op -> its kv-copy group (``kv_copy_key``), keyed before its inputs are rewritten

    def _call(self, before, fn, *args):
        with self.g.inserting_before(before):
            n = self.g.call_function(fn, args)
        n.meta["tp_mapping"] = fn.__name__
        _inherit_meta(n, args[0] if before.op == "output" and isinstance(args[0], fx.Node) else before)
        if value(args[0]) is not None:  # meta values stay logical (full) shapes: unchanged by a mapping
            n.meta["example_value"] = value(args[0])
        return n

    def _placed(self, x, need, consumer):
        """``x`` as the consumer needs it: itself, or a (cached) mapping op node."""
        have = self.info[x].out if x in self.info else None
        if have is None or have == need:
            return x
        key = (x, need)
        if key not in self.cache and broadcast_cut(x, have, need):
            sizes = list(x.args[1] if len(x.args) == 2 and isinstance(x.args[1], (tuple, list)) else x.args[1:])
            sizes[need.dim] //= self.plan.tp
            with self.g.inserting_before(consumer):
                new = self.g.call_method("expand", (self._f(x.args[0], consumer), *sizes))
            _inherit_meta(new, x)
            new.meta["example_value"] = value(x)
            self.cache[key] = new
        if key not in self.cache:
            full = int(shape(x)[have.dim]) if isinstance(have, Shard) else None
            if isinstance(need, Shard) and need.copies:
                full = int(shape(x)[need.dim])
            call = _redistribute_call(have, need, self.group, full, self.plan.tp)
            if call is None:  # Shard(a) -> Shard(b), or Partial -> Shard: go through Replicate
                mid = self._placed(x, Replicate(), consumer)
                self.info[mid] = NodeInfo(Replicate())
                call = _redistribute_call(Replicate(), need, self.group, full, self.plan.tp)
                self.cache[key] = self._call(consumer, call[0], mid, *call[1])
            else:
                self.cache[key] = self._call(consumer, call[0], x, *call[1])
        return self.cache[key]

    def run(self) -> fx.GraphModule:
        for node in list(self.g.nodes):
            ni = self.info.get(node)
            if ni is None or node.op in ("placeholder", "get_attr"):
                continue
            whole_grad = whole_grad_inputs(node, ni)
            self.keys[node] = kv_copy_key(node, ni)
            for x0, need in ni.need.items():
                x = self.alias.get(x0, x0)
                new = self._placed(x, need, node)
                if x0 in whole_grad:
                    new = self._f(new, node)
                if new is not x and _writes_first(node) and node.args[0] is x:
                    from tpcompile.errors import TPShardingError

                    from .graph_utils import source_line

                    raise TPShardingError(
                        f"tpcompile: `{node.target}` at {source_line(node)} writes in place into a value whose "
                        f"placement must change first ({self.info[x].out} -> {need}): the write would land in a copy. "
                        f"Write it out of place (`x = x.{node.target[:-1]}(...)`), or keep the projections feeding "
                        f"it replicated with plan={{...: 'replicate'}}.")
                if new is not x:
                    node.replace_input_with(x, new)
            getattr(self, "_" + ni.kind, lambda n, i: None)(node, ni)
        self._group_kv_copies()
        self.g.lint()
        self.gm.recompile()
        return self.gm

    def _group_kv_copies(self) -> None:
        """The ``take_rows`` of one group (``kv_copy_key``) become one ``take_rows_of``: one f for all."""
        groups: dict = {}
        for n in self.g.nodes:
            if n.op == "call_function" and n.target is take_rows:
                keys = {self.keys.get(u) for u in n.users}
                key = keys.pop() if len(keys) == 1 else ("node", n)
                groups.setdefault(key, []).append(n)
        for nodes in groups.values():
            if len(nodes) < 2:
                continue
            specs = tuple((n.args[2], n.args[3]) for n in nodes)
            with self.g.inserting_before(nodes[0]):
                many = self.g.call_function(take_rows_of, (self.group, specs, *[n.args[0] for n in nodes]))
            many.meta["tp_mapping"] = "take_rows_of"
            _inherit_meta(many, nodes[0])
            with self.g.inserting_before(nodes[0]):
                items = [self.g.call_function(operator.getitem, (many, i)) for i in range(len(nodes))]
            for n, item in zip(nodes, items):
                item.meta.update({k: v for k, v in n.meta.items() if k in ("example_value", "stack_trace", "nn_module_stack")})
                n.replace_all_uses_with(item)
                self.g.erase_node(n)

    # --- per-rule rewrites -------------------------------------------------------------
    def _f(self, x, consumer):
        """Megatron's f on ``x`` (identity forward, all-reduce backward), one per value."""
        key = (x, "f")
        if key not in self.cache:
            self.cache[key] = self._call(consumer, M.copy_to_tp, x, self.group)
        return self.cache[key]

    def _colwise(self, node, ni):
        x = node.args[0]
        if ni.extra.get("grouped"):  # experts: the f on the tokens before they are dispatched (k x fewer rows)
            top, src = token_source(x)
            if top is not None:
                top.replace_input_with(src, self._f(src, top))
                return
        node.replace_input_with(x, self._f(x, node))

    _kvcopy = _colwise  # its input's gradient is partial too: the same f as the query projection's

    def _expert_dispatch(self, node, ni):
        """Expert parallelism, whole tokens in: this rank's experts on the rows routed to them
        (``runtime.expert_parallel``); each rank's backward gives its rows' part of the tokens'
        gradient, so the tokens take Megatron's f, before the dispatch chain as for expert-TP."""
        self._expert_call(node)
        self._colwise(node, NodeInfo(None, extra={"grouped": True}))

    def _expert_combine(self, node, ni):
        """Expert parallelism, this rank's rows in: the same op; its output, zero off those rows, is
        this rank's summand of the combine (reduced once, where it is needed whole)."""
        self._expert_call(node)

    def _expert_call(self, node):
        x, w, route, form, out_dim = node.args
        node.target, node.args = EP.local_experts_linear, (x, w, route, form, out_dim, self.group)

    def _then(self, node, fn, *args, keys=("stack_trace", "nn_module_stack", *RECOMPUTE_TAGS)) -> fx.Node:
        """Insert ``fn(node, *args)`` right after ``node``; it takes over ``node``'s users."""
        users = list(node.users)
        with self.g.inserting_after(node):
            out = self.g.call_function(fn, (node, *args))
        _inherit_meta(out, node, keys)
        out.meta["example_value"] = value(node)
        for u in users:
            u.replace_input_with(node, out)
        self.alias[node] = out
        return out

    def _rowwise(self, node, ni):
        if ni.extra.get("pending"):  # reduced where it is needed whole, with the expert combine's sum
            return
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        node.args, node.kwargs = (node.args[0], node.args[1], None), {}
        out = red = self._then(node, M.reduce_from_tp, self.group, keys=("stack_trace", "nn_module_stack"))
        red.meta["tp_mapping"] = "reduce_from_tp"
        if bias is not None:
            out = self._then(red, operator.add, bias)
            _inherit_meta(out, node, ("stack_trace", "nn_module_stack", *RECOMPUTE_TAGS))
            self.alias[node] = out
        self.info[out] = NodeInfo(Replicate())

    def _shard_buffer(self, node, ni):
        """A buffer the graph creates (``torch.zeros(B, H, L, hd)``) for an in-place writer whose
        values are sharded: created as this rank's shard (the sharded dim's size / tp)."""
        d = ni.extra["dim"]
        packed = isinstance(node.args[0], (tuple, list))  # zeros((B, H, L, hd)) / full(size, v) or zeros(B, H, L, hd)
        sizes, rest = (list(node.args[0]), node.args[1:]) if packed else (list(node.args), ())
        sizes[d] = local_size(sizes[d], self.plan.tp)
        node.args = (tuple(sizes), *rest)

    def _sharded_size(self, node, ni):
        """``x.numel()`` / ``x.size(d)`` of the sharded dim of an unpadded shard: the logical size
        is the local one times tp (a KV cache's ``numel() == 0`` test reads no communication)."""
        self._then(node, operator.mul, self.plan.tp, keys=("stack_trace", "nn_module_stack"))

    def _partial_sum(self, node, ni):
        """A mean over the sharded dim: each rank's mean of its part, / tp, sums to the mean."""
        if ni.extra["mean"]:
            self.info[self._then(node, operator.truediv, self.plan.tp)] = NodeInfo(Partial())

    def _vocab(self, node, ni):
        idx, w = node.args[:2]
        vocab = int(shape(w)[0])
        pad = node.args[2] if len(node.args) > 2 else node.kwargs.get("padding_idx")
        node.target = V.vocab_parallel_embedding
        _untag(node)
        node.args, node.kwargs = (idx, w, None, self.group), {}  # None: this rank's rows, read at run time
        if pad is not None:  # the one rank holding that row keeps its gradient at zero
            node.kwargs = {"padding_idx": pad % vocab}

    def _vocab_ce(self, node, ni):
        a = list(node.args) + [None] * (8 - len(node.args))
        kw = node.kwargs
        x, target = a[0], a[1]
        ignore_index = kw.get("ignore_index", a[4] if a[4] is not None else -100)
        reduction = kw.get("reduction", a[6] if a[6] is not None else "mean")
        smoothing = kw.get("label_smoothing", a[7] if a[7] is not None else 0.0)
        class_dim = 0 if value(x).dim() == 1 else 1
        vocab = int(shape(x)[class_dim])
        node.target = V.vocab_parallel_cross_entropy
        _untag(node)
        node.args = (x, target, None, vocab, self.group)  # None: this rank's columns, read at run time
        node.kwargs = {"ignore_index": ignore_index, "reduction": reduction, "label_smoothing": smoothing}

    def _vocab_select(self, node, ni):
        """argmax / max / topk / softmax / log_softmax / logsumexp over the vocabulary: the runtime's
        vocab-parallel op on this rank's columns (one small all-gather; padding masked by position)."""
        x, e = node.args[0], ni.extra
        vocab = int(shape(x)[e["dim"]])
        start = None  # this rank's first id, read at run time
        op = e["op"]
        if op in ("softmax", "log_softmax", "logsumexp"):
            node.target = V.vocab_parallel_softmax
            node.args, node.kwargs = (x, e["dim"], start, vocab, self.group), {"form": op}
            if op == "logsumexp" and not e["keepdim"]:
                self._then(node, torch.squeeze, e["dim"], keys=("stack_trace", "nn_module_stack"))
        elif op == "topk":
            node.target = V.vocab_parallel_topk
            node.args, node.kwargs = (x, e["k"], e["dim"], e["largest"], start, vocab, self.group), {}
        else:
            node.target = V.vocab_parallel_argmax if op == "argmax" else V.vocab_parallel_max
            node.args, node.kwargs = (x, e["dim"], e["keepdim"], start, vocab, self.group), {}
        node.op = "call_function"  # also for the method spellings (``logits.argmax(-1)``)
        _untag(node)

    def _sharded_random(self, node, ni):
        """A random fill / ``rand_like`` of a shard: the whole draw, this rank's slice (``runtime.random``)."""
        x, d = node.args[0], ni.extra["dim"]
        full = int(shape(x)[d])
        if node.target in (torch.rand_like, torch.randn_like):
            fn = node.target
            node.op, node.target = "call_function", R_.sharded_random_like
            node.args, node.kwargs = (x, fn, dict(node.kwargs), d, full, self.group), {}
        else:
            method = node.target
            node.op, node.target = "call_function", R_.sharded_fill_random
            node.args, node.kwargs = (x, method, tuple(node.args[1:]), dict(node.kwargs), d, full, self.group), {}

    def _sdpa(self, node, ni):
        dim, heads = ni.extra["dim"], ni.extra["q_heads"]
        if ni.extra["gqa"]:
            args = list(node.args)
            for i in (1, 2):
                args[i] = self._call(node, kv_for_rank, args[i], self.group, dim, heads)
            node.args = tuple(args)
        p = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
        if not (isinstance(p, (int, float)) and p == 0):  # its own dropout: whole-heads mask, this rank's slice
            node.target = R_.sharded_sdpa
            node.kwargs = {**node.kwargs, "dim": dim, "full": heads, "rank": self.group}

    def _dropout(self, node, ni):
        d = ni.out.dim
        shard_dropout(node, d, int(shape(node.args[0])[d]), self.group)

    def _view(self, node, ni):
        sizes = ni.extra.get("sizes")
        if not sizes:
            return
        args = list(node.args)
        if node.target in ("unflatten", torch.unflatten):
            lst = list(args[2])
            for (_, k), v in sizes.items():
                lst[k] = v
            args[2] = type(node.args[2])(lst)
        elif len(args) == 2 and isinstance(args[1], (tuple, list)):
            lst = list(args[1])
            for o, v in sizes.items():
                lst[o] = v
            args[1] = type(node.args[1])(lst)
        else:
            for o, v in sizes.items():
                args[1 + o] = v
        node.args = tuple(args)

    def _split(self, node, ni):
        if not ni.extra.get("local_split") or node.target in ("chunk", torch.chunk, "unbind", torch.unbind):
            return
        sizes = node.args[1]
        tp = self.plan.tp
        p = self.info[node.args[0]].out if node.args[0] in self.info else None
        if isinstance(sizes, (list, tuple)):  # kv copies: a block of tp / m of their pieces
            copies = p.piece_copies() if isinstance(p, Shard) and p.copies else (1,) * len(sizes)
            new = [s * c // tp for s, c in zip(sizes, copies)]
        else:
            new = sizes // tp
        node.args = (node.args[0], new, *node.args[2:])


def rewrite(gm: fx.GraphModule, plan: GraphPlan, group: str) -> fx.GraphModule:
    """Rewrite ``gm`` (in place) into the local program for ``plan``: one program for every rank of
    ``group`` (each op reads this rank's index when it runs, ``runtime.mappings.tp_rank``)."""
    return _Rewriter(gm, plan, group).run()
