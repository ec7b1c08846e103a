"""Where tpcompile's first step (compile) goes: Dynamo, tpcompile's passes, AOTAutograd, Inductor, C++ compile.

One process, the fake process group standing in for rank 0 of the TP group (the same graphs and
Inductor code as a real rank, no gloo), torch's test Transformer of ``bench_tp.py`` at ``--layers``,
an empty Inductor cache. Prints one table of the first forward + backward.

    python benchmarks/profile_compile.py --layers 16            # regional compilation (the default)
    python benchmarks/profile_compile.py --layers 16 --whole    # regional=False: one graph of every layer
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--size", default="small", help="a size of bench_tp.SIZES (tiny: a smoke run)")
    p.add_argument("--whole", action="store_true", help="tp_compile(model, regional=False)")
    args = p.parse_args(argv)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="tpcompile-profile-")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import bench_tp as B
    import tpcompile

    torch.set_num_threads(1)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=args.tp)
    size = B.replace(B.SIZES[args.size], n_layers=args.layers)
    model = tpcompile.tp_compile(B.WithLoss(B.build_transformer(size)), regional=False if args.whole else None,
                                 check_replicas_every=0)
    tok, tgt = (torch.randint(0, size.vocab, (size.batch, size.seq)) for _ in range(2))
    t0 = time.perf_counter()
    model(tok, tgt).backward()
    total = time.perf_counter() - t0
    times = torch._dynamo.utils.compilation_time_metrics  # name -> seconds of each call

    def s(key: str) -> float:
        return sum(times.get(key, [0.0]))

    rows = [
        ("first step, forward + backward", total),
        ("Dynamo bytecode tracing", s("bytecode_tracing")),
        ("  of it: region reuse look-up + stamp-out", s("invoke_subgraph_reuse_lookup") + s("invoke_subgraph_reuse_stamp_out")),
        ("tpcompile's passes (tp_program)", sum(r.rewrite_seconds for r in tpcompile.tp_state(model).records)),
        ("AOTAutograd metadata + joint trace + partition", s("aot_collect_metadata") + s("aot_trace_joint_graph")
         + s("min_cut_rematerialization_partition")),
        ("Inductor lowering + scheduling + codegen", s("GraphLowering.run") + s("GraphLowering.codegen")),
        ("C++ compile, CPU s summed over workers", s("compile_file")),
        ("  waited on", s("async_compile.wait")),
    ]
    print(f"| phase ({args.layers} layers, TP={args.tp}, {'whole graph' if args.whole else 'regional'}) | s | share |")
    print("|---|---|---|")
    for name, sec in rows:
        print(f"| {name} | {sec:.2f} | {sec / total:.1%} |")
    print(f"\nC++ files compiled: {len(times.get('compile_file', []))}; load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
