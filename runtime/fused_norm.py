"""Fused row-parallel reduction + residual add + RMSNorm (+ sequence-parallel all-gather).

Megatron's inference layers (``InferenceRowParallelLinear`` / ``InferenceLayerNormColumnParallelLinear``)
run the reduction after a row-parallel linear, the residual add, the next RMSNorm and (with
sequence parallelism) the next all-gather as one kernel over symmetric memory. This is that op, in
its two forms, as one ``torch.library`` custom op:

- no SP:  ``h = all_reduce(partial) + residual``; returns ``(rms_norm(h), h)``;
- SP:     ``h = reduce_scatter(partial, dim) + residual`` (this rank's tokens);
          returns ``(all_gather(rms_norm(h), dim), h)``.

``h`` is the new residual stream (what the next residual add reads). The norm is computed in the
same op order as the spelling the pass found (``NormForm``), so the CPU implementation is bitwise
equal to the unfused eager graph (the collective is the same functional collective). Under
Inductor the unfused graph's norm is one generated kernel whose reduction order may differ by an
ulp; the fused op is opaque to Inductor and keeps eager's order.

CUDA: the all-reduce of the no-SP form runs on torch's symmetric-memory collectives
(``torch.ops.symm_mem``: multimem one-shot where the hardware has NVLS multicast, else one-shot
below ``ONE_SHOT_MAX_BYTES`` and two-shot below ``TWO_SHOT_MAX_BYTES``), and falls back to NCCL
above those sizes or where the group has no symmetric memory. The SP form uses NCCL's
reduce-scatter / all-gather (the token dim of ``[B, T, H]`` is not the leading dim that
``symm_mem.reduce_scatter_out`` splits). Add and norm are torch ops there (no Triton kernel yet).

Backward (``tp_compile(..., fuse_norm=True)`` in training): the conjugate collectives around
autograd's gradient of the same norm arithmetic, the residual stream's gradient joined in autograd's
order: bitwise equal to the unfused program's gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .mappings import _all_gather, _all_reduce, _reduce_scatter

__all__ = ["NormForm", "reduce_add_rms_norm", "rms_norm_reference", "ONE_SHOT_MAX_BYTES", "TWO_SHOT_MAX_BYTES"]

ONE_SHOT_MAX_BYTES = 256 * 1024  # one-shot: every rank reads every peer's buffer (latency-bound sizes)
TWO_SHOT_MAX_BYTES = 8 * 1024 * 1024  # two-shot: reduce-scatter + all-gather in the symmetric buffer


@dataclass(frozen=True)
class NormForm:
    """How a model spells its RMSNorm, step by step, so the fused op repeats the same arithmetic.

    ``torch.rms_norm`` when ``aten``; else ``x = h.float() if upcast else h``,
    ``y = x * rsqrt(mean(x*x, -1, keepdim) + eps)``, then ``tail`` in order: ``"c"`` casts to
    ``h``'s dtype, ``"w"`` multiplies by ``(offset + w.float() if weight_upcast else offset + w)``
    (``offset`` 1.0 is Gemma's ``1 + w``; 0.0 adds nothing).
    """

    eps: float
    aten: bool = False
    upcast: bool = False
    tail: str = ""
    offset: float = 0.0
    weight_upcast: bool = False


def rms_norm_reference(h: Tensor, weight: Tensor | None, form: NormForm) -> Tensor:
    """The norm of ``h`` exactly as the model's own spelling computes it."""
    if form.aten:
        return torch.rms_norm(h, (h.shape[-1],), weight, form.eps)
    x = h.float() if form.upcast else h
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + form.eps)
    for step in form.tail:
        if step == "c":
            y = y.to(h.dtype)
        else:
            w = weight.float() if form.weight_upcast else weight
            y = y * (w + form.offset if form.offset else w)
    return y


def _form(eps, aten, upcast, tail, offset, weight_upcast) -> NormForm:
    return NormForm(eps, aten, upcast, tail, offset, weight_upcast)


def _reduce_add_norm(partial: Tensor, residual: Tensor, weight: Tensor | None, group: str, sp_dim: int | None,
                     form: NormForm, all_reduce) -> tuple[Tensor, Tensor]:
    """Both forms of the op, ``all_reduce`` the one the device has (functional or symmetric memory)."""
    if sp_dim is None:
        h = all_reduce(partial, group) + residual
        return rms_norm_reference(h, weight, form), h
    h = _reduce_scatter(partial, sp_dim, group) + residual
    return _all_gather(rms_norm_reference(h, weight, form), sp_dim, group), h


@torch.library.custom_op("tpcompile::reduce_add_rms_norm", mutates_args=())
def _reduce_add_rms_norm(partial: Tensor, residual: Tensor, weight: Tensor | None, group: str,
                         sp_dim: int | None, eps: float, aten: bool, upcast: bool, tail: str, offset: float,
                         weight_upcast: bool) -> tuple[Tensor, Tensor]:
    form = _form(eps, aten, upcast, tail, offset, weight_upcast)
    return _reduce_add_norm(partial, residual, weight, group, sp_dim, form, _all_reduce)


