"""The local cross-entropy custom ops: schema/fake checks, chunking, fp32 accuracy, Triton.

The torch ops run in this process. The Triton kernels run on CPU under
``TRITON_INTERPRET=1`` in one subprocess (``ce_triton_cases.py``; the variable must be set
before triton is imported), checked against the torch ops and ``F.cross_entropy``.
GPU tests (marker) run the same kernels compiled for CUDA.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import ce_triton_cases as cases
from tpcompile.runtime import ce_kernels

HERE = os.path.dirname(os.path.abspath(__file__))


def _data(n, c, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(n, c, generator=g)).to(dtype)
    t = torch.randint(0, c, (n,), generator=g)
    t[::4] = -100
    return x, t


def _loss_rows(stats: torch.Tensor) -> torch.Tensor:
    """Per-row CE from one rank's stats holding the whole vocabulary (tp=1)."""
    return stats[0] + stats[1].log() - stats[2]


# ---------------------------------------------------------------- torch ops


@pytest.mark.parametrize("with_sum", [False, True])
def test_opcheck_torch_ops(with_sum):
    x, t = _data(5, 11)
    lse = torch.logsumexp(x, 1)
    scale = torch.rand(5)
    torch.library.opcheck(ce_kernels.ce_stats, (x, t, 3, 8, with_sum))
    torch.library.opcheck(ce_kernels.ce_grad, (x, t, lse, scale, 3, 8, 0.1, 20))
    torch.library.opcheck(ce_kernels.ce_grad_, (x.clone(), t, lse, scale, 3, 8, 0.1, 20))


def test_chunked_equals_one_chunk(monkeypatch):
    """Row chunks of 3 give the same stats and gradient as one pass, and the loss of
    ``F.cross_entropy`` (tp=1: stats of the whole vocabulary)."""
    x, t = _data(10, 13)
    whole = ce_kernels.ce_stats(x, t, 0, 13, True)
    lse = whole[0] + whole[1].log()
    scale = (t != -100).float()
    g_whole = ce_kernels.ce_grad(x, t, lse, scale, 0, 13, 0.1, 13)
    monkeypatch.setattr(ce_kernels, "CHUNK_ELEMS", 40)  # 3 rows of 13
    chunked = ce_kernels.ce_stats(x, t, 0, 13, True)
    g_chunked = ce_kernels.ce_grad(x, t, lse, scale, 0, 13, 0.1, 13)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
    torch.testing.assert_close(g_chunked, g_whole, rtol=0, atol=0)
    want = F.cross_entropy(x, t, reduction="none")
    keep = t != -100
    torch.testing.assert_close(_loss_rows(chunked)[keep], want[keep], rtol=1e-6, atol=1e-6)
    xr = x.clone().requires_grad_()
    F.cross_entropy(xr, t, reduction="sum", label_smoothing=0.1).backward()
    torch.testing.assert_close(g_chunked, xr.grad, rtol=1e-6, atol=1e-6)


