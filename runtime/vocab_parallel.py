"""Vocab-parallel embedding and cross-entropy.

Each rank holds a contiguous slice of the vocabulary: embedding rows, or logit columns of
a column-parallel LM head. No rank ever materialises more than its own slice.
"""
from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor

from . import ce_kernels
from .mappings import Group, _sync, group_name, group_rank, group_size, rank_offset, reduce_from_tp, reduce_scatter_to_sp

__all__ = ["vocab_parallel_embedding", "vocab_parallel_cross_entropy", "vocab_parallel_max", "vocab_parallel_argmax",
           "vocab_parallel_topk", "vocab_parallel_softmax"]


def vocab_parallel_embedding(idx: Tensor, weight: Tensor, vocab_start: int | None, group: Group,
                             sp_dim: int | None = None, padding_idx: int | None = None) -> Tensor:
    """Embedding lookup with ``weight`` holding rows ``[vocab_start, vocab_start + rows)``.

    ``vocab_start`` None: this rank's equal share, ``rank * rows``, with the rank read when the
    program runs (what rewritten graphs pass: the same graph on every rank).
    Ids outside this rank's rows look up row 0 and are zeroed; the sum over ranks
    (``reduce_from_tp``, one all-reduce) then gives the replicated embedding. With
    ``sp_dim`` (sequence parallelism) the sum is a reduce-scatter over that token dim
    instead. The local weight rows get exactly their slice of the single-device gradient;
    ``padding_idx`` (a global row id, ``nn.Embedding``'s) gets none: its lookups pass no
    gradient back (data, not a per-rank ``padding_idx`` constant).
    """
    if vocab_start is None:
        vocab_start = rank_offset(idx, group, weight.shape[0])
    local = idx - vocab_start
    outside = (local < 0) | (local >= weight.shape[0])
    out = F.embedding(local.masked_fill(outside, 0), weight)
    if padding_idx is not None:
        out = torch.where((idx == padding_idx).unsqueeze(-1), out.detach(), out)
    out = out.masked_fill(outside.unsqueeze(-1), 0.0)
    if sp_dim is not None:
        return reduce_scatter_to_sp(out, group, sp_dim)
    return reduce_from_tp(out, group)


def _rows(logits: Tensor, cd: int) -> Tensor:
    """``logits`` as ``[rows, classes]`` with unit column stride: a view for 1-D and 2-D
    input, a copy for N-d input (class dim 1 is moved last)."""
    if logits.dim() == 1:
        x = logits.unsqueeze(0)
    elif logits.dim() == 2:
        x = logits
    else:
        x = logits.movedim(cd, -1).reshape(-1, logits.shape[cd])
    return x if x.stride(-1) == 1 else x.contiguous()


def _unrows(grad: Tensor, shape: tuple, cd: int) -> Tensor:
    """Inverse of ``_rows``: ``[rows, classes]`` back to the logits' ``shape``."""
    if len(shape) <= 2:
        return grad.view(shape)
    return grad.view(shape[:cd] + shape[cd + 1 :] + shape[cd : cd + 1]).movedim(-1, cd)


def combine_stats(stats: Tensor, rows_t: Tensor, name: str, vocab_size: int, ignore_index: int,
                  reduction: str, eps: float) -> tuple[Tensor, Tensor]:
    """The one collective: all-gather each rank's ``[k, N]`` row statistics and combine
    them into the loss (reduced as asked, fp32) and the per-row global log-sum-exp."""
    k = stats.shape[0]
    packed = _sync(funcol.all_gather_single(stats, 0, name)).unflatten(0, (-1, k))  # [tp, k, N]
    m_all, s_all, t_all = packed[:, 0], packed[:, 1], packed[:, 2]
    big_m = m_all.amax(0)
    lse = big_m + (s_all * (m_all - big_m).exp()).sum(0).log()
    loss = lse - (1.0 - eps) * t_all.sum(0)
    if eps > 0:
        loss = loss - (eps / vocab_size) * packed[:, 3].sum(0)
    ignored = rows_t == ignore_index
    loss = loss.masked_fill(ignored, 0.0)
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / (~ignored).sum()
    return loss, lse


def row_scale(grad_out: Tensor, rows_t: Tensor, ignore_index: int, reduction: str) -> Tensor:
    """Per-row factor of the backward: upstream grad, / count for 'mean', 0 if ignored."""
    ignored = rows_t == ignore_index
    g = grad_out.float()
    if reduction == "mean":
        g = g / (~ignored).sum()
    return g.reshape(-1).expand(rows_t.shape).masked_fill(ignored, 0.0).contiguous()


def _padded_span(cols: int, vocab_size: int, group: str) -> tuple[int, int]:
    """(first class id, real columns) of this rank's ``cols``-column shard of a padded vocabulary."""
    start = group_rank(group) * cols
    return start, max(0, min(cols, vocab_size - start))


