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

from .mappings import group_size, narrow_at_rank

__all__ = ["sharded_dropout", "sharded_sdpa", "sharded_fill_random", "sharded_random_like"]


_SELU_ALPHA = 1.7580993408473766  # alpha dropout keeps SELU's mean and variance (ATen's constant)


def sharded_dropout(x: Tensor, p: float, training: bool, dim: int, full: int, rank: int | str, mask_dims: int = 0,
                    alpha: bool = False, inplace: bool = False) -> Tensor:
    """Single-device dropout of the whole tensor (``full`` along ``dim``) restricted to this
    rank's slice ``x``: the mask is drawn as eager dropout draws it (``bernoulli_(1 - p)`` on
    the whole mask shape, in the input's dtype), so under the same seed the ranks' slices are
    exactly single device's mask. ``mask_dims`` k > 0: a feature dropout, whose mask spans the
    first k dims only (``dim`` >= k: every rank uses the whole mask). ``alpha``: alpha dropout's
    affine maths. ``inplace``: ``x`` is updated, as ``torch.dropout_`` does. ``rank``: the slice's
    index, or the name of the TP group whose rank is read when the program runs (what rewritten
    graphs pass: one program for every rank)."""
    if not training or p == 0.0 or x.numel() == 0:
        return x
    if p == 1.0:
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        return x.mul_(zero) if inplace else x * zero
    shape = list(x.shape)
    shape[dim] = full
    if mask_dims:
        shape = shape[:mask_dims] + [1] * (len(shape) - mask_dims)
        noise = torch.empty(shape, dtype=x.dtype, device=x.device)
    elif x.is_contiguous():
        noise = torch.empty(shape, dtype=x.dtype, device=x.device)
    else:  # eager's ``empty_like(input)`` keeps the input's dim order, and bernoulli_ fills memory in order
        order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
        noise = torch.empty_permuted(shape, order, dtype=x.dtype, device=x.device)
    noise.bernoulli_(1 - p)
    if noise.shape[dim] != 1:
        n = x.shape[dim]
        noise = narrow_at_rank(noise, dim, n, rank) if isinstance(rank, str) else noise.narrow(dim, rank * n, n)
    if alpha:
        a = 1.0 / math.sqrt((_SELU_ALPHA * _SELU_ALPHA * p + 1) * (1 - p))
        b = (noise - 1) * (_SELU_ALPHA * a) + _SELU_ALPHA * a * p
        noise = noise * a
        return x.mul_(noise).add_(b) if inplace else x * noise + b
    noise = noise / (1 - p)
    return x.mul_(noise) if inplace else x * noise


def sharded_sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                 is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False, *,
                 dim: int, full: int, rank: int | str) -> Tensor:
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


def _whole_like(x: Tensor, dim: int, full: int) -> Tensor:
    """An empty tensor of ``x``'s whole logical shape (``full`` along ``dim``), in ``x``'s dim order:
    random fills write memory in order, so this is the buffer single device's ``empty_like`` fills."""
    shape = list(x.shape)
    shape[dim] = full
    if x.is_contiguous():
        return torch.empty(shape, dtype=x.dtype, device=x.device)
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
    return torch.empty_permuted(shape, order, dtype=x.dtype, device=x.device)


def _own_slice(x: Tensor, whole: Tensor, dim: int, full: int, rank: int | str) -> Tensor:
    """This rank's columns of ``whole`` written into ``x`` (in place); padding columns (a vocabulary tp
    does not divide: ranks hold ceil(full / tp)) set to 1, a value every consumer masks anyway.
    ``rank``: the slice's index, or a TP group's name (the rank read when the program runs)."""
    n = x.shape[dim]
    if isinstance(rank, str):
        pad = n * group_size(rank) - full
        if pad > 0:
            ones = list(whole.shape)
            ones[dim] = pad
            whole = torch.cat([whole, whole.new_ones(ones)], dim)
        return x.copy_(narrow_at_rank(whole, dim, n, rank))
    start = rank * n
    real = max(0, min(n, full - start))
    if real < n:
        x.narrow(dim, real, n - real).fill_(1)
    if real:
        x.narrow(dim, 0, real).copy_(whole.narrow(dim, start, real))
    return x


def sharded_fill_random(x: Tensor, method: str, args: tuple, kwargs: dict, dim: int, full: int,
                        rank: int | str) -> Tensor:
    """``x.<method>(*args, **kwargs)`` (``exponential_``, ``uniform_``, ``normal_``, ...) on this rank's
    slice ``x`` of a tensor ``full`` long along ``dim``: every rank draws the whole tensor, as single
    device does (streams in step), and keeps its slice, so under the same seed the slices are single
    device's draw: gpt-fast's ``empty_like(probs).exponential_(1)`` sampling noise on vocab-sharded
    probabilities picks single device's token, the same on every rank."""
    whole = _whole_like(x, dim, full)
    getattr(whole, method)(*args, **kwargs)
    return _own_slice(x, whole, dim, full, rank)


def sharded_random_like(x: Tensor, fn, kwargs: dict, dim: int, full: int, rank: int | str) -> Tensor:
    """``fn(x, **kwargs)`` (``torch.rand_like`` / ``randn_like``) for this rank's slice ``x``: the
    whole draw, this rank's slice of it (see ``sharded_fill_random``)."""
    whole = fn(_whole_like(x, dim, full), **kwargs)
    return _own_slice(torch.empty_like(x, dtype=whole.dtype), whole, dim, full, rank)
