"""The fused reduction + residual add + RMSNorm op against the unfused ops it replaces (issue 15 item 5).

For each size ``[tokens, hidden]`` (batch 1) and each form (all-reduce; SP: reduce-scatter + all-gather),
on ``--tp`` ranks (gloo on CPU; NCCL with symmetric memory on CUDA when ``--cuda`` and enough GPUs):

    unfused   what the rewritten graph runs without the pass: the mapping op (``reduce_from_tp`` /
              ``reduce_scatter_to_sp``), the add, the example Llama's RMSNorm spelled out, and with SP
              ``gather_from_sp``
    fused     ``tpcompile::reduce_add_rms_norm`` (the op the pass puts there)

Times are medians (and min-max) of ``--iters`` calls after warm-up, the two interleaved call by call;
the ratio is unfused / fused (above 1: the fused op is faster). The outputs are checked bitwise equal
first. Eager, not compiled: under Inductor the unfused add + norm become one generated kernel and the
op is a fallback call, so this measures the op, not a whole model.

    python benchmarks/bench_fused_norm.py                  # CPU, 2 gloo ranks
    python benchmarks/bench_fused_norm.py --cuda --tp 2    # on a machine with 2+ GPUs
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = [(1, 1024), (16, 1024), (128, 1024), (512, 2048), (2048, 4096)]  # (tokens, hidden): decode .. prefill


def _unfused(M, p, r, w, group, sp):
    x = M.reduce_scatter_to_sp(p, group, 1) if sp else M.reduce_from_tp(p, group)
    h = r + x
    xf = h.float()
    n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).type_as(h) * w
    return (M.gather_from_sp(n, group, 1) if sp else n), h


def _entry(rank: int, world: int, store: str, cuda: bool, iters: int, queue) -> None:
    import torch.distributed as dist

    sys.path.insert(0, ROOT)
    from tpcompile.runtime import mappings as M
    from tpcompile.runtime.fused_norm import NormForm, reduce_add_rms_norm

    torch.set_num_threads(1)
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.FileStore(store, world), rank=rank,
                            world_size=world)
    group = dist.group.WORLD.group_name
    if cuda:
        import torch.distributed._symmetric_memory as symm_mem

        symm_mem.enable_symm_mem_for_group(group)
    dtype = torch.bfloat16 if cuda else torch.float32
    form = NormForm(1e-5, upcast=True, tail="cw")
    rows = []
    for tokens, hidden in SIZES:
        for sp in (False, True):
            if sp and tokens % world:
                continue
            g = torch.Generator().manual_seed(rank)
            p = torch.randn(1, tokens, hidden, generator=g).to(dev, dtype)
            r = torch.randn(1, tokens // world if sp else tokens, hidden, generator=torch.Generator().manual_seed(1))
            r, w = r.to(dev, dtype), torch.randn(hidden, generator=torch.Generator().manual_seed(2)).to(dev, dtype)
            calls = {"unfused": lambda: _unfused(M, p, r, w, group, sp),
                     "fused": lambda: reduce_add_rms_norm(p, r, w, group, 1 if sp else None, form)}
            with torch.no_grad():
                a, b = calls["unfused"](), calls["fused"]()
                same = all(torch.equal(x, y) for x, y in zip(a, b))
                times = {k: [] for k in calls}
                for i in range(iters + 3):
                    for k, f in calls.items():
                        if cuda:
                            torch.cuda.synchronize()
                        dist.barrier()
                        t = time.perf_counter()
                        f()
                        if cuda:
                            torch.cuda.synchronize()
                        if i >= 3:
                            times[k].append(time.perf_counter() - t)
            rows.append((tokens, hidden, sp, same, times))
    dist.destroy_process_group()
    queue.put((rank, rows))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--cuda", action="store_true")
    a = ap.parse_args()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_entry, args=(r, a.tp, os.path.join(tmp, "s"), a.cuda, a.iters, q))
                 for r in range(a.tp)]
        for p in procs:
            p.start()
        got = dict(q.get(timeout=1800) for _ in procs)
        for p in procs:
            p.join()
    rows = got[0]
    dev = "CUDA (NCCL + symmetric memory), bf16" if a.cuda else "CPU gloo, fp32"
    print(f"reduce + residual add + RMSNorm, tp={a.tp}, {dev}; median (min-max) of {a.iters} calls, rank 0")
    print(f"{'tokens x hidden':>16} {'form':<7} {'unfused ms':>22} {'fused ms':>22} {'ratio':>6} {'bitwise':>8}")
    for tokens, hidden, sp, same, times in rows:
        cell = {k: f"{statistics.median(v) * 1e3:.3f} ({min(v) * 1e3:.3f}-{max(v) * 1e3:.3f})" for k, v in times.items()}
        ratio = statistics.median(times["unfused"]) / statistics.median(times["fused"])
        print(f"{f'{tokens} x {hidden}':>16} {'SP' if sp else 'AR':<7} {cell['unfused']:>22} {cell['fused']:>22} "
              f"{ratio:>5.2f}x {'yes' if same else 'NO':>8}")


if __name__ == "__main__":
    main()
