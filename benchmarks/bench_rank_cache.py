"""One compiled program for every TP rank: what it saves in compile time (issue 17, item 2).

The example GPT (vocab-parallel embedding and loss, dropout) under ``tp_compile`` at TP=4 on gloo,
every scenario with a new, empty Inductor cache directory shared by the ranks:

    cold        the 4 ranks start together on the empty cache (what every first run pays)
    warmed      one process compiles rank 0's program on the fake group first (``warm`` column),
                then the 4 ranks start on that cache

Per rank: compile seconds (first step minus a steady step) and FX-graph cache hits / misses. When
the rank is a constant of the graph, only rank 0 finds its program in a warmed cache; when it is read
at run time (``tpcompile.runtime.mappings.tp_rank``), every rank does.

    python benchmarks/bench_rank_cache.py                       # the tpcompile importable here
    python benchmarks/bench_rank_cache.py --before /tmp/old/pkg # also an older tpcompile (a package
                                                                # dir put first on PYTHONPATH), as the peer
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rank(rank: int, world: int, store: str, cache: str, fake: bool, layers: int, out: str) -> None:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import torch
    import torch.distributed as dist
    from torch._dynamo.utils import counters

    import gpt
    import tpcompile

    torch.set_num_threads(1)
    if fake:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    else:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model, (idx, tgt) = gpt.make_model(n_layer=layers, dropout=0.1)
    model = tpcompile.tp_compile(model)
    torch.manual_seed(1234)  # the same RNG stream on every rank (dropout in replicated regions; torch seeds randomly)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        model(idx, tgt).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    ind = counters["inductor"]
    with open(out, "w") as f:
        json.dump({"rank": rank, "compile": times[0] - statistics.median(times[1:]), "step": statistics.median(times[1:]),
                   "hit": ind["fxgraph_cache_hit"], "miss": ind["fxgraph_cache_miss"],
                   "tpcompile": os.path.dirname(tpcompile.__file__)}, f)
    dist.destroy_process_group()


def _spawn(ranks: list, world: int, cache: str, fake: bool, layers: int, env: dict, timeout: float) -> list:
    """Run ``ranks`` as processes of one group (fresh interpreters: ``env`` picks the tpcompile)."""
    tmp = tempfile.mkdtemp(prefix="rank_cache_")
    store = os.path.join(tmp, "store")
    procs = []
    for r in ranks:
        out = os.path.join(tmp, f"r{r}.json")
        code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import bench_rank_cache as b; "
                f"b._rank({r}, {world}, {store!r}, {cache!r}, {fake}, {layers}, {out!r})")
        procs.append((out, subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp,  # not the repo: its
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))  # tpcompile/
    res = []
    for out, p in procs:
        _, err = p.communicate(timeout=timeout)
        if p.returncode:
            raise RuntimeError(f"a rank failed:\n{err[-3000:]}")
        with open(out) as f:
            res.append(json.load(f))
    return res


def scenario(name: str, world: int, layers: int, env: dict, timeout: float) -> dict:
    cache = tempfile.mkdtemp(prefix="inductor_cache_")  # empty: nothing from an earlier run
    warm = 0.0
    if name == "warmed":
        t0 = time.perf_counter()
        _spawn([0], world, cache, True, layers, env, timeout)
        warm = time.perf_counter() - t0
    ranks = _spawn(list(range(world)), world, cache, False, layers, env, timeout)
    return {"warm": warm, "ranks": ranks}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--before", help="a package dir holding an older tpcompile (first on PYTHONPATH)")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args(argv)
    versions = {"this": dict(os.environ)}
    if args.before:
        versions["before"] = {**os.environ, "PYTHONPATH": args.before + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rows = {}
    for v, env in versions.items():
        for name in ("cold", "warmed"):
            rows[(v, name)] = scenario(name, args.tp, args.layers, env, args.timeout)
    print(f"\nexample GPT, {args.layers} layers, TP={args.tp} gloo, SGD; compile seconds = first step - steady step; "
          f"every scenario on a new empty Inductor cache; host {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print("| tpcompile | scenario | warm (s) | compile per rank (s) | total compile (s) | FX cache hits / misses per rank "
          "| steady step, median of ranks (ms) |")
    print("|---|---|---|---|---|---|---|")
    base = {}
    for (v, name), r in rows.items():
        comp = [x["compile"] for x in r["ranks"]]
        total = sum(comp) + r["warm"]
        base.setdefault(name, total)
        ratio = f" ({total / base[name]:.2f}x)" if v != "this" else ""
        hits = " ".join(f"{x['hit']}/{x['miss']}" for x in r["ranks"])
        step = statistics.median(x["step"] for x in r["ranks"]) * 1e3
        print(f"| {v} | {name} | {r['warm']:.1f} | {' '.join(f'{c:.1f}' for c in comp)} | {total:.1f}{ratio} | {hits} "
              f"| {step:.0f} |")
    print("\n(ratio: total compile seconds of the older tpcompile / this one's, same scenario)")
    for v in versions:
        print(f"{v}: tpcompile from {rows[(v, 'cold')]['ranks'][0]['tpcompile']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
