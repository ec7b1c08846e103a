"""Dropout on sharded activations (Megatron's RNG-tracker semantics, without a tracker).

Every rank keeps the same RNG stream (same seed, same draws), so dropout in replicated
regions draws the same mask on every rank. On a sharded activation each rank must instead
draw its own, independent mask. Here every rank draws the mask of the *whole* logical
tensor (the same draw everywhere, so the streams stay in step) and keeps its own slice:
the slices are disjoint parts of one mask, hence independent, and distributed exactly as
single-device dropout. The price is drawing B*T*H random numbers instead of B*T*H/tp.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sharded_dropout"]


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