@torch.library.custom_op("tpcompile::ce_stats_at_rank", mutates_args=())
def ce_stats_at_rank(logits: Tensor, target: Tensor, group: str, vocab_size: int, with_sum: bool, impl: str) -> Tensor:
    """``impl``'s ``ce_stats`` on this rank's shard of a padded vocabulary, its first id and real
    columns from the rank read when the op runs: which columns are padding is then no constant of
    the graph, and every rank's graph is the same (one opaque op, for padded vocabularies only)."""
    start, valid = _padded_span(logits.shape[1], vocab_size, group)
    return ce_kernels.ops(impl)[0](logits, target, start, valid, with_sum)


@ce_stats_at_rank.register_fake
def _(logits, target, group, vocab_size, with_sum, impl):
    return logits.new_empty((4 if with_sum else 3, logits.shape[0]), dtype=torch.float32)


@torch.library.custom_op("tpcompile::ce_grad_at_rank", mutates_args=())
def ce_grad_at_rank(logits: Tensor, target: Tensor, lse: Tensor, scale: Tensor, group: str, eps: float,
                    vocab_size: int, impl: str) -> Tensor:
    """``impl``'s ``ce_grad`` on this rank's shard of a padded vocabulary (``ce_stats_at_rank``)."""
    start, valid = _padded_span(logits.shape[1], vocab_size, group)
    return ce_kernels.ops(impl)[1](logits, target, lse, scale, start, valid, eps, vocab_size)


@ce_grad_at_rank.register_fake
def _(logits, target, lse, scale, group, eps, vocab_size, impl):
    return torch.empty_like(logits)


class _VocabParallelCE(torch.autograd.Function):
    """Cross-entropy over class-sharded logits with one collective in the forward.

    (a) local: per row, each rank computes over its valid columns the max ``m``,
    ``s = sum exp(x - m)``, the target logit ``t`` (0 when the target is elsewhere) and,
    with label smoothing, ``z = sum x`` (custom op ``tpcompile::ce_stats``).
    (b) one all-gather of these few floats per row, then on every rank:
    ``M = max_r m_r``, ``lse = M + log sum_r s_r exp(m_r - M)``, ``T = sum_r t_r``,
    ``Z = sum_r z_r``, ``loss = lse - (1 - eps) T - eps Z / V`` (aten's smoothing:
    ``(1 - eps) nll + eps mean_c(-log p_c)``).
    (c) local backward, no collective (``tpcompile::ce_grad``):
    ``dx = (softmax - (1 - eps) onehot - eps / V) * dloss``, softmax from the saved lse;
    with ``inplace_backward`` written over the saved logits (``tpcompile::ce_grad_``).
    """

    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_size, name, ignore_index, reduction, eps, impl, inplace):
        cd = 0 if logits.dim() == 1 else 1
        x = _rows(logits, cd)
        rows_t = target.reshape(-1)
        # the rank's first id: a Python int, a tensor read at run time (unpadded shards: the caller's check,
        # the kernels then see local class ids), or None (a padded vocabulary, rank read inside the op)
        if isinstance(vocab_start, Tensor):
            local_t, start, valid = rows_t - vocab_start, 0, logits.shape[cd]
        elif vocab_start is None:
            local_t, start, valid = rows_t, None, None
        else:
            local_t, start = rows_t, vocab_start
            valid = max(0, min(logits.shape[cd], vocab_size - vocab_start))  # columns past V: padding
        stats_op, _, _ = ce_kernels.ops(impl)
        if impl == "te":
            from . import te

            te.check_shards(x.shape[1], start or 0, vocab_size)
        if start is None:
            stats = ce_stats_at_rank(x, rows_t, name, vocab_size, eps > 0, impl)
        else:
            stats = stats_op(x, local_t, start, valid, eps > 0)  # fp32 [k, N]
        loss, lse = combine_stats(stats, rows_t, name, vocab_size, ignore_index, reduction, eps)
        if reduction == "none":
            loss = loss.view(target.shape)

        ctx.save_for_backward(x, lse, rows_t, local_t)
        ctx.args = (cd, valid, start, vocab_size, ignore_index, reduction, eps, impl, inplace)
        ctx.name = name
        ctx.shape = tuple(logits.shape)
        return loss.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, lse, rows_t, local_t = ctx.saved_tensors
        cd, valid, vocab_start, vocab_size, ignore_index, reduction, eps, impl, inplace = ctx.args
        scale = row_scale(grad_out, rows_t, ignore_index, reduction)
        _, grad_op, grad_op_ = ce_kernels.ops(impl)
        if vocab_start is None and inplace and not torch.compiler.is_compiling():  # eager: the rank as an int
            vocab_start, valid = _padded_span(x.shape[1], vocab_size, ctx.name)
        if vocab_start is None:
            grad = ce_grad_at_rank(x, local_t, lse, scale, ctx.name, eps, vocab_size, impl)
        elif inplace and not torch.compiler.is_compiling():
            grad_op_(x, local_t, lse, scale, vocab_start, valid, eps, vocab_size)
            grad = x
        else:
            grad = grad_op(x, local_t, lse, scale, vocab_start, valid, eps, vocab_size)
        return _unrows(grad, ctx.shape, cd), *(None,) * 9


