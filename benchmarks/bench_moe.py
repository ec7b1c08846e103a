"""MoE experts tensor-parallel (issue 16): memory, step time and collectives beside single device.

A Mixtral-like Hugging Face model built from a config (random weights): 2 layers, hidden 256,
8 experts of intermediate 512, top-2, vocabulary 4096, batch 4 x 128, fp32, HF's
``"grouped_mm"`` experts (the ``transformers::grouped_mm_fallback`` op in fp32), ``aot_eager``
(the same backend for every row, so the ratio shows tpcompile's sharding and communication, not
Inductor's kernels), SGD. For TP = 2 and 4 on CPU gloo ranks it prints parameter bytes per rank
(experts and the rest), the median steady step time against single device measured in the same
run (rank 0 also trains the untouched model, the two interleaved step by step) and the collectives
per step from ``tp_state(model).records``.

Each degree runs twice: experts tensor-parallel (the default: every expert split over the ranks) and
expert-parallel (``expert_parallel=True``: E / tp whole experts per rank, each rank running the tokens
routed to its own experts). Both move the same collectives; the rows show what differs (memory is the
same 1/tp, the expert matmuls are whole-expert GEMMs on 1/tp of the rows instead of 1/tp-wide GEMMs on
all rows). With ``sequence_parallel=True`` (modes ``tp-sp``, ``ep-sp``): expert-TP's MoE layer is gathered
(all-gather of the tokens, all-reduce of the combine), expert parallelism dispatches each rank's tokens with
all-to-alls (a fixed buffer of tp x the exact rows, no host sync); the bytes column sums what moves.

    python benchmarks/bench_moe.py [--tp 2 4] [--modes tp ep tp-sp ep-sp]
"""
from __future__ import annotations

import copy
import os
import statistics
import sys
import tempfile
import time
from collections import Counter

import torch
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
CONFIG = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
              tie_word_embeddings=False, attn_implementation="sdpa", use_cache=False)


MODES = {"tp": ("expert-TP", {}), "ep": ("expert-parallel", {"expert_parallel": True}),
         "tp-sp": ("expert-TP + SP", {"sequence_parallel": True}),
         "ep-sp": ("expert-parallel + SP (all-to-all)", {"expert_parallel": True, "sequence_parallel": True})}


def _entry(rank: int, world: int, store: str, queue, mode: str) -> None:
    import torch.distributed as dist

    from tpcompile.compat import torchvision_without_kernels

    torchvision_without_kernels()
    import transformers as tf

    import tpcompile

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    torch.manual_seed(0)
    cfg = tf.MixtralConfig(**CONFIG)
    cfg._experts_implementation = "grouped_mm"
    model = tf.MixtralForCausalLM(cfg)
    ref = copy.deepcopy(model) if rank == 0 else None
    full = {n: p.numel() * p.element_size() for n, p in model.named_parameters()}
    model = tpcompile.tp_compile(model, backend="aot_eager", **MODES[mode][1])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=1e-3) if ref is not None else None
    ids = torch.randint(0, CONFIG["vocab_size"], (4, 128), generator=torch.Generator().manual_seed(1))

    def step(m, o):
        m(input_ids=ids, labels=ids).loss.backward()
        o.step()
        o.zero_grad()

    times: dict = {"tp": [], "single": []}
    for i in range(STEPS + 2):
        dist.barrier()
        t = time.perf_counter()
        step(model, opt)
        dist.barrier()
        if i >= 2:
            times["tp"].append(time.perf_counter() - t)
        if ref is not None:
            t = time.perf_counter()
            step(ref, ref_opt)
            if i >= 2:
                times["single"].append(time.perf_counter() - t)
    st = tpcompile.tp_state(model)
    local = {f: p.to_local().numel() * p.element_size() for f, p in st.params.named()}
    experts = [f for f in full if ".experts." in f]
    coll = Counter((c.phase, c.kind) for r in st.records for c in r.collectives)
    queue.put((rank, {
        "experts_local": sum(local[f] for f in experts), "experts_full": sum(full[f] for f in experts),
        "local": sum(local.values()), "full": sum(full.values()),
        "tp_ms": 1e3 * statistics.median(times["tp"]),
        "single_ms": 1e3 * statistics.median(times["single"]) if times["single"] else None,
        "collectives": dict(coll),
        "bytes": sum(c.nbytes for r in st.records for c in r.collectives),
    }))
    dist.destroy_process_group()


def run(world: int, mode: str) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_entry, args=(r, world, os.path.join(d, "store"), queue, mode)) for r in range(world)]
        for p in procs:
            p.start()
        out = dict(queue.get(timeout=1800) for _ in procs)
        for p in procs:
            p.join()
    return out[0]


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--modes", nargs="+", default=["tp", "ep"], choices=list(MODES))
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    rows = []
    for world in args.tp:
        for mode in args.modes:
            r = run(world, mode)
            c = r["collectives"]
            per_step = ", ".join(f"{ {'forward': 'fwd', 'backward': 'bwd'}[ph]} {n} {k}" for (ph, k), n in sorted(c.items()))
            rows.append((world, MODES[mode][0], r, per_step))
    mib = 1 / 2 ** 20
    print(f"Mixtral-like: {CONFIG['num_hidden_layers']} layers, hidden {CONFIG['hidden_size']}, "
          f"{CONFIG['num_local_experts']} experts x intermediate {CONFIG['intermediate_size']}, top-2, fp32, aot_eager\n")
    print("| tp | experts | params per rank (MiB) | experts per rank (MiB) | step ms (tp) | step ms (single device) | ratio "
          "| collectives per step | MiB moved per step (rank 0) |")
    print("|---|---|---|---|---|---|---|---|---|")
    full = rows[0][2]
    print(f"| 1 | - | {full['full'] * mib:.1f} | {full['experts_full'] * mib:.1f} | - | - | - | none | 0 |")
    for world, how, r, per_step in rows:
        print(f"| {world} | {how} | {r['local'] * mib:.1f} ({100 * r['local'] / r['full']:.0f}%) | "
              f"{r['experts_local'] * mib:.1f} ({100 * r['experts_local'] / r['experts_full']:.0f}%) | "
              f"{r['tp_ms']:.0f} | {r['single_ms']:.0f} | {r['tp_ms'] / r['single_ms']:.2f} | {per_step} | "
              f"{r['bytes'] * mib:.1f} |")


if __name__ == "__main__":
    main()
