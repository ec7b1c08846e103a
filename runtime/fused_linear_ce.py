"""Fused LM head + vocab-parallel cross-entropy: the logits are never materialised.

``loss = CE(hidden @ weight.T, target)`` with ``weight`` this rank's vocab rows (a
column-parallel LM head, no bias), computed over vocab chunks of ``chunk`` rows of the
weight: each chunk's ``[N, chunk]`` logits go through the same local statistics op
(``tpcompile::ce_stats``) and are dropped; chunk statistics merge with the online-softmax
rule (``m = max(m, m_c)``, ``s = s e^(m_old - m) + s_c e^(m_c - m)``, targets and sums
add). Then the same single all-gather + combine as ``vocab_parallel_cross_entropy``.
The backward recomputes each chunk's logits, turns them into gradient in place
(``tpcompile::ce_grad_``) and accumulates ``d hidden += g @ W_c`` (fp32) and
``d W_c = g.T @ hidden``. Peak extra memory: one ``N x chunk`` block instead of
``N x V/tp`` logits (plus their gradient), paid for with a second LM-head matmul.

``d hidden`` is this rank's partial sum, as for any column-parallel linear: the Megatron
``f`` (``copy_to_tp``) in front of the LM head all-reduces it in the backward.
A runtime op only: the rewrite keeps the unfused LM head + ``vocab_parallel_cross_entropy``
(see ``docs/cross_entropy.md`` for the measurement).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import ce_kernels
from .mappings import Group, group_name
from .vocab_parallel import combine_stats, row_scale

__all__ = ["fused_linear_cross_entropy"]


def _chunks(valid: int, chunk: int):
    return [(a, min(valid, a + chunk)) for a in range(0, valid, chunk)]


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, vocab_start, vocab_size, name, ignore_index, reduction, eps, chunk, impl):
        h = hidden.reshape(-1, hidden.shape[-1])
        rows_t = target.reshape(-1)
        n = h.shape[0]
        valid = max(0, min(weight.shape[0], vocab_size - vocab_start))
        stats_op, _, _ = ce_kernels.ops(impl)
        m = h.new_full((n,), float("-inf"), dtype=torch.float32)
        s, t, z = (h.new_zeros(n, dtype=torch.float32) for _ in range(3))
        for a, b in _chunks(valid, chunk):
            st = stats_op(h @ weight[a:b].t(), rows_t, vocab_start + a, b - a, eps > 0)
            m_new = torch.maximum(m, st[0])
            s = s * (m - m_new).exp() + st[1] * (st[0] - m_new).exp()
            m, t = m_new, t + st[2]
            if eps > 0:
                z = z + st[3]
        stats = torch.stack([m, s, t, z] if eps > 0 else [m, s, t])
        loss, lse = combine_stats(stats, rows_t, name, vocab_size, ignore_index, reduction, eps)
        if reduction == "none":
            loss = loss.view(target.shape)
        ctx.save_for_backward(h, weight, lse, rows_t)
        ctx.args = (hidden.shape, valid, vocab_start, vocab_size, ignore_index, reduction, eps, chunk, impl)
        return loss.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, lse, rows_t = ctx.saved_tensors
        shape, valid, vocab_start, vocab_size, ignore_index, reduction, eps, chunk, impl = ctx.args
        scale = row_scale(grad_out, rows_t, ignore_index, reduction)
        _, _, grad_op_ = ce_kernels.ops(impl)
        dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        dw = torch.zeros_like(weight)  # padding rows keep a zero gradient
        for a, b in _chunks(valid, chunk):
            w = weight[a:b]
            g = h @ w.t()
            grad_op_(g, rows_t, lse, scale, vocab_start + a, b - a, eps, vocab_size)  # logits -> grad
            dh += (g @ w).float()
            dw[a:b] = g.t() @ h
        return dh.to(h.dtype).view(shape), dw, *(None,) * 9


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    vocab_start: int,
    vocab_size: int,
    group: Group,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    chunk: int = 4096,
    impl: str | None = None,
) -> Tensor:
    """``F.cross_entropy(hidden @ full_weight.T, target, ...)`` where ``weight`` holds vocab
    rows ``[vocab_start, vocab_start + rows)`` (rows at or past ``vocab_size``: padding),
    computed ``chunk`` vocab rows at a time so no rank holds more than ``N x chunk`` logits.
    ``hidden``: ``[..., H]`` replicated on the ranks; ``target``: ``[...]`` global ids.
    Same maths, collective and options as ``vocab_parallel_cross_entropy``."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of vocab rows, got {chunk}")
    impl = ce_kernels.impl_for(hidden, impl)
    if impl == "te":
        raise ValueError("fused_linear_cross_entropy: impl 'te' needs whole-shard logits; use 'torch' or 'triton'")
    return _FusedLinearCE.apply(
        hidden, weight, target, vocab_start, vocab_size, group_name(group), ignore_index, reduction,
        label_smoothing, chunk, impl,
    )
