"""Vocab-parallel cross-entropy and embedding on gloo ranks against single device.

2 ranks: eager and aot_eager (recording the AOT graphs) over every case in one compiled
function; inductor over INDUCTOR_CASES only (between them: smoothing, N-d, 'none' and
'mean', ignore_index, padding, bf16), since each CPU kernel costs about a second of C++
compile. 3 ranks: eager (V=4 leaves rank 2 with padding columns only). Each rank gets
its slice of seeded full logits; the parent computes ``F.cross_entropy`` on the full
logits and compares the loss and the gradient slices.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from graphs import recording_aot_eager
from multirank import run_ranks

# name: (logits shape with "V" for the class dim, V, reduction, label_smoothing, ignore_index, dtype)
CASES = {
    "mean": ((6, "V"), 10, "mean", 0.0, -100, torch.float32),
    "sum_smooth": ((6, "V"), 10, "sum", 0.1, -100, torch.float32),
    "none_smooth": ((6, "V"), 10, "none", 0.1, -100, torch.float32),
    "mean_smooth_nd": ((2, "V", 3), 10, "mean", 0.1, 3, torch.float32),  # ignore_index is a real class
    "none_nd": ((2, "V", 3), 10, "none", 0.0, -100, torch.float32),
    "one_dim": (("V",), 10, "mean", 0.1, -100, torch.float32),
    "padded_mean_smooth": ((6, "V"), 9, "mean", 0.1, -100, torch.float32),
    "padded_none": ((6, "V"), 9, "none", 0.0, -100, torch.float32),
    "tiny_vocab": ((6, "V"), 4, "mean", 0.1, -100, torch.float32),  # 3 ranks: rank 2 all padding
    "bf16_mean_smooth": ((6, "V"), 10, "mean", 0.1, -100, torch.bfloat16),
}
INDUCTOR_CASES = ["mean_smooth_nd", "padded_none", "bf16_mean_smooth"]
FP32_TOL = dict(rtol=1e-6, atol=1e-6)
# bf16 logits: our loss is fp32 maths rounded once to bf16, so within one bf16 ulp (2^-8
# relative) of the fp32 loss of the same logits; F.cross_entropy on bf16 rounds at every
# step (log_softmax in bf16) and sits within 2e-2 of both.
BF16_TOL = dict(rtol=2**-8, atol=1e-3)
BF16_VS_TORCH_TOL = dict(rtol=2e-2, atol=2e-2)
EMB_V, EMB_H = 9, 4
EMB_PAD = EMB_V - 2  # held by a rank other than the first at every tp tested


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _case_data(k: int, name: str):
    """Full logits, target and upstream gradient of case ``name`` (same in every process)."""
    shape, V, reduction, _, ignore, dtype = CASES[name]
    shape = tuple(V if s == "V" else s for s in shape)
    cd = 0 if len(shape) == 1 else 1
    logits = (3 * torch.randn(shape, generator=_gen(k))).to(dtype)
    row_shape = shape[:cd] + shape[cd + 1 :]
    target = torch.randint(0, V, row_shape, generator=_gen(100 + k))
    if row_shape:  # ignore a few rows (every third)
        flat = target.view(-1)
        flat[1::3] = ignore
    loss_shape = row_shape if reduction == "none" else ()
    grad = torch.rand(loss_shape, generator=_gen(200 + k)) + 0.5
    return logits, target, grad, cd


def _local_slice(logits: torch.Tensor, cd: int, rank: int, tp: int):
    """This rank's class slice of ``logits`` padded to a multiple of tp with junk columns
    (large values, which must not leak into the loss). Returns (slice, vocab_start)."""
    V = logits.shape[cd]
    local = math.ceil(V / tp)
    junk_shape = logits.shape[:cd] + (local * tp - V,) + logits.shape[cd + 1 :]
    junk = torch.full(junk_shape, 50.0, dtype=logits.dtype)
    padded = torch.cat([logits, junk], cd)
    return padded.narrow(cd, rank * local, local).clone(), rank * local


def _emb_data(tp: int, rank: int | None):
    weight = torch.randn(EMB_V, EMB_H, generator=_gen(300))
    idx = torch.randint(0, EMB_V, (3, 5), generator=_gen(301))
    idx[0, :2] = EMB_PAD  # nn.Embedding's padding_idx: looked up, never given a gradient
    gy = torch.randn(3, 5, EMB_H, generator=_gen(302))
    if rank is None:
        return idx, weight, gy, 0
    rows = math.ceil(EMB_V / tp)
    padded = torch.cat([weight, torch.randn(rows * tp - EMB_V, EMB_H, generator=_gen(303))])
    return idx, padded[rank * rows : (rank + 1) * rows].clone(), gy, rank * rows


# ---------------------------------------------------------------- rank side






def _run(rank: int, tp: int, backend, cases, inplace: bool = False, rank_free: bool = False) -> dict:
    """``rank_free``: pass ``vocab_start=None`` (the rank read when the ops run, what rewritten graphs
    pass) instead of this rank's first id."""
    import torch.distributed as dist

    from tpcompile.runtime import vocab_parallel_cross_entropy, vocab_parallel_embedding

    name = dist.group.WORLD.group_name
    data, args = [], []
    for case in cases:
        k = list(CASES).index(case)
        logits, target, grad, cd = _case_data(k, case)
        local, start = _local_slice(logits, cd, rank, tp)
        data.append((local.requires_grad_(), target, grad))
        args.append((None if rank_free else start, CASES[case][1], CASES[case][2], CASES[case][3], CASES[case][4]))
    idx, w, gy, w_start = _emb_data(tp, rank)
    w_start = None if rank_free else w_start
    w.requires_grad_()

    inter = []  # inplace: a non-leaf per case, which the backward overwrites with its grad

    def fn(datas, idx, w):
        if inplace:
            inter[:] = [x * 1 for x, _, _ in datas]
        losses = [
            vocab_parallel_cross_entropy(
                y, t, start, V, name, ignore_index=ign, reduction=red, label_smoothing=eps,
                inplace_backward=inplace,
            )
            for y, (_, t, _), (start, V, red, eps, ign) in zip(inter or [x for x, _, _ in datas], datas, args)
        ]
        return losses, vocab_parallel_embedding(idx, w, w_start, name, padding_idx=EMB_PAD)

    if backend is not None:
        fn = torch.compile(fn, backend=backend, fullgraph=True)
    losses, emb = fn(data, idx, w)
    grads = [g.to(loss.dtype) for (_, _, g), loss in zip(data, losses)]
    torch.autograd.backward(losses + [emb], grads + [gy])

    def as_np(t):  # bf16 has no numpy dtype; the float upcast is exact
        return t.detach().float().numpy()

    ce = {c: (str(loss.dtype), as_np(loss), as_np(x.grad)) for c, loss, (x, _, _) in zip(cases, losses, data)}
    # which intermediates now hold their own gradient (2-D ones: written in place)
    written = {c: torch.equal(y, x.grad) for c, y, (x, _, _) in zip(cases, inter, data)}
    return {"ce": ce, "emb": (as_np(emb), as_np(w.grad)), "written": written}


