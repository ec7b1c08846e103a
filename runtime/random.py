"""Dropout on sharded activations (Megatron's RNG-tracker semantics, without a tracker).

Every rank keeps the same RNG stream (same seed, same draws), so dropout in replicated
regions draws the same mask on every rank. On a sharded activation each rank must instead
draw its own, independent mask. Here every rank draws the mask of the *whole* logical
tensor (the same draw everywhere, so the streams stay in step) and keeps its own slice:
the slices are disjoint parts of one mask, hence independent, and distributed exactly as
single-device dropout. The price is drawing B*T*H random numbers instead of B*T*H/tp.

SDPA's own ``dropout_p`` on head-sharded attention is the same problem inside a fused kernel
that draws from the shared stream: ``sharded_sdpa`` computes attention with explicit maths so
that its probabilities go through ``sharded_dropout`` (mask over all heads, this rank's slice).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["sharded_dropout", "sharded_sdpa"]


def sharded_dropout(x: Tensor, p: float, training: bool, dim: int, full: int, rank: int) -> Tensor:
    """``F.dropout(full_x, p, training)`` restricted to this rank's slice ``x`` of ``dim``."""
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    shape = list(x.shape)
    shape[dim] = full
    keep = torch.rand(shape, dtype=torch.float32, device=x.device) >= p
    keep = keep.narrow(dim, rank * x.shape[dim], x.shape[dim])
    return x * keep.to(x.dtype) / (1.0 - p)


def sharded_sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                 is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False, *,
                 dim: int, full: int, rank: int) -> Tensor:
    """``F.scaled_dot_product_attention`` on this rank's heads (a slice of ``dim``, ``full`` heads
    whole), in SDPA's reference maths, its dropout drawn by ``sharded_dropout``."""
    L, S = query.size(-2), key.size(-2)
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    if enable_gqa:
        key = key.repeat_interleave(query.size(-3) // key.size(-3), -3)
        value = value.repeat_interleave(query.size(-3) // value.size(-3), -3)
    scores = (query @ key.transpose(-2, -1)) * scale
    if is_causal:
        scores = scores.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=query.device).tril(), float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    # fp32 softmax; a row with every key masked gives zeros, as SDPA's math path (``_safe_softmax``)
    probs = torch._safe_softmax(scores.float(), -1).to(query.dtype)
    d = probs.dim() + dim - query.dim()  # a mask may broadcast probs to more leading dims
    return sharded_dropout(probs, float(dropout_p), True, d, full, rank) @ value
