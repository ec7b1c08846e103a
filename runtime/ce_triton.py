"""Triton kernels for the local halves of the vocab-parallel cross-entropy.

Registered with ``torch.library.triton_op`` and launched through ``wrap_triton`` so that
Inductor sees the kernels themselves (it can schedule them, and reuse buffers around them)
rather than an opaque extern call. Imported only when selected (``ce_kernels.impl_for``):
CUDA tensors, or ``impl="triton"`` / ``TPCOMPILE_CE_IMPL=triton``. On CPU they run under
``TRITON_INTERPRET=1`` (set before triton is imported) - the tests do that.

- ``_stats_kernel``: one program per row, online softmax over ``BLOCK``-wide column
  blocks: running max ``m`` and ``s = sum exp(x - m)`` rescaled by ``exp(m_old - m_new)``
  at each block, plus the target logit (one masked load) and, for smoothing, ``sum x``.
  fp32 accumulation whatever the logits' dtype; padding columns are never read.
- ``_grad_kernel``: one program per (row, column block): ``(exp(x - lse) - eps / V -
  (1 - eps) [col == target]) * scale``, 0 on padding; input and output pointers may be the
  same tensor (each program reads its block before writing it), which is ``ce_grad_``.
"""
from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

__all__ = ["available", "require"]

MAX_BLOCK = 4096


def available() -> bool:
    return triton is not None


def _block(cols: int) -> int:
    return max(16, min(MAX_BLOCK, triton.next_power_of_2(max(cols, 1))))


if triton is not None:

    @triton.jit
    def _stats_kernel(
        x_ptr, t_ptr, out_ptr, n_rows, stride_x, vocab_start, valid,
        WITH_SUM: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        z = tl.zeros((), tl.float32)
        for start in range(0, valid, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < valid
            x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: no nan
            s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), 0)
            m = m_new
            if WITH_SUM:
                z += tl.sum(tl.where(mask, x, 0.0), 0)
        lt = tl.load(t_ptr + row) - vocab_start
        hit = (lt >= 0) & (lt < valid)
        t = tl.load(x_row + tl.where(hit, lt, 0), mask=hit, other=0.0).to(tl.float32)
        tl.store(out_ptr + row, m)
        tl.store(out_ptr + n_rows + row, s)
        tl.store(out_ptr + 2 * n_rows + row, t)
        if WITH_SUM:
            tl.store(out_ptr + 3 * n_rows + row, z)

    @triton.jit
    def _grad_kernel(
        x_ptr, g_ptr, t_ptr, lse_ptr, scale_ptr, stride_x, stride_g, n_cols, vocab_start, valid,
        eps, smooth, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        real = cols < valid
        x = tl.load(x_ptr + row * stride_x + cols, mask=real, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + row)
        scale = tl.load(scale_ptr + row)
        lt = tl.load(t_ptr + row) - vocab_start
        p = tl.exp(x - lse) - smooth - tl.where(cols == lt, 1.0 - eps, 0.0)
        g = tl.where(real, p * scale, 0.0)
        tl.store(g_ptr + row * stride_g + cols, g.to(g_ptr.dtype.element_ty), mask=cols < n_cols)

    @torch.library.triton_op("tpcompile::ce_stats_triton", mutates_args=())
    def ce_stats_triton(logits: Tensor, target: Tensor, vocab_start: int, valid: int, with_sum: bool) -> Tensor:
        """Triton twin of ``tpcompile::ce_stats``."""
        n = logits.shape[0]
        out = torch.empty((4 if with_sum else 3, n), dtype=torch.float32, device=logits.device)
        if valid == 0:
            out.zero_()
            out[0] = float("-inf")
            return out
        if n:
            torch.library.wrap_triton(_stats_kernel)[(n,)](
                logits, target, out, n, logits.stride(0), vocab_start, valid,
                WITH_SUM=with_sum, BLOCK=_block(valid),
            )
        return out

    def _launch_grad(out, logits, target, lse, scale, vocab_start, valid, eps, vocab_size):
        n, c = logits.shape
        if n and c:
            block = _block(c)
            torch.library.wrap_triton(_grad_kernel)[(n, triton.cdiv(c, block))](
                logits, out, target, lse, scale, logits.stride(0), out.stride(0), c, vocab_start, valid,
                eps, eps / vocab_size, BLOCK=block,
            )

    @torch.library.triton_op("tpcompile::ce_grad_triton", mutates_args=())
    def ce_grad_triton(
        logits: Tensor, target: Tensor, lse: Tensor, scale: Tensor, vocab_start: int, valid: int, eps: float,
        vocab_size: int,
    ) -> Tensor:
        """Triton twin of ``tpcompile::ce_grad``."""
        out = torch.empty_like(logits)
        _launch_grad(out, logits, target, lse, scale, vocab_start, valid, eps, vocab_size)
        return out

    @torch.library.triton_op("tpcompile::ce_grad_triton_", mutates_args=("logits",))
    def ce_grad_triton_(
        logits: Tensor, target: Tensor, lse: Tensor, scale: Tensor, vocab_start: int, valid: int, eps: float,
        vocab_size: int,
    ) -> None:
        """Triton twin of ``tpcompile::ce_grad_`` (gradient over the logits)."""
        _launch_grad(logits, logits, target, lse, scale, vocab_start, valid, eps, vocab_size)


if triton is not None:
    # triton_op's own fake impl runs ``fn`` on fake tensors; under TRITON_INTERPRET=1
    # ``wrap_triton`` hands back the interpreted kernel, which cannot run on fake tensors.
    # Shapes only, for every mode (on CUDA, AOTAutograd still decomposes ``fn`` for Inductor).
    @ce_stats_triton.register_fake
    def _(logits, target, vocab_start, valid, with_sum):
        return logits.new_empty((4 if with_sum else 3, logits.shape[0]), dtype=torch.float32)

    @ce_grad_triton.register_fake
    def _(logits, target, lse, scale, vocab_start, valid, eps, vocab_size):
        return torch.empty_like(logits)

    @ce_grad_triton_.register_fake
    def _(logits, target, lse, scale, vocab_start, valid, eps, vocab_size):
        return None


def require():
    """``(stats, grad, grad_)`` Triton ops, or a clear error when triton is missing."""
    if triton is None:
        raise RuntimeError(
            "cross-entropy impl 'triton' was selected but triton does not import; "
            "`pip install triton` or select impl='torch' (TPCOMPILE_CE_IMPL=torch)"
        )
    return ce_stats_triton, ce_grad_triton, ce_grad_triton_
