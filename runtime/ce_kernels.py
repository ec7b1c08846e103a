"""The local halves of the vocab-parallel cross-entropy, as ``torch.library`` custom ops.

The op splits into a local forward (per-row statistics of this rank's logit columns), one
collective with a log-sum-exp combine (``vocab_parallel.py``), and a local backward (the
gradient ``softmax - onehot``). The two local halves are custom ops ``tpcompile::...`` so
Dynamo/AOTAutograd/Inductor see one opaque node each (with a fake impl for shapes), and
so one name can stand for several implementations:

- ``"torch"``: plain torch, row chunks of at most ``CHUNK_ELEMS`` logits at a time, so a
  bf16/fp16 input is never copied whole to fp32 (each chunk is upcast, reduced, dropped).
- ``"triton"``: Triton kernels (``ce_triton.py``, ``torch.library.triton_op`` so Inductor
  sees into them); online softmax over vocab blocks, fp32 accumulation.
- ``"te"``: Transformer Engine's fused kernels (``te.py``), only when selected.

Selection (``impl_for``): the ``impl=`` argument, else ``TPCOMPILE_CE_IMPL``
(``auto``/``torch``/``triton``/``te``), else ``auto``: Triton for CUDA tensors when triton
imports, the chunked torch code otherwise.

Shapes: ``logits`` is ``[N, C]`` with unit column stride (this rank's columns; the first
``valid`` are real classes, the rest padding), ``target`` is ``[N]`` int64 with *global*
class ids; ``vocab_start`` is this rank's first global id.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

__all__ = ["ce_stats", "ce_grad", "ce_grad_", "impl_for", "IMPLS", "CHUNK_ELEMS"]

IMPLS = ("auto", "torch", "triton", "te")
# Largest number of logits the torch impl upcasts at once (4 MiB of fp32).
CHUNK_ELEMS = 1 << 20


def _rows_per_chunk(cols: int) -> int:
    return max(1, CHUNK_ELEMS // max(cols, 1))


def _n_stats(with_sum: bool) -> int:
    return 4 if with_sum else 3


# ---------------------------------------------------------------- forward: local statistics


def _stats_into(out: Tensor, logits: Tensor, target: Tensor, vocab_start: int, valid: int) -> None:
    """Fill ``out`` (fp32 ``[3 or 4, N]``) chunk by chunk: at most ``CHUNK_ELEMS`` logits
    are upcast at a time."""
    n = logits.shape[0]
    if valid == 0:
        out.zero_()
        out[0] = float("-inf")
        return
    local_t = target - vocab_start
    hit = (local_t >= 0) & (local_t < valid)
    idx = local_t.clamp(0, valid - 1)
    step = _rows_per_chunk(valid)
    for a in range(0, n, step):
        b = min(n, a + step)
        x = logits[a:b, :valid].float()  # one chunk in fp32 (a no-op view for fp32 input)
        m = x.amax(1)
        out[0, a:b] = m
        out[1, a:b] = (x - m.unsqueeze(1)).exp_().sum(1)
        out[2, a:b] = x.gather(1, idx[a:b].unsqueeze(1)).squeeze(1).masked_fill_(~hit[a:b], 0.0)
        if out.shape[0] == 4:
            out[3, a:b] = x.sum(1)


@torch.library.custom_op("tpcompile::ce_stats", mutates_args=())
def ce_stats(logits: Tensor, target: Tensor, vocab_start: int, valid: int, with_sum: bool) -> Tensor:
    """Per row over the first ``valid`` columns: max ``m``, ``sum exp(x - m)``, the target
    logit (0 when the target is not in this rank's range) and, if ``with_sum``, ``sum x``.
    Returns fp32 ``[3 or 4, N]``; a rank with no valid column gives ``(-inf, 0, 0, 0)``."""
    out = torch.empty((_n_stats(with_sum), logits.shape[0]), dtype=torch.float32, device=logits.device)
    _stats_into(out, logits, target, vocab_start, valid)
    return out


@ce_stats.register_fake
def _(logits, target, vocab_start, valid, with_sum):
    return logits.new_empty((_n_stats(with_sum), logits.shape[0]), dtype=torch.float32)


# ---------------------------------------------------------------- backward: local gradient


def _grad_into(out: Tensor, logits: Tensor, target, lse, scale, vocab_start, valid, eps, vocab_size) -> None:
    """``out = (softmax - (1 - eps) onehot - eps / V) * scale`` on valid columns, 0 on
    padding; chunk by chunk, so ``out`` may be ``logits`` itself."""
    n, c = logits.shape
    if valid < c:
        out[:, valid:] = 0
    if valid == 0:
        return
    local_t = target - vocab_start
    hit = (local_t >= 0) & (local_t < valid)
    idx = local_t.clamp(0, valid - 1).unsqueeze(1)
    step = _rows_per_chunk(valid)
    for a in range(0, n, step):
        b = min(n, a + step)
        p = (logits[a:b, :valid].float() - lse[a:b].unsqueeze(1)).exp_()
        if eps > 0:
            p.sub_(eps / vocab_size)
        p.scatter_add_(1, idx[a:b], hit[a:b].to(p.dtype).unsqueeze(1).mul_(-(1.0 - eps)))
        out[a:b, :valid] = p.mul_(scale[a:b].unsqueeze(1))


@torch.library.custom_op("tpcompile::ce_grad", mutates_args=())
def ce_grad(
    logits: Tensor, target: Tensor, lse: Tensor, scale: Tensor, vocab_start: int, valid: int, eps: float,
    vocab_size: int,
) -> Tensor:
    """Gradient of the loss w.r.t. this rank's logits: ``(softmax - (1 - eps) onehot -
    eps / V) * scale`` per row (``scale``: upstream grad, 0 for ignored rows, 1/count for
    'mean'), zeros on padding columns; in the logits' dtype."""
    out = torch.empty_like(logits)
    _grad_into(out, logits, target, lse, scale, vocab_start, valid, eps, vocab_size)
    return out


