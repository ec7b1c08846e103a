"""Cost of the replica divergence check (``tp_compile(check_replicas_every=N)``, issue 13).

On the first 3 calls and then every N-th, tpcompile checks that the parameters replicated over
the TP group are bitwise equal on every rank: one integer checksum per replicated parameter and
one all-gather of those. This measures, on 2 gloo ranks, the example GPT (4 layers, dim 256,
vocabulary 8192, batch 8 x 128, Inductor, AdamW), one compiled model (the check does not change
the compiled program, so the configurations share it; the Inductor cache starts empty):

    off       check_replicas_every=0
    every100  the default: a check on 1 call in 100 (after the first 3)
    every1    a check on every call (the worst case)

and the check alone. Times are medians of steady steps (forward, backward, AdamW step), the
configurations interleaved step by step.

    python benchmarks/bench_replica_check.py       # prints the table, writes docs/img/replica_check.png
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD, STEPS = 2, 40
CONFIGS = {"off": 0, "every100": 100, "every1": 1}


def _entry(rank: int, store: str, queue) -> None:
    import torch.distributed as dist

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import gpt
    import tpcompile

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, WORLD), rank=rank, world_size=WORLD)
    model, (x, y) = gpt.make_model(n_layer=4, n_embd=256, n_head=8, vocab_size=8192, block_size=128, batch_size=8)
    model = tpcompile.tp_compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    st = tpcompile.tp_state(model)

    def step():
        model(x, y).backward()
        opt.step()
        opt.zero_grad()

    for _ in range(5):  # compile and warm up (the first 3 calls check whatever the setting)
        step()
    times = {name: [] for name in CONFIGS}
    for i in range(STEPS * len(CONFIGS)):  # the configurations interleaved: load on the machine hits all alike
        name = list(CONFIGS)[i % len(CONFIGS)]
        st.check_replicas_every = CONFIGS[name]
        dist.barrier()
        t = time.perf_counter()
        step()
        times[name].append(time.perf_counter() - t)
    out = {name: statistics.median(ts) for name, ts in times.items()}
    checks = []
    for _ in range(STEPS):
        dist.barrier()
        t = time.perf_counter()
        st.params.check_replicas(st.group, st.device)
        checks.append(time.perf_counter() - t)
    out["check"] = statistics.median(checks)
    reps = [p for _, p in st.params.named() if p.placements[0].is_replicate()]
    out["replicated"] = (len(reps), sum(p.to_local().numel() * p.element_size() for p in reps))
    out["params"] = sum(p.to_local().numel() * p.element_size() for _, p in st.params.named())
    dist.destroy_process_group()
    queue.put((rank, out))


def main() -> None:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_entry, args=(r, os.path.join(tmp, "store"), queue)) for r in range(WORLD)]
        for p in procs:
            p.start()
        res = dict(queue.get(timeout=1200) for _ in procs)
        for p in procs:
            p.join()
    r = res[0]
    n, nbytes = r["replicated"]
    print(f"GPT 4x256, vocab 8192, batch 8x128, TP={WORLD} gloo; {n} replicated parameters "
          f"({nbytes / 2**10:.1f} KiB of {r['params'] / 2**20:.1f} MiB per rank)")
    print(f"{'config':<10} {'step ms':>9} {'vs off':>8}")
    for name in CONFIGS:
        print(f"{name:<10} {r[name] * 1e3:9.2f} {r[name] / r['off']:8.3f}x")
    print(f"one check: {r['check'] * 1e3:.3f} ms = {r['check'] / r['off']:.2%} of a step")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(list(CONFIGS), [r[c] * 1e3 for c in CONFIGS])
    ax.set_ylabel("step time (ms)")
    ax.set_title(f"replica check cost, TP={WORLD} gloo (one check {r['check'] * 1e3:.2f} ms)")
    fig.tight_layout()
    path = os.path.join(ROOT, "docs", "img", "replica_check.png")
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