def _worker(rank: int, tp: int, compiled: bool) -> dict:
    res = {"eager": _run(rank, tp, None, list(CASES)), "eager_inplace": _run(rank, tp, None, list(CASES), True),
           "eager_rank_free": _run(rank, tp, None, list(CASES), rank_free=True),
           "eager_inplace_rank_free": _run(rank, tp, None, list(CASES), True, rank_free=True)}
    if compiled:
        graphs: dict = {}
        res["aot_eager"] = _run(rank, tp, recording_aot_eager(graphs), list(CASES))
        res["aot_graphs"] = graphs
        torch._dynamo.reset()
        res["aot_eager_rank_free_graphs"] = {}
        res["aot_eager_rank_free"] = _run(rank, tp, recording_aot_eager(res["aot_eager_rank_free_graphs"]), list(CASES),
                                          rank_free=True)
        torch._dynamo.reset()
        res["inductor"] = _run(rank, tp, "inductor", INDUCTOR_CASES)
    return res


@pytest.fixture(scope="module")
def results():
    return {2: run_ranks(_worker, 2, True), 3: run_ranks(_worker, 3, False)}


RUNS = [(2, "eager"), (2, "eager_inplace"), (2, "aot_eager"), (2, "inductor"), (3, "eager"), (3, "eager_inplace"),
        (2, "eager_rank_free"), (2, "eager_inplace_rank_free"), (2, "aot_eager_rank_free"), (3, "eager_rank_free"),
        (3, "eager_inplace_rank_free")]


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize(
    "tp,mode,case",
    [(tp, mode, case) for tp, mode in RUNS for case in CASES if mode != "inductor" or case in INDUCTOR_CASES],
)
def test_cross_entropy_matches_single_device(results, tp, mode, case):
    k = list(CASES).index(case)
    _, V, reduction, eps, ignore, dtype = CASES[case]
    logits, target, grad, cd = _case_data(k, case)
    kw = dict(ignore_index=ignore, reduction=reduction, label_smoothing=eps)
    if dtype == torch.bfloat16:  # the exact answer for these bf16 values, and torch's bf16 one
        ref_bf16 = F.cross_entropy(logits, target, **kw)
        logits, grad = logits.float(), grad.to(dtype).float()  # the ranks got a bf16 upstream grad
    full = logits.clone().requires_grad_()
    want = F.cross_entropy(full, target, **kw)
    want.backward(grad)
    tol = BF16_TOL if dtype == torch.bfloat16 else FP32_TOL
    for r in range(tp):
        got_dtype, loss, g = results[tp][r][mode]["ce"][case]
        loss, g = torch.from_numpy(loss), torch.from_numpy(g)
        torch.testing.assert_close(loss, want.detach(), **tol)
        local = math.ceil(V / tp)
        valid = max(0, min(local, V - r * local))
        torch.testing.assert_close(g.narrow(cd, 0, valid), full.grad.narrow(cd, r * local, valid), **tol)
        assert (g.narrow(cd, valid, local - valid) == 0).all()  # padding columns get no gradient
        if dtype == torch.bfloat16:
            assert got_dtype == str(ref_bf16.dtype) == "torch.bfloat16"
            torch.testing.assert_close(loss, ref_bf16.float(), **BF16_VS_TORCH_TOL)
        else:
            assert got_dtype == "torch.float32"