@ce_grad.register_fake
def _(logits, target, lse, scale, vocab_start, valid, eps, vocab_size):
    return torch.empty_like(logits)


@torch.library.custom_op("tpcompile::ce_grad_", mutates_args=("logits",))
def ce_grad_(
    logits: Tensor, target: Tensor, lse: Tensor, scale: Tensor, vocab_start: int, valid: int, eps: float,
    vocab_size: int,
) -> None:
    """``ce_grad`` written over ``logits`` (no second logits-sized buffer)."""
    _grad_into(logits, logits, target, lse, scale, vocab_start, valid, eps, vocab_size)


@ce_grad_.register_fake
def _(logits, target, lse, scale, vocab_start, valid, eps, vocab_size):
    return None


# ---------------------------------------------------------------- selection


def impl_for(logits: Tensor, impl: str | None = None) -> str:
    """Which implementation runs for ``logits``: ``impl``, else ``$TPCOMPILE_CE_IMPL``,
    else ``auto`` (Triton on CUDA when triton imports, torch otherwise)."""
    choice = impl or os.environ.get("TPCOMPILE_CE_IMPL", "auto") or "auto"
    if choice not in IMPLS:
        raise ValueError(f"cross-entropy impl must be one of {IMPLS}, got {choice!r} (argument impl= or TPCOMPILE_CE_IMPL)")
    if choice != "auto":
        return choice
    if logits.is_cuda:
        from . import ce_triton

        if ce_triton.available():
            return "triton"
    return "torch"


def ops(impl: str):
    """``(stats, grad, grad_)`` custom ops of ``impl`` (a resolved name, not ``auto``)."""
    if impl == "torch":
        return ce_stats, ce_grad, ce_grad_
    if impl == "triton":
        from . import ce_triton

        return ce_triton.require()
    if impl == "te":
        from . import te

        return te.require_ce()
    raise ValueError(f"unknown cross-entropy impl {impl!r}")
