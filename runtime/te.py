"""Transformer Engine's fused cross-entropy kernels behind tpcompile's local CE ops.

Optional (``pip install tpcompile[te]``), CUDA only, and imported only when selected
(``impl="te"`` or ``TPCOMPILE_CE_IMPL=te``). TE's parallel cross-entropy
(``transformer_engine.pytorch.triton.cross_entropy``) has the same split as ours: a
per-rank online-softmax kernel writing ``(m, d, x_target, -eps/V * sum x)`` per row, and
an in-place backward kernel writing ``(exp(x - m) / d - eps/V - (1 - eps)[target]) *
grad_row``. We call those two kernels for the local halves and keep our own single
all-gather + combine, so ignore_index, reduction and the collective stay the same for
every implementation:

- stats: TE's row ``(m, d, x_y, s)`` -> ours ``(m, d, x_y or 0, -s V / eps)``;
- grad: TE's backward kernel with ``m = lse``, ``d = 1`` and ``grad_row = scale``.

TE assumes equal shards with no padding columns (``rank = vocab_start / C``) and unit
column stride; other calls raise and name the fix (``impl="triton"``). The kernel
signatures are TE internals (checked against TE 2.x's ``online_softmax_kernel(...,
world_size, label_smoothing, BLOCK_SIZE)``); a mismatch raises with the TE version.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["require_ce", "check_shards"]

_OPS = None


def _import_te():
    if not torch.cuda.is_available():
        raise RuntimeError(
            "cross-entropy impl 'te' was selected but CUDA is not available; Transformer Engine "
            "kernels run on NVIDIA GPUs only (select impl='torch', or TPCOMPILE_CE_IMPL=torch/auto)"
        )
    try:
        import transformer_engine
        from transformer_engine.pytorch.triton import cross_entropy as te_ce
    except ImportError as e:
        raise RuntimeError(
            "cross-entropy impl 'te' was selected but transformer_engine does not import "
            f"({e}); `pip install tpcompile[te]` or select impl='triton' (TPCOMPILE_CE_IMPL=triton)"
        ) from e
    return transformer_engine, te_ce


def _check(logits: Tensor, vocab_start: int, valid: int) -> tuple[int, int]:
    n, c = logits.shape
    if valid != c or vocab_start % c:
        raise ValueError(
            f"impl 'te' needs equal vocab shards without padding columns (this rank: {c} columns, "
            f"{valid} real, vocab_start={vocab_start}); pad the vocabulary to a multiple of tp "
            "or select impl='triton'"
        )
    return n, c


def check_shards(cols: int, vocab_start: int, vocab_size: int) -> None:
    """Every rank raises (before the collective, so none hangs) unless the vocabulary
    splits into equal shards of ``cols`` columns with no padding."""
    if vocab_size % cols or vocab_start % cols:
        raise ValueError(
            f"impl 'te' needs equal vocab shards without padding columns (V={vocab_size}, {cols} "
            f"columns per rank, vocab_start={vocab_start}); pad the vocabulary to a multiple of tp "
            "or select impl='triton'"
        )


def _build():
    import triton

    te, te_ce = _import_te()
    block = lambda c: min(getattr(te_ce, "MAX_FUSED_SIZE", 32768), triton.next_power_of_2(c))  # noqa: E731

    def _mismatch(e: Exception):
        return RuntimeError(
            f"transformer_engine {getattr(te, '__version__', '?')}: its cross-entropy kernels do not "
            f"take the arguments tpcompile passes ({e}); select impl='triton'"
        )

    @torch.library.custom_op("tpcompile::ce_stats_te", mutates_args=())
    def ce_stats_te(logits: Tensor, target: Tensor, vocab_start: int, valid: int, with_sum: bool) -> Tensor:
        n, c = _check(logits, vocab_start, valid)
        k = 4 if with_sum else 3
        eps = 0.5 if with_sum else 0.0  # any eps > 0 makes TE write -eps/V * sum x
        buf = torch.zeros(n, k, dtype=torch.float32, device=logits.device)
        try:
            te_ce.online_softmax_kernel[(n,)](
                X_ptr=logits, X_stride=logits.stride(0), Y_ptr=target, Y_stride=1, m_d_X_y_ptr=buf,
                m_d_X_y_stride=1, rank=vocab_start // c, n_cols=c, world_size=1, label_smoothing=eps,
                BLOCK_SIZE=block(c), num_warps=32,
            )
        except TypeError as e:
            raise _mismatch(e) from e
        out = buf.t().contiguous()
        out[2] = out[2].masked_fill(out[2].isneginf(), 0.0)  # TE marks "target elsewhere" with -inf
        if with_sum:
            out[3] = out[3] * (-c / eps)  # world_size=1 above: TE's eps/V is eps / c
        return out

    @ce_stats_te.register_fake
    def _(logits, target, vocab_start, valid, with_sum):
        return logits.new_empty((4 if with_sum else 3, logits.shape[0]), dtype=torch.float32)

    def _grad_inplace(logits, target, lse, scale, vocab_start, eps, vocab_size):
        n, c = logits.shape
        m_d = torch.stack([lse.float(), torch.ones_like(lse, dtype=torch.float32)], 1)
        m_d = torch.cat([m_d, m_d.new_zeros(n, 2 if eps > 0 else 1)], 1).contiguous()
        try:
            te_ce.cross_entropy_backward_kernel[(n,)](
                logits, logits.stride(0), Y_ptr=target, Y_stride=1, m_d_X_y_ptr=m_d, m_d_X_y_stride=1,
                grad_output_ptr=scale.float().contiguous(), grad_output_stride=1, rank=vocab_start // c,
                world_size=vocab_size // c, n_cols=c, n_non_ignore=n, reduce_loss=False, label_smoothing=eps,
                BLOCK_SIZE=block(c), num_warps=32,
            )
        except TypeError as e:
            raise _mismatch(e) from e

    @torch.library.custom_op("tpcompile::ce_grad_te_", mutates_args=("logits",))
    def ce_grad_te_(
        logits: Tensor, target: Tensor, lse: Tensor, scale: Tensor, vocab_start: int, valid: int, eps: float,
        vocab_size: int,
    ) -> None:
        _check(logits, vocab_start, valid)
        _grad_inplace(logits, target, lse, scale, vocab_start, eps, vocab_size)

    @ce_grad_te_.register_fake
    def _(logits, target, lse, scale, vocab_start, valid, eps, vocab_size):
        return None

    @torch.library.custom_op("tpcompile::ce_grad_te", mutates_args=())
    def ce_grad_te(
        logits: Tensor, target: Tensor, lse: Tensor, scale: Tensor, vocab_start: int, valid: int, eps: float,
        vocab_size: int,
    ) -> Tensor:
        _check(logits, vocab_start, valid)
        out = logits.clone()
        _grad_inplace(out, target, lse, scale, vocab_start, eps, vocab_size)
        return out

    @ce_grad_te.register_fake
    def _(logits, target, lse, scale, vocab_start, valid, eps, vocab_size):
        return torch.empty_like(logits)

    return ce_stats_te, ce_grad_te, ce_grad_te_


def require_ce():
    """``(stats, grad, grad_)`` custom ops backed by TE's kernels; a clear error when TE or
    CUDA is missing. Built once, on first selection."""
    global _OPS
    if _OPS is None:
        _OPS = _build()
    return _OPS