def vocab_parallel_cross_entropy(
    logits: Tensor,
    target: Tensor,
    vocab_start: int | None,
    vocab_size: int,
    group: Group,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    impl: str | None = None,
    inplace_backward: bool = False,
) -> Tensor:
    """``F.cross_entropy(full_logits, target, ...)`` where ``logits`` is this rank's slice
    ``[vocab_start, vocab_start + local_C)`` of the class dim (dim 1, or 0 for 1-D input).
    ``vocab_start`` None: this rank's equal share ``rank * local_C``, the rank read when the program
    runs (what rewritten graphs pass: one graph for every rank; for a vocabulary padded to ``tp *
    local_C`` columns, which columns are padding is read inside one opaque op, ``ce_stats_at_rank``).

    ``vocab_size`` is the logical vocabulary V: columns at or past it are padding and are
    excluded. One all-gather of a few floats per row in the forward (Megatron uses three
    all-reduces), none in the backward. Math in fp32 (or the logits' dtype if wider); the
    loss has the logits' dtype, as ``F.cross_entropy`` returns.

    ``impl``: ``"torch"`` (chunked, any device), ``"triton"``, ``"te"`` or ``None``
    (``$TPCOMPILE_CE_IMPL``, default ``auto``: Triton on CUDA, torch elsewhere).
    ``inplace_backward=True`` writes the gradient over ``logits`` (no second logits-sized
    buffer in the backward): only when nothing reads ``logits`` after the loss's backward
    (autograd raises if another op saved them for its backward; a reference the caller
    kept would silently change). Ignored for a leaf tensor (its storage is the caller's,
    and would become its own ``.grad``) and under ``torch.compile``, where AOTAutograd
    functionalises the graph and Inductor plans the buffers. N-d logits are copied to
    ``[rows, classes]`` first, so there the copy is overwritten, not ``logits``.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if vocab_start is None:
        cols = logits.shape[0 if logits.dim() == 1 else 1]
        if cols * group_size(group) == vocab_size:
            vocab_start = rank_offset(logits, group, cols)
    return _VocabParallelCE.apply(
        logits, target, vocab_start, vocab_size, group_name(group), ignore_index, reduction, label_smoothing,
        ce_kernels.impl_for(logits, impl), inplace_backward and not logits.is_leaf,
    )


# ------------------------------------------------------------------ selection over the vocabulary
# Decode-time ops on vocab-sharded logits (the column-parallel LM head's output, this rank's columns
# [vocab_start, vocab_start + local) of ``dim``): each rank reduces its own columns, then ONE
# all-gather of a few values per row (packed as float64: any logit dtype and any int64 index below
# 2^53 are exact in it) and the same pick on every rank. Columns at or past ``vocab_size`` are
# padding (a vocabulary tp does not divide) and are masked by position, whatever they hold. Not
# differentiable: the rule table routes them only for values that need no gradient.


def _first_id(x: Tensor, dim: int, vocab_start: int | None, group: Group) -> int | Tensor:
    """``vocab_start``, or (None: what rewritten graphs pass) this rank's first id, ``rank * cols``,
    read when the program runs (a 0-d tensor: one program for every rank)."""
    return rank_offset(x, group, x.shape[dim]) if vocab_start is None else vocab_start


def _mask_padding(x: Tensor, dim: int, vocab_start: int | Tensor, vocab_size: int, fill: float,
                  group: Group) -> Tensor:
    """``x`` with its padding columns (past the vocabulary) set to ``fill``."""
    if x.shape[dim] * group_size(group) <= vocab_size:  # no rank holds padding
        return x
    cols = torch.arange(x.shape[dim], device=x.device).view([-1] + [1] * (x.dim() - 1 - dim))
    return x.masked_fill(cols + vocab_start >= vocab_size, fill)


def _gather_rows(packed: Tensor, group: Group) -> Tensor:
    """``[k, *rows]`` per rank -> ``[tp, k, *rows]``: the one collective."""
    k = packed.shape[0]
    return _sync(funcol.all_gather_single(packed.contiguous(), 0, group_name(group))).unflatten(0, (-1, k))


def vocab_parallel_max(x: Tensor, dim: int, keepdim: bool, vocab_start: int | None, vocab_size: int,
                       group: Group) -> tuple[Tensor, Tensor]:
    """``torch.max(full, dim, keepdim)`` of the whole logits from this rank's columns ``x``: (values,
    global indices). Ties give the lowest index, as on one device (each rank's first maximum, then
    the first rank holding the maximum); a NaN counts as the maximum, as torch's does."""
    dim = dim % x.dim()
    vocab_start = _first_id(x, dim, vocab_start, group)
    v, i = _mask_padding(x, dim, vocab_start, vocab_size, float("-inf"), group).max(dim)
    both = _gather_rows(torch.stack([v.double(), (i + vocab_start).double()]), group)  # [tp, 2, *rows]
    pick = both[:, 0].argmax(0, keepdim=True)  # the first rank with the maximum (argmax: first occurrence)
    values = both[:, 0].gather(0, pick).squeeze(0).to(x.dtype)
    index = both[:, 1].gather(0, pick).squeeze(0).long()
    if keepdim:
        values, index = values.unsqueeze(dim), index.unsqueeze(dim)
    return values, index


