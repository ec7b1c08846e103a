"""Run the Triton cross-entropy kernels under ``TRITON_INTERPRET=1`` on CPU; print JSON.

A script, not a test module: the interpreter must be switched on before triton is
imported, so ``test_ce_kernels.py`` runs this in a fresh process and checks the numbers.
For each case it reports the largest absolute errors of

- ``ops``: the Triton ops against the torch ops (``tpcompile::ce_stats`` / ``ce_grad``) on
  a vocab slice with an offset ``vocab_start``, padding columns, ignored rows;
- ``full``: ``vocab_parallel_cross_entropy(impl="triton")`` on a 1-rank gloo group
  against ``F.cross_entropy`` (loss and gradient; padding columns must get 0).
"""
from __future__ import annotations

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# name: (rows, V, padding columns, reduction, label_smoothing, ignore_index, dtype, inplace_backward)
FULL = {
    "mean": (7, 37, 0, "mean", 0.0, -100, torch.float32, False),
    "sum_smooth": (7, 37, 0, "sum", 0.1, -100, torch.float32, False),
    "none_smooth_pad": (7, 37, 3, "none", 0.2, -100, torch.float32, False),
    "mean_smooth_pad_ignore3": (7, 37, 5, "mean", 0.1, 3, torch.float32, False),
    "mean_inplace": (7, 37, 3, "mean", 0.1, -100, torch.float32, True),
    "bf16_mean_smooth": (7, 37, 3, "mean", 0.1, -100, torch.bfloat16, False),
    "wide_multiblock": (3, 5000, 7, "mean", 0.1, -100, torch.float32, False),  # > one 4096 block
}
# name: (rows, local columns, vocab_start, valid, with_sum, dtype)
OPS = {
    "slice_fp32": (6, 20, 17, 20, True, torch.float32),
    "slice_pad_fp32": (6, 20, 40, 13, False, torch.float32),
    "slice_pad_bf16": (6, 20, 40, 13, True, torch.bfloat16),
    "all_padding": (4, 8, 50, 0, True, torch.float32),
}


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def run_ops() -> dict:
    from tpcompile.runtime import ce_kernels, ce_triton

    out = {}
    for k, (n, c, start, valid, with_sum, dtype) in enumerate(OPS.values()):
        g = torch.Generator().manual_seed(k)
        x = (3 * torch.randn(n, c, generator=g)).to(dtype)
        t = torch.randint(start - 5, start + c + 5, (n,), generator=g)  # some targets elsewhere
        t[::3] = -100
        a = ce_kernels.ce_stats(x, t, start, valid, with_sum)
        b = ce_triton.ce_stats_triton(x, t, start, valid, with_sum)
        lse = a[0] + a[1].log() + 0.5 if valid else torch.zeros(n)  # a plausible lse (> row max)
        scale = torch.rand(n, generator=g).masked_fill(t == -100, 0.0)
        ga = ce_kernels.ce_grad(x, t, lse, scale, start, valid, 0.1, 60)
        gb = ce_triton.ce_grad_triton(x, t, lse, scale, start, valid, 0.1, 60)
        gc = x.clone()
        ce_triton.ce_grad_triton_(gc, t, lse, scale, start, valid, 0.1, 60)
        out[list(OPS)[k]] = {
            "stats": _err(a.nan_to_num(neginf=-1e30), b.nan_to_num(neginf=-1e30)),
            "grad": _err(ga.float(), gb.float()),
            "grad_inplace_vs_out": _err(gc.float(), gb.float()),
            "grad_dtype": str(gb.dtype),
            "pad_grad_max": gb[:, valid:].float().abs().max().item() if valid < c else 0.0,
        }
    return out


def run_full() -> dict:
    from tpcompile.runtime import vocab_parallel_cross_entropy

    out = {}
    name = dist.group.WORLD.group_name
    for k, (case, (n, V, pad, red, eps, ign, dtype, inplace)) in enumerate(FULL.items()):
        g = torch.Generator().manual_seed(100 + k)
        x = (3 * torch.randn(n, V, generator=g)).to(dtype)
        t = torch.randint(0, V, (n,), generator=g)
        t[1::3] = ign
        up = torch.rand(n if red == "none" else (), generator=g) + 0.5
        kw = dict(ignore_index=ign, reduction=red, label_smoothing=eps)
        ref_x = x.float().clone().requires_grad_()
        ref = F.cross_entropy(ref_x, t, **kw)
        ref.backward(up.to(dtype).float())
        local = torch.cat([x, torch.full((n, pad), 50.0, dtype=dtype)], 1).requires_grad_()
        # inplace_backward writes over the logits, so feed an intermediate, not the leaf
        logits = local * 1 if inplace else local
        loss = vocab_parallel_cross_entropy(logits, t, 0, V, name, impl="triton", inplace_backward=inplace, **kw)
        loss.backward(up.to(dtype))
        out[case] = {
            "loss": _err(loss.float(), ref.detach()),
            "grad": _err(local.grad[:, :V].float(), ref_x.grad),
            "pad_grad_max": local.grad[:, V:].float().abs().max().item() if pad else 0.0,
            "loss_dtype": str(loss.dtype),
            "grad_scale": ref_x.grad.abs().max().item(),
        }
    return out


CPU_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor")


def run_opcheck() -> dict:
    from tpcompile.runtime import ce_triton

    x = torch.randn(4, 9)
    t = torch.tensor([0, 3, -100, 8])
    lse = torch.logsumexp(x, 1)
    scale = torch.ones(4)
    res = {}
    for name, op, args in [
        ("ce_stats_triton", ce_triton.ce_stats_triton, (x, t, 0, 9, True)),
        ("ce_grad_triton", ce_triton.ce_grad_triton, (x, t, lse, scale, 0, 9, 0.1, 9)),
        ("ce_grad_triton_", ce_triton.ce_grad_triton_, (x.clone(), t, lse, scale, 0, 9, 0.1, 9)),
    ]:
        try:
            # aot_dispatch tests decompose the triton_op into its kernel on fake tensors, which the
            # interpreter cannot run: those run on GPU (test_ce_kernels.py, gpu marker)
            torch.library.opcheck(op, args, test_utils=CPU_OPCHECK)
            res[name] = "ok"
        except Exception as e:  # noqa: BLE001 - reported to the test
            res[name] = f"{type(e).__name__}: {e}"
    return res


if __name__ == "__main__":
    torch.manual_seed(0)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    result = {"ops": run_ops(), "full": run_full(), "opcheck": run_opcheck()}
    dist.destroy_process_group()
    json.dump(result, sys.stdout)
