"""Cross-entropy forward+backward: F.cross_entropy on gathered logits vs DTensor loss_parallel
(TP=2) vs tpcompile's vocab_parallel_cross_entropy (TP=2). A script, not a test.

    python benchmarks/bench_cross_entropy.py                  # CPU, default sizes, ~3 min
    python benchmarks/bench_cross_entropy.py --sizes 1024x8192 --reps 3
    python benchmarks/bench_cross_entropy.py --device cuda    # needs 2 GPUs for the TP=2 rows
    python benchmarks/bench_cross_entropy.py --methods lin,fused --marker bench-fused --sizes 4096x32768

Each method runs in its own process(es) (TP=2 methods: 2 processes on gloo, or NCCL on CUDA)
over all sizes. Time: median (min-max) of ``--reps`` timed fwd+bwd steps after ``--warmup``
untimed ones, slowest rank. Memory: peak above what the process held once its inputs (its
logits, fp32) existed: on CPU the kernel's resident high-water mark (``VmHWM``, reset per size
through ``/proc/self/clear_refs``) minus RSS before the first step (tracemalloc does not see
tensor storage; large tensors are mmap'd, so RSS follows them), on CUDA
``max_memory_allocated`` minus ``memory_allocated``.
Threads: TP ranks get ``cores / 2`` each, the single-device baseline all cores.

Writes a markdown table (ratios to ours) between ``<!-- bench:start -->`` and
``<!-- bench:end -->`` in ``--doc`` (default docs/cross_entropy.md) and a PNG plot
(matplotlib, ``pip install tpcompile[bench]``) to ``--plot``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name: (label, ranks, the method its ratios are taken against)
METHODS = {
    "torch": ("F.cross_entropy, gathered logits", 1, "ours"),
    "dtensor": ("DTensor loss_parallel, TP=2", 2, "ours"),
    "ours": ("tpcompile vocab_parallel_cross_entropy, TP=2", 2, "ours"),
    # LM head + loss (--methods lin,fused; hidden size --hidden): the inputs are hidden and weight
    "lin": ("LM head matmul + vocab_parallel_cross_entropy, TP=2", 2, "lin"),
    "fused": ("fused_linear_cross_entropy (chunk 4096), TP=2", 2, "lin"),
}
DEFAULT_METHODS = "torch,dtensor,ours"
DEFAULT_SIZES = "1024x8192,1024x32768,1024x65536,4096x8192,4096x32768,4096x65536"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def _measure(step, reps: int, warmup: int, cuda: bool) -> dict:
    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current RSS
        base = _rss()
    times = []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() - base if cuda else _hwm() - base
    return {"times": times, "peak": peak}


def _rank(rank: int, world: int, method: str, sizes: list, reps: int, warmup: int, device: str, store: str,
          threads: int, out_dir: str, hidden: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dev = torch.device(device, rank) if cuda else torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.FileStore(store, world), rank=rank,
                                world_size=world)
    results = []
    for n, v in sizes:
        g = torch.Generator(device=dev).manual_seed(rank)
        local_v = v // world
        if method in ("lin", "fused"):
            h = torch.randn(n, hidden, generator=g, device=dev).requires_grad_()
            x = (torch.randn(local_v, hidden, generator=g, device=dev) / hidden**0.5).requires_grad_()  # weight
        else:
            x = torch.randn(n, local_v, generator=g, device=dev).requires_grad_()
        target = torch.randint(0, v, (n,), generator=torch.Generator(device=dev).manual_seed(99), device=dev)
        target[::7] = -100

        if method == "torch":
            def step():
                F.cross_entropy(x, target).backward()
                x.grad = None
        elif method == "dtensor":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.tensor import DTensor, Replicate, Shard
            from torch.distributed.tensor.parallel import loss_parallel

            mesh = init_device_mesh(device, (world,))
            t_d = DTensor.from_local(target, mesh, [Replicate()], run_check=False)

            def step():
                with loss_parallel():
                    xd = DTensor.from_local(x, mesh, [Shard(1)], run_check=False)
                    F.cross_entropy(xd, t_d).backward()
                x.grad = None
        elif method == "ours":
            from tpcompile.runtime import vocab_parallel_cross_entropy

            name = dist.group.WORLD.group_name

            def step():
                vocab_parallel_cross_entropy(x, target, rank * local_v, v, name).backward()
                x.grad = None
        elif method == "lin":
            from tpcompile.runtime import vocab_parallel_cross_entropy

            name = dist.group.WORLD.group_name

            def step():
                vocab_parallel_cross_entropy(h @ x.t(), target, rank * local_v, v, name).backward()
                x.grad = h.grad = None
        else:
            from tpcompile.runtime.fused_linear_ce import fused_linear_cross_entropy

            name = dist.group.WORLD.group_name

            def step():
                fused_linear_cross_entropy(h, x, target, rank * local_v, v, name).backward()
                x.grad = h.grad = None

        res = _measure(step, reps, warmup, cuda)
        res["input_bytes"] = x.numel() * x.element_size() + (h.numel() * h.element_size() if method in ("lin", "fused") else 0)
        results.append(res)
        del x, target, step
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    if world > 1:
        dist.destroy_process_group()


def _child(args) -> None:
    """One method over all sizes; prints JSON, per size: slowest rank's times, largest peak."""
    import torch.multiprocessing as mp

    world = METHODS[args.method][1]
    cores = os.cpu_count() or 1
    threads = max(1, cores // world) if args.device == "cpu" else 1
    with tempfile.TemporaryDirectory() as tmp:
        sizes = _sizes(args.sizes)
        a = (world, args.method, sizes, args.reps, args.warmup, args.device, os.path.join(tmp, "store"), threads, tmp,
             args.hidden)
        if world == 1:
            _rank(0, *a)
        else:
            mp.spawn(_rank, args=a, nprocs=world)
        ranks = []
        for r in range(world):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
    out = []
    for i in range(len(sizes)):
        per = [r[i] for r in ranks]
        slow = max(per, key=lambda d: statistics.median(d["times"]))
        out.append({"times": slow["times"], "peak": max(d["peak"] for d in per), "input_bytes": per[0]["input_bytes"]})
    print(json.dumps(out))


def _sizes(text: str) -> list:
    return [tuple(int(a) for a in s.split("x")) for s in text.split(",")]


def _table(results: dict, sizes, methods) -> str:
    ms = lambda t: f"{1e3 * statistics.median(t):.1f} ({1e3 * min(t):.1f}-{1e3 * max(t):.1f})"  # noqa: E731
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    lines = [
        "| N x V | method | fwd+bwd ms, median (min-max) | time / ref | inputs per process, MiB "
        "| peak above inputs per process, MiB | peak / ref |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, v in sizes:
        for m in methods:
            label, _, ref = METHODS[m]
            ours = results.get((ref, n, v))
            r = results.get((m, n, v))
            if r is None:
                continue
            t_ratio = statistics.median(r["times"]) / statistics.median(ours["times"]) if ours else float("nan")
            p_ratio = r["peak"] / ours["peak"] if ours and ours["peak"] > 0 else float("nan")
            lines.append(f"| {n} x {v} | {label}{' (ref)' if m == ref else ''} | {ms(r['times'])} | {t_ratio:.2f} | {mib(r['input_bytes'])} "
                         f"| {mib(r['peak'])} | {p_ratio:.2f} |")
    return "\n".join(lines)


def _plot(results: dict, sizes, methods, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{n}x{v // 1024}k" for n, v in sizes]
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        label = METHODS[m][0]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(sizes))]
        t = [1e3 * statistics.median(results[(m, n, v)]["times"]) if (m, n, v) in results else 0 for n, v in sizes]
        p = [results[(m, n, v)]["peak"] / 2**20 if (m, n, v) in results else 0 for n, v in sizes]
        ax_t.bar(xs, t, width, label=label)
        ax_m.bar(xs, p, width, label=label)
    for ax, title in ((ax_t, "fwd+bwd time, ms (median)"), (ax_m, "peak memory above inputs per process, MiB")):
        ax.set_xticks(range(len(sizes)), labels, rotation=30)
        ax.set_title(title)
        ax.set_xlabel("N x V")
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated NxV (V divisible by 2)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the lin/fused methods")
    p.add_argument("--doc", default=os.path.join(ROOT, "docs", "cross_entropy.md"))
    p.add_argument("--plot", default=os.path.join(ROOT, "docs", "cross_entropy.png"))
    p.add_argument("--marker", default="bench", help="write between <!-- MARKER:start/end --> in --doc")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return _child(args)

    sizes = _sizes(args.sizes)
    results = {}
    start = time.time()
    methods = args.methods.split(",")
    for m in methods:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--method", m, "--sizes", args.sizes,
               "--reps", str(args.reps), "--warmup", str(args.warmup), "--device", args.device,
               "--hidden", str(args.hidden)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        if proc.returncode != 0:
            print(f"{m} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        for (n, v), r in zip(sizes, json.loads(proc.stdout.strip().splitlines()[-1])):
            results[(m, n, v)] = r
            print(f"{m:8s} {n}x{v}: {1e3 * statistics.median(r['times']):8.1f} ms, peak +{r['peak'] / 2**20:.0f} MiB",
                  file=sys.stderr)

    import torch

    if args.device == "cuda":
        machine = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    else:
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cmd = "python benchmarks/bench_cross_entropy.py " + " ".join(sys.argv[1:])
    table = _table(results, sizes, methods)
    block = (
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {machine} "
        f"(load average {load:.1f} at the end), torch {torch.__version__}, fp32, {args.reps} timed steps after "
        f"{args.warmup} warm-up, {time.time() - start:.0f} s in all.\nCommand: `{cmd.strip()}`\n\n{table}\n"
    )
    print(table)
    if args.plot:
        try:
            _plot(results, sizes, methods, args.plot)
            block += f"\n![cross-entropy benchmark]({os.path.relpath(args.plot, os.path.dirname(args.doc))})\n"
        except ImportError:
            print("matplotlib is not installed (pip install tpcompile[bench]): no plot", file=sys.stderr)
    if args.doc:
        start, end = f"<!-- {args.marker}:start -->", f"<!-- {args.marker}:end -->"
        text = open(args.doc).read() if os.path.exists(args.doc) else ""
        if start not in text:
            text += f"\n{start}\n{end}\n"
        a, b = text.index(start), text.index(end)
        with open(args.doc, "w") as f:
            f.write(text[: a + len(start)] + "\n" + block + text[b:])


if __name__ == "__main__":
    main()
