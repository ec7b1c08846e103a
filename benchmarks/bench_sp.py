"""Sequence parallelism's step against plain TP's, interleaved in the same processes.

bench_tp.py times each configuration in its own processes, one after the other, so on a shared
machine a change of load between them reads as a difference. Here both models (bench_tp.py's
small configuration: torch's test Transformer, 4 layers, dim 256, vocab 8192, batch 8x128,
AdamW, gloo) are compiled in the same ranks and their steps alternate (A B A B ...), so the load
hits both alike; the table gives medians, minima and the ratio.

    python benchmarks/bench_sp.py [--tp 2] [--steps 12]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _rank(rank: int, world: int, port: int, steps: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import tpcompile
    from bench_tp import SIZES, WithLoss, build_transformer

    size = SIZES["small"]
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, size.vocab, (size.batch, size.seq), generator=g)
    y = torch.randint(0, size.vocab, (size.batch, size.seq), generator=g)
    runs = {}
    for sp in (False, True):
        model = tpcompile.tp_compile(WithLoss(build_transformer(size)), sequence_parallel=sp)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(model=model, opt=opt):
            opt.zero_grad()
            model(x, y).backward()
            opt.step()

        for _ in range(3):  # compile, then warm
            step()
        st = tpcompile.tp_state(model)
        kinds = [c.phase for r in st.records for c in r.collectives]
        runs["tpcompile-sp" if sp else "tpcompile"] = {"step": step, "times": [],
                                                       "collectives": (kinds.count("forward"), kinds.count("backward"))}
    for _ in range(steps):
        for r in runs.values():
            dist.barrier()
            t = time.perf_counter()
            r["step"]()
            r["times"].append(time.perf_counter() - t)
    if rank == 0:
        out.put({k: {"times": r["times"], "collectives": r["collectives"]} for k, r in runs.items()})
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    args = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_rank, args=(r, args.tp, port, args.steps, q)) for r in range(args.tp)]
    for pr in procs:
        pr.start()
    res = q.get()
    for pr in procs:
        pr.join()
    base = statistics.median(res["tpcompile"]["times"])
    print(f"small, TP={args.tp}, {args.steps} interleaved steps each\n")
    print("| configuration | collectives fwd / bwd | step ms median | min | median vs tpcompile |\n|---|---|---:|---:|---:|")
    for k, r in res.items():
        med = statistics.median(r["times"])
        print(f"| {k} | {r['collectives'][0]} / {r['collectives'][1]} | {med * 1e3:.1f} | {min(r['times']) * 1e3:.1f} "
              f"| {med / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