@_reduce_add_rms_norm.register_fake
def _(partial, residual, weight, group, sp_dim, eps, aten, upcast, tail, offset, weight_upcast):
    h = torch.empty_like(residual, dtype=torch.promote_types(partial.dtype, residual.dtype))
    normed = rms_norm_reference(h, weight, _form(eps, aten, upcast, tail, offset, weight_upcast))
    return (torch.empty_like(partial, dtype=normed.dtype) if sp_dim is not None else normed), h


@_reduce_add_rms_norm.register_kernel("cuda")
def _(partial, residual, weight, group, sp_dim, eps, aten, upcast, tail, offset, weight_upcast):
    form = _form(eps, aten, upcast, tail, offset, weight_upcast)
    return _reduce_add_norm(partial, residual, weight, group, sp_dim, form, _symm_all_reduce)


def _setup_context(ctx, inputs, output):
    partial, residual, weight, group, sp_dim, *form = inputs
    ctx.save_for_backward(output[1], weight)
    ctx.group, ctx.sp_dim, ctx.form, ctx.partial_dtype = group, sp_dim, _form(*form), partial.dtype


def _backward(ctx, g_normed, g_h):
    """Megatron's conjugates around the norm's own gradient: with SP the all-gather's backward is a
    reduce-scatter of ``g_normed`` and the reduce-scatter's an all-gather of ``g_h``; without SP the
    all-reduce's backward is the identity (the f after the op all-reduces the column input's grad).
    The norm's gradient is autograd's on the same arithmetic (``rms_norm_reference``)."""
    h, weight = ctx.saved_tensors
    group, sp_dim = ctx.group, ctx.sp_dim
    g_w = None
    if g_normed is not None:
        if sp_dim is not None:
            g_normed = _reduce_scatter(g_normed, sp_dim, group)
        with torch.enable_grad():
            hh = h.detach().requires_grad_()
            ww = weight.detach().requires_grad_() if weight is not None and ctx.needs_input_grad[2] else weight
            stream = hh.view_as(hh)  # the residual stream's own consumers: their gradient joins in autograd's order
            normed = rms_norm_reference(stream, ww, ctx.form)
            wants = [hh] + ([ww] if ww is not weight else [])
            outs, g_outs = ([normed, stream], [g_normed, g_h]) if g_h is not None else ([normed], [g_normed])
            grads = torch.autograd.grad(outs, wants, g_outs)
        g_h = grads[0]
        g_w = grads[1] if len(grads) > 1 else None
    if g_h is None:
        g_h = torch.zeros_like(h)
    g_partial = (_all_gather(g_h, sp_dim, group) if sp_dim is not None else g_h).to(ctx.partial_dtype)
    return g_partial, g_h, g_w, None, None, None, None, None, None, None, None


_reduce_add_rms_norm.register_autograd(_backward, setup_context=_setup_context)


def reduce_add_rms_norm(partial: Tensor, residual: Tensor, weight: Tensor | None, group: str,
                        sp_dim: int | None, form: NormForm) -> tuple[Tensor, Tensor]:
    """``(normed, new_residual)``: the row-parallel ``partial`` summed over ``group`` (all-reduce,
    or reduce-scatter over ``sp_dim`` with SP), plus ``residual``, then the RMSNorm ``form`` with
    ``weight`` (and, with SP, the normed shard all-gathered over ``sp_dim`` for the next
    column-parallel linear). What the rewritten graphs call (``passes/fused_norm.py``)."""
    return torch.ops.tpcompile.reduce_add_rms_norm(partial, residual, weight, group, sp_dim, form.eps, form.aten,
                                                   form.upcast, form.tail, form.offset, form.weight_upcast)


# ---------------------------------------------------------------- CUDA: symmetric memory

_BUFFERS: dict = {}  # (group, device, dtype, numel) -> (symmetric buffer, handle)


def _symm_buffer(group: str, like: Tensor):
    """A symmetric-memory buffer shaped like ``like`` for ``group`` (allocated and rendezvoused once:
    every rank runs the same program, so every rank asks for the same buffers in the same order)."""
    import torch.distributed._symmetric_memory as symm_mem

    key = (group, like.device, like.dtype, like.numel())
    if key not in _BUFFERS:
        buf = symm_mem.empty(like.numel(), dtype=like.dtype, device=like.device)
        _BUFFERS[key] = (buf, symm_mem.rendezvous(buf, group))
    buf, hdl = _BUFFERS[key]
    return buf.view(like.shape), hdl


def _symm_all_reduce(x: Tensor, group: str) -> Tensor:
    """All-reduce (sum) on symmetric memory where the size and the group allow, else NCCL."""
    import torch.distributed._symmetric_memory as symm_mem

    nbytes = x.numel() * x.element_size()
    if nbytes > TWO_SHOT_MAX_BYTES or not symm_mem.is_symm_mem_enabled_for_group(group):
        return _all_reduce(x, group)
    buf, hdl = _symm_buffer(group, x)
    if getattr(hdl, "has_multicast_support", False) and x.dtype in (torch.bfloat16, torch.float32):
        buf.copy_(x.contiguous())
        return torch.ops.symm_mem.multimem_one_shot_all_reduce(buf, "sum", group)
    if nbytes <= ONE_SHOT_MAX_BYTES:
        return torch.ops.symm_mem.one_shot_all_reduce_copy(buf, x.contiguous(), "sum", group)
    buf.copy_(x.contiguous())
    return torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", group).clone()