def vocab_parallel_argmax(x: Tensor, dim: int, keepdim: bool, vocab_start: int | None, vocab_size: int,
                          group: Group) -> Tensor:
    """``torch.argmax(full, dim, keepdim)`` from this rank's columns: greedy decoding, one small
    all-gather of (value, index) per row."""
    return vocab_parallel_max(x, dim, keepdim, vocab_start, vocab_size, group)[1]


def vocab_parallel_topk(x: Tensor, k: int, dim: int, largest: bool, vocab_start: int | None, vocab_size: int,
                        group: Group) -> tuple[Tensor, Tensor]:
    """``torch.topk(full, k, dim, largest)`` from this rank's columns: each rank's own top-k, one
    all-gather of the ``k * tp`` candidates per row, the top-k of those (sorted). The values are
    single device's exactly; so are the indices of distinct values. Equal values come lowest index
    first: torch leaves their order (and, at the k-th place, which of them) unspecified (on CPU it
    returns indices [1, 6, 4] for ``topk([1, 3, 3, 2, 3, 0, 3, 1], 3)``), so no rule can copy it."""
    dim = dim % x.dim()
    vocab_start = _first_id(x, dim, vocab_start, group)
    xs = _mask_padding(x, dim, vocab_start, vocab_size, float("-inf") if largest else float("inf"), group)
    v, i = xs.topk(min(k, x.shape[dim]), dim, largest, sorted=False)
    both = _gather_rows(torch.stack([v.double(), (i + vocab_start).double()]), group)  # [tp, 2, ..., k', ...]
    values = both[:, 0].movedim(0, dim).flatten(dim, dim + 1)  # [..., tp * k', ...]
    index = both[:, 1].movedim(0, dim).flatten(dim, dim + 1)
    order = index.argsort(dim=dim)  # index order first, then a stable sort on the value: ties lowest index first
    values, index = values.gather(dim, order), index.gather(dim, order)
    order = values.argsort(dim=dim, descending=largest, stable=True).narrow(dim, 0, k)
    return values.gather(dim, order).to(x.dtype), index.gather(dim, order).long()


def vocab_parallel_softmax(x: Tensor, dim: int, vocab_start: int | None, vocab_size: int, group: Group,
                           form: str = "softmax") -> Tensor:
    """``softmax`` / ``log_softmax`` / ``logsumexp`` over the vocabulary from this rank's columns:
    each rank's max ``m`` and ``s = sum exp(x - m)`` per row, one all-gather of these two values, then
    ``M = max_r m_r``, ``S = sum_r s_r exp(m_r - M)`` on every rank: ``exp(x - M) / S``,
    ``x - M - log S`` (this rank's columns, padding 0 / -inf) or ``M + log S`` (whole; dim kept as 1,
    the caller squeezes it). fp32 maths for narrower inputs, the input's dtype out, as torch's."""
    dim = dim % x.dim()
    vocab_start = _first_id(x, dim, vocab_start, group)
    xf = _mask_padding(x.float() if x.element_size() < 4 else x, dim, vocab_start, vocab_size, float("-inf"), group)
    m = xf.amax(dim, keepdim=True)
    s = (xf - m.masked_fill(m == float("-inf"), 0)).exp().sum(dim, keepdim=True)  # a row all -inf here: s = 0
    both = _gather_rows(torch.stack([m, s]).double(), group)  # [tp, 2, ..., 1, ...]
    big_m = both[:, 0].amax(0)
    total = (both[:, 1] * (both[:, 0] - big_m).exp()).sum(0)
    big_m, total = big_m.to(xf.dtype), total.to(xf.dtype)
    if form == "logsumexp":
        return (big_m + total.log()).to(x.dtype)
    if form == "log_softmax":
        return (xf - big_m - total.log()).to(x.dtype)
    return ((xf - big_m).exp() / total).to(x.dtype)