class _Fp32Sizes(TorchDispatchMode):
    """Records the element count of every fp32 tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor) and o.dtype == torch.float32:
                self.sizes.append(o.numel())
        return out


def test_bf16_never_upcast_whole(monkeypatch):
    """bf16 logits: no fp32 temporary larger than one chunk (the full fp32 copy would be
    64 x 100 = 6400 elements; a chunk is 10 rows = 1000)."""
    monkeypatch.setattr(ce_kernels, "CHUNK_ELEMS", 1000)
    x, t = _data(64, 100, torch.bfloat16)
    out = torch.empty(4, 64)
    lse, scale = torch.randn(64), torch.rand(64)
    grad = torch.empty_like(x)
    with _Fp32Sizes() as mode:
        ce_kernels._stats_into(out, x, t, 0, 100)
        ce_kernels._grad_into(grad, x, t, lse, scale, 0, 100, 0.1, 100)
    assert mode.sizes and max(mode.sizes) <= 1000, max(mode.sizes)


def test_bf16_loss_is_fp32_accurate():
    """The per-row loss of bf16 logits equals fp32 maths on the same (upcast) values to
    fp32 precision; rounding to bf16 happens once, at the end, as in F.cross_entropy."""
    x, t = _data(256, 1000, torch.bfloat16)
    got = _loss_rows(ce_kernels.ce_stats(x, t, 0, 1000, False))
    want = F.cross_entropy(x.double(), t, reduction="none").float()
    keep = t != -100
    torch.testing.assert_close(got[keep], want[keep], rtol=2e-6, atol=2e-6)


def test_impl_selection(monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.delenv("TPCOMPILE_CE_IMPL", raising=False)
    assert ce_kernels.impl_for(x) == "torch"  # CPU tensors: the chunked torch code
    assert ce_kernels.impl_for(x, "triton") == "triton"
    monkeypatch.setenv("TPCOMPILE_CE_IMPL", "triton")
    assert ce_kernels.impl_for(x) == "triton"
    assert ce_kernels.impl_for(x, "torch") == "torch"  # the argument wins
    monkeypatch.setenv("TPCOMPILE_CE_IMPL", "cuda")
    with pytest.raises(ValueError, match=r"one of \('auto', 'torch', 'triton', 'te'\), got 'cuda'.*TPCOMPILE_CE_IMPL"):
        ce_kernels.impl_for(x)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_te_selected_without_cuda_is_a_clear_error():
    with pytest.raises(RuntimeError, match="impl 'te' was selected but .*TPCOMPILE_CE_IMPL"):
        ce_kernels.ops("te")


# ---------------------------------------------------------------- Triton under the interpreter


@pytest.fixture(scope="module")
def triton_results():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "ce_triton_cases.py")], capture_output=True, text=True, env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("case", list(cases.OPS))
def test_triton_ops_match_torch_ops(triton_results, case):
    r = triton_results["ops"][case]
    dtype = cases.OPS[case][-1]
    assert r["stats"] <= 1e-5  # fp32 accumulation in both, in another order
    # gradient: fp32 maths in both, rounded once to the logits' dtype (1 ulp for bf16)
    assert r["grad"] <= (1e-6 if dtype == torch.float32 else 2**-7)
    assert r["grad_dtype"] == str(dtype)
    assert r["grad_inplace_vs_out"] == 0.0
    assert r["pad_grad_max"] == 0.0


@pytest.mark.parametrize("case", list(cases.FULL))
def test_triton_cross_entropy_matches_torch(triton_results, case):
    r = triton_results["full"][case]
    dtype = cases.FULL[case][6]
    if dtype == torch.float32:
        assert r["loss"] <= 2e-6 and r["grad"] <= 1e-6
    else:  # bf16 output: half an ulp of a loss below 16 is 2^-5; gradient within one ulp
        assert r["loss"] <= 2**-5 and r["grad"] <= 2**-7 * r["grad_scale"]
    assert r["loss_dtype"] == str(dtype)
    assert r["pad_grad_max"] == 0.0


def test_triton_opcheck_under_interpreter(triton_results):
    assert triton_results["opcheck"] == {k: "ok" for k in ("ce_stats_triton", "ce_grad_triton", "ce_grad_triton_")}


# ---------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction,eps", [("mean", 0.0), ("sum", 0.1), ("none", 0.1)])
def test_triton_cuda_matches_cross_entropy(dtype, reduction, eps):
    """tp=1 on one GPU (NCCL group of one): the Triton path, eager and under Inductor."""
    import torch.distributed as dist

    from tpcompile.runtime import ce_triton, vocab_parallel_cross_entropy

    if not dist.is_initialized():
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    name = dist.group.WORLD.group_name
    x, t = _data(512, 5003, dtype)
    x, t = x.cuda(), t.cuda()
    assert ce_kernels.impl_for(x) == "triton"
    ref_x = x.float().clone().requires_grad_()
    ref = F.cross_entropy(ref_x, t, reduction=reduction, label_smoothing=eps)
    up = torch.rand_like(ref) + 0.5
    ref.backward(up)
    fn = lambda a: vocab_parallel_cross_entropy(a, t, 0, 5003, name, reduction=reduction, label_smoothing=eps)  # noqa: E731
    for f in (fn, torch.compile(fn, backend="inductor", fullgraph=True)):
        xs = x.clone().requires_grad_()
        loss = f(xs)
        loss.backward(up.to(dtype))
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=2**-7)
        torch.testing.assert_close(loss.float(), ref.detach(), **tol)
        torch.testing.assert_close(xs.grad.float(), ref_x.grad, **tol)
    lse = torch.logsumexp(x.float(), 1)
    torch.library.opcheck(ce_triton.ce_stats_triton, (x, t, 0, 5003, True))
    torch.library.opcheck(ce_triton.ce_grad_triton, (x, t, lse, torch.ones_like(lse), 0, 5003, 0.1, 5003))