def test_cross_entropy_one_collective_forward_none_backward(results):
    for r in range(2):
        graphs = results[2][r]["aot_graphs"]
        assert len(graphs["fw"]) == 1 and len(graphs["bw"]) == 1
        fw = [c for c in graphs["fw"][0] if c != "wait_tensor"]
        # one all-gather per cross-entropy call, plus the embedding's all-reduce
        assert sorted(fw) == ["all_gather_into_tensor"] * len(CASES) + ["all_reduce"]
        assert graphs["bw"][0] == []  # neither op communicates in the backward
        # the local halves reach the graphs as opaque custom ops (chunked torch impl on CPU)
        assert graphs["fw_tpcompile_ops"][0] == ["tpcompile.ce_stats.default"] * len(CASES)
        assert graphs["bw_tpcompile_ops"][0] == ["tpcompile.ce_grad.default"] * len(CASES)


def test_rank_read_at_run_time_gives_the_same_numbers(results):
    """``vocab_start=None`` (the rank read when the ops run) gives bitwise the numbers of the rank's
    first id passed in; in the compiled graphs padded vocabularies go through the ``*_at_rank`` ops."""
    for tp in (2, 3):
        for r in range(tp):
            for given, read in (("eager", "eager_rank_free"), ("eager_inplace", "eager_inplace_rank_free")) + \
                    ((("aot_eager", "aot_eager_rank_free"),) if tp == 2 else ()):
                a, b = results[tp][r][given], results[tp][r][read]
                for case in CASES:
                    assert a["ce"][case][0] == b["ce"][case][0], (tp, r, given, case)
                    for x, y in zip(a["ce"][case][1:], b["ce"][case][1:]):
                        assert (x == y).all(), (tp, r, given, case)
                for x, y in zip(a["emb"], b["emb"]):
                    assert (x == y).all(), (tp, r, given)
    padded = sum(math.ceil(CASES[c][1] / 2) * 2 != CASES[c][1] for c in CASES)
    ops = results[2][0]["aot_eager_rank_free_graphs"]
    assert 0 < padded < len(CASES)
    assert sorted(ops["fw_tpcompile_ops"][0]) == sorted(["tpcompile.ce_stats.default"] * (len(CASES) - padded) +
                                                        ["tpcompile.ce_stats_at_rank.default"] * padded +
                                                        ["tpcompile.tp_rank.default"] * (len(CASES) - padded + 1))


def test_inplace_backward_overwrites_logits(results):
    """inplace_backward: 1-D and 2-D logits now hold their gradient; N-d logits are
    reshaped into a copy first (the copy is overwritten), so theirs are untouched."""
    for tp in (2, 3):
        for r in range(tp):
            written = results[tp][r]["eager_inplace"]["written"]
            for case, shape in ((c, CASES[c][0]) for c in CASES):
                assert written[case] == (len(shape) <= 2), (tp, r, case)


@pytest.mark.parametrize("tp,mode", RUNS)
def test_embedding_matches_single_device(results, tp, mode):
    idx, weight, gy, _ = _emb_data(tp, None)
    w = weight.clone().requires_grad_()
    want = F.embedding(idx, w, padding_idx=EMB_PAD)
    want.backward(gy)
    assert (w.grad[EMB_PAD] == 0).all() and (idx == EMB_PAD).any()
    rows = math.ceil(EMB_V / tp)
    for r in range(tp):
        out, gw = (torch.from_numpy(a) for a in results[tp][r][mode]["emb"])
        torch.testing.assert_close(out, want.detach(), **FP32_TOL)
        real = max(0, min(rows, EMB_V - r * rows))
        torch.testing.assert_close(gw[:real], w.grad[r * rows : r * rows + real], **FP32_TOL)
        assert (gw[real:] == 0).all()
