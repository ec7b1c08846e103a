"""The per-call Python work of a tp-compiled module, as a share of its training step.

``TensorParallel.forward`` (tpcompile/api.py) does some Python work on every call around the
compiled program: it copies the user modules' training flags and hooks to the twin
(``Twin.sync``), enters the Dynamo config patch, the backend swaps each ghost argument for its
local shard (``TPParameters.program_locals``), and every N-th call it checks the replicated
parameters (one all-gather). This script times each on bench_tp.py's small configuration (torch's
test Transformer, 4 layers, dim 256, vocab 8192, batch 8x128, AdamW, TP=2 gloo, Inductor) and
prints them beside the measured step.

    python benchmarks/bench_call_overhead.py [--tp 2] [--steps 10] [--sp]
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


def _timed(obj, name: str, acc: list) -> None:
    """Wrap ``obj.name`` so that each call's seconds are appended to ``acc``."""
    fn = getattr(obj, name)

    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc.append(time.perf_counter() - t)

    setattr(obj, name, wrapper)


def _rank(rank: int, world: int, port: int, steps: int, sp: bool, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import tpcompile
    from bench_tp import SIZES, WithLoss, build_transformer

    size = SIZES["small"]
    model = WithLoss(build_transformer(size))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, size.vocab, (size.batch, size.seq), generator=g)
    y = torch.randint(0, size.vocab, (size.batch, size.seq), generator=g)
    model = tpcompile.tp_compile(model, sequence_parallel=sp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # bench_tp.py's optimizer
    state = tpcompile.tp_state(model)

    def step():
        opt.zero_grad()
        model(x, y).backward()
        opt.step()

    for _ in range(3):  # compile, then warm
        step()
    acc = {k: [] for k in ("forward (all of it)", "compiled call", "twin.sync", "argument swap")}
    _timed(state, "forward", acc["forward (all of it)"])
    _timed(state, "compiled", acc["compiled call"])
    _timed(state.twin, "sync", acc["twin.sync"])
    _timed(state.params, "program_locals", acc["argument swap"])
    model.forward = state.forward
    step_s = []
    for _ in range(steps):
        dist.barrier()
        t = time.perf_counter()
        step()
        step_s.append(time.perf_counter() - t)
    patch = []
    for _ in range(200):
        t = time.perf_counter()
        with torch._dynamo.config.patch(**state._trace_config):
            pass
        patch.append(time.perf_counter() - t)
    checks = []
    for _ in range(5):
        t = time.perf_counter()
        state.params.check_replicas(state.group, state.device)
        checks.append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in acc.items()}
    row = {
        "step": statistics.median(step_s),
        "twin.sync": med["twin.sync"],
        "config patch": statistics.median(patch),
        "argument swap": med["argument swap"],
        "replica check / every (100)": statistics.median(checks) / state.check_replicas_every,
        "forward outside the compiled call": med["forward (all of it)"] - med["compiled call"],
    }
    row["total (outside + swap + check)"] = (row["forward outside the compiled call"] + row["argument swap"]
                                             + row["replica check / every (100)"])
    if rank == 0:
        out.put(row)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--sp", action="store_true", help="sequence_parallel=True")
    args = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    ctx_procs = [ctx.Process(target=_rank, args=(r, args.tp, port, args.steps, args.sp, q)) for r in range(args.tp)]
    for pr in ctx_procs:
        pr.start()
    row = q.get()
    for pr in ctx_procs:
        pr.join()
    step = row.pop("step")
    print(f"small, TP={args.tp}{' +SP' if args.sp else ''}: step {step * 1e3:.1f} ms (median of {args.steps})\n")
    print("| per-call work | µs | share of step |\n|---|---:|---:|")
    for k, v in row.items():
        print(f"| {k} | {v * 1e6:.0f} | {v / step:.3%} |")
    print("\n'forward outside the compiled call': TensorParallel.forward minus the torch.compile'd module's call "
          "(twin.sync, config patch, checks); the argument swap runs inside that call (the backend's wrapper).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
