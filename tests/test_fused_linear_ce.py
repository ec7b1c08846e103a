"""Fused LM head + vocab-parallel CE on gloo ranks against single-device linear + F.cross_entropy.

V = 21 rows split over 2 ranks (11 + 10 real, one padding row) and 3 ranks (7 each), chunks
of 4 vocab rows (so chunk boundaries, a short last chunk and padding all occur). The ranks'
partial hidden gradients sum to the single-device one (what the f before the LM head does).
Eager for every case; aot_eager (AOTAutograd traces the Function) for one case at tp=2.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from multirank import run_ranks

N, H, V, CHUNK = 12, 8, 21, 4
# name: (reduction, label_smoothing, ignore_index, hidden shape)
CASES = {
    "mean": ("mean", 0.0, -100, (N, H)),
    "mean_smooth_ignored": ("mean", 0.1, -100, (N, H)),
    "sum_3d": ("sum", 0.1, -100, (3, 4, H)),
    "none": ("none", 0.0, 5, (N, H)),  # ignore_index is a real class
}


def _data(k: int, case: str):
    red, _, ign, shape = CASES[case]
    g = torch.Generator().manual_seed(k)
    hidden = torch.randn(shape, generator=g)
    weight = torch.randn(V, H, generator=g) / math.sqrt(H)
    target = torch.randint(0, V, shape[:-1], generator=g)
    target.view(-1)[2::3] = ign
    up = torch.rand(shape[:-1] if red == "none" else (), generator=g) + 0.5
    return hidden, weight, target, up


def _worker(rank: int, tp: int) -> dict:
    import torch.distributed as dist

    from tpcompile.runtime.fused_linear_ce import fused_linear_cross_entropy

    name = dist.group.WORLD.group_name
    rows = math.ceil(V / tp)
    out = {}
    for mode in ("eager", "aot_eager"):
        for k, case in enumerate(CASES):
            if mode == "aot_eager" and (case != "mean_smooth_ignored" or tp != 2):
                continue
            red, eps, ign, _ = CASES[case]
            hidden, weight, target, up = _data(k, case)
            padded = torch.cat([weight, torch.randn(rows * tp - V, H)])
            w = padded[rank * rows : (rank + 1) * rows].clone().requires_grad_()
            h = hidden.clone().requires_grad_()

            def fn(h, w, target):
                return fused_linear_cross_entropy(
                    h, w, target, rank * rows, V, name, ignore_index=ign, reduction=red, label_smoothing=eps,
                    chunk=CHUNK,
                )

            if mode == "aot_eager":
                fn = torch.compile(fn, backend="aot_eager", fullgraph=True)
            loss = fn(h, w, target)
            loss.backward(up)
            out[mode, case] = tuple(t.detach().numpy() for t in (loss, h.grad, w.grad))  # no shared memory
    return out


@pytest.fixture(scope="module")
def results():
    return {tp: run_ranks(_worker, tp) for tp in (2, 3)}


@pytest.mark.parametrize(
    "tp,mode,case", [(tp, "eager", c) for tp in (2, 3) for c in CASES] + [(2, "aot_eager", "mean_smooth_ignored")]
)
def test_fused_linear_ce_matches_single_device(results, tp, mode, case):
    k = list(CASES).index(case)
    red, eps, ign, _ = CASES[case]
    hidden, weight, target, up = _data(k, case)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = h @ w.t()
    want = F.cross_entropy(logits.movedim(-1, 1), target, ignore_index=ign, reduction=red, label_smoothing=eps)
    want.backward(up)
    rows = math.ceil(V / tp)
    tol = dict(rtol=1e-5, atol=1e-6)
    got = [[torch.from_numpy(a) for a in results[tp][r][mode, case]] for r in range(tp)]
    dh = sum(g[1] for g in got)  # what the f's all-reduce forms
    torch.testing.assert_close(dh, h.grad, **tol)
    for r in range(tp):
        loss, _, gw = got[r]
        torch.testing.assert_close(loss, want.detach(), **tol)
        real = max(0, min(rows, V - r * rows))
        torch.testing.assert_close(gw[:real], w.grad[r * rows : r * rows + real], **tol)
        assert (gw[real:] == 0).all()


def test_fused_linear_ce_rejects_bad_chunk():
    from tpcompile.runtime.fused_linear_ce import fused_linear_cross_entropy

    with pytest.raises(ValueError, match="chunk must be a positive number of vocab rows, got 0"):
        fused_linear_cross_entropy(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, dtype=torch.long), 0, 4,
                                   "unused", chunk=0)
