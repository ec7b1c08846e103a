"""Vocab-parallel embedding and cross-entropy.

Each rank holds a contiguous slice of the vocabulary: embedding rows, or logit columns of
a column-parallel LM head. No rank ever materialises more than its own slice.
"""
from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor

from .mappings import Group, _sync, group_name, reduce_from_tp, reduce_scatter_to_sp

__all__ = ["vocab_parallel_embedding", "vocab_parallel_cross_entropy"]


def vocab_parallel_embedding(idx: Tensor, weight: Tensor, vocab_start: int, group: Group,
                             sp_dim: int | None = None) -> Tensor:
    """Embedding lookup with ``weight`` holding rows ``[vocab_start, vocab_start + rows)``.

    Ids outside this rank's rows look up row 0 and are zeroed; the sum over ranks
    (``reduce_from_tp``, one all-reduce) then gives the replicated embedding. With
    ``sp_dim`` (sequence parallelism) the sum is a reduce-scatter over that token dim
    instead. The local weight rows get exactly their slice of the single-device gradient.
    """
    local = idx - vocab_start
    outside = (local < 0) | (local >= weight.shape[0])
    out = F.embedding(local.masked_fill(outside, 0), weight).masked_fill(outside.unsqueeze(-1), 0.0)
    if sp_dim is not None:
        return reduce_scatter_to_sp(out, group, sp_dim)
    return reduce_from_tp(out, group)


class _VocabParallelCE(torch.autograd.Function):
    """Cross-entropy over class-sharded logits with one collective in the forward.

    Per row, each rank computes over its valid columns: max ``m``, ``s = sum exp(x - m)``,
    the target logit ``t`` (0 when the target is elsewhere) and, with label smoothing,
    ``z = sum x``. One all-gather of these few floats per row, then on every rank:
    ``M = max_r m_r``, ``lse = M + log sum_r s_r exp(m_r - M)``, ``T = sum_r t_r``,
    ``Z = sum_r z_r``, ``loss = lse - (1 - eps) T - eps Z / V`` (aten's smoothing:
    ``(1 - eps) nll + eps mean_c(-log p_c)``). The backward needs no collective:
    ``dx = (softmax - (1 - eps) onehot - eps / V) * dloss``, softmax from the saved lse.
    """

    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_size, name, ignore_index, reduction, eps):
        cd = 0 if logits.dim() == 1 else 1
        valid = max(0, min(logits.shape[cd], vocab_size - vocab_start))  # columns past V: padding
        acc = torch.promote_types(logits.dtype, torch.float32)  # fp32 maths for bf16/fp16
        if valid > 0:
            x = logits.narrow(cd, 0, valid).to(acc)
            m = x.amax(cd)
            s = (x - m.unsqueeze(cd)).exp().sum(cd)
            local_t = target - vocab_start
            hit = (local_t >= 0) & (local_t < valid)
            t = x.gather(cd, local_t.clamp(0, valid - 1).unsqueeze(cd)).squeeze(cd)
            stats = [m, s, t.masked_fill(~hit, 0.0)] + ([x.sum(cd)] if eps > 0 else [])
        else:  # this rank holds only padding columns
            zero = logits.new_zeros(target.shape, dtype=acc)
            stats = [zero - float("inf"), zero, zero] + ([zero] if eps > 0 else [])
        k = len(stats)
        packed = _sync(funcol.all_gather_single(torch.stack(stats), 0, name))
        packed = packed.unflatten(0, (-1, k))  # [tp, k, *rows]
        m_all, s_all, t_all = packed[:, 0], packed[:, 1], packed[:, 2]
        big_m = m_all.amax(0)
        lse = big_m + (s_all * (m_all - big_m).exp()).sum(0).log()
        loss = lse - (1.0 - eps) * t_all.sum(0)
        if eps > 0:
            loss = loss - (eps / vocab_size) * packed[:, 3].sum(0)
        ignored = target == ignore_index
        loss = loss.masked_fill(ignored, 0.0)
        if reduction == "sum":
            loss = loss.sum()
        elif reduction == "mean":
            loss = loss.sum() / (~ignored).sum()

        ctx.save_for_backward(logits, lse, target)
        ctx.args = (cd, valid, vocab_start, vocab_size, ignore_index, reduction, eps)
        return loss.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        logits, lse, target = ctx.saved_tensors
        cd, valid, vocab_start, vocab_size, ignore_index, reduction, eps = ctx.args
        none = (None,) * 7
        if valid == 0:
            return torch.zeros_like(logits), *none
        ignored = target == ignore_index
        acc = torch.promote_types(logits.dtype, torch.float32)
        g = grad_out.to(acc)
        if reduction == "mean":
            g = g / (~ignored).sum()
        g = g.expand(target.shape).masked_fill(ignored, 0.0)

        p = (logits.narrow(cd, 0, valid).to(acc) - lse.unsqueeze(cd)).exp()
        if eps > 0:
            p = p - eps / vocab_size
        local_t = target - vocab_start
        hit = ((local_t >= 0) & (local_t < valid)).unsqueeze(cd)
        idx = local_t.clamp(0, valid - 1).unsqueeze(cd)
        p = p.scatter_add(cd, idx, hit.to(acc) * -(1.0 - eps))
        grad = (p * g.unsqueeze(cd)).to(logits.dtype)
        pad = logits.shape[cd] - valid
        if pad:
            grad = torch.cat([grad, grad.new_zeros(grad.shape[:cd] + (pad,) + grad.shape[cd + 1 :])], cd)
        return grad, *none


def vocab_parallel_cross_entropy(
    logits: Tensor,
    target: Tensor,
    vocab_start: int,
    vocab_size: int,
    group: Group,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """``F.cross_entropy(full_logits, target, ...)`` where ``logits`` is this rank's slice
    ``[vocab_start, vocab_start + local_C)`` of the class dim (dim 1, or 0 for 1-D input).

    ``vocab_size`` is the logical vocabulary V: columns at or past it are padding and are
    excluded. One all-gather of a few floats per row in the forward (Megatron uses three
    all-reduces), none in the backward. Math in fp32 (or the logits' dtype if wider); the
    loss has the logits' dtype, as ``F.cross_entropy`` returns.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return _VocabParallelCE.apply(
        logits, target, vocab_start, vocab_size, group_name(group), ignore_index, reduction, label_smoothing
    )
