"""Peak host memory per rank while loading a ~1 GB fp32 checkpoint at TP=2 (issue 7).

    python benchmarks/bench_load_memory.py            # ~1.07 GB GPT, 2 gloo ranks, CPU
    python benchmarks/bench_load_memory.py --layers 2 # smaller, quicker

The checkpoint is written once as Hugging-Face-style shards (``model-0000k-of-0000n.safetensors``
+ ``model.safetensors.index.json``). Each rank then runs one of two ways of getting its shards:

- ``meta + load_checkpoint``: build on the ``meta`` device, ``tp_compile(example_inputs=...)``
  (plans and allocates only the local shards), ``tpcompile.load_checkpoint`` (reads only this
  rank's slice of each tensor with ``safe_open(...).get_slice``);
- ``full model, then shard``: what a user without this does: build the full model on every rank,
  load the full state dict, then ``tp_compile`` shards it.

Memory is read from ``/proc/self/status`` (Linux): ``VmRSS`` before, and the peak ``VmHWM`` over
the whole build + plan + load (and, separately, over the load step alone: the peak is reset
through ``/proc/self/clear_refs`` after planning). "growth" is the peak minus the RSS before the
model was built (Python + torch + the process group are already there), which is what the model
costs; it is compared with the size of the full fp32 model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

MB = 1024 * 1024


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _config(args):
    import gpt

    return gpt.GPTConfig(vocab_size=32000, block_size=64, n_layer=args.layers, n_head=16, n_embd=2048)


def _write_checkpoint(args, path: str) -> int:
    """Sharded safetensors of a seeded GPT, tied LM head saved once; returns the fp32 bytes."""
    import gpt
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = gpt.GPT(_config(args))
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    total = sum(v.numel() * v.element_size() for v in sd.values())
    files, cur, size, weight_map = [], {}, 0, {}
    for k, v in sd.items():
        if cur and size + v.numel() * 4 > 300 * MB:
            files.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += v.numel() * 4
    files.append(cur)
    for i, chunk in enumerate(files):
        name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        save_file(chunk, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in chunk})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def _rank(rank: int, world: int, args, path: str, how: str, store: str, queue) -> None:
    import torch.distributed as dist

    import gpt
    import tpcompile

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    cfg = _config(args)
    x = torch.randint(0, cfg.vocab_size, (1, 16))
    y = torch.randint(0, cfg.vocab_size, (1, 16))
    _reset_peak()
    before = _status("VmRSS")
    t0 = time.perf_counter()
    if how == "meta":
        with torch.device("meta"):
            model = gpt.GPT(cfg)
        model = tpcompile.tp_compile(model, example_inputs=(x, y))
        planned = _status("VmRSS")
        peak_plan = _status("VmHWM")
        _reset_peak()
        t1 = time.perf_counter()
        tpcompile.load_checkpoint(model, path)
    else:
        from safetensors.torch import load_file

        model = gpt.GPT(cfg)
        planned = _status("VmRSS")
        peak_plan = _status("VmHWM")
        _reset_peak()
        t1 = time.perf_counter()
        sd = {}
        for fn in sorted(os.listdir(path)):
            if fn.endswith(".safetensors"):
                sd.update(load_file(os.path.join(path, fn)))
        model.load_state_dict(sd, strict=False)  # lm_head.weight is tied to wte.weight
        del sd
        model = tpcompile.tp_compile(model, example_inputs=(x, y))
    t2 = time.perf_counter()
    peak_load = _status("VmHWM")
    local = sum(p.numel() * p.element_size() for p in model.parameters())
    dist.barrier()
    dist.destroy_process_group()
    queue.put((rank, dict(before=before, planned=planned, peak=max(peak_plan, peak_load), peak_load=peak_load,
                          local=local, load_s=t2 - t1, total_s=t2 - t0)))


def _run(args, path: str, how: str) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank, args=(r, args.tp, args, path, how, os.path.join(tmp, "store"), queue))
                 for r in range(args.tp)]
        for p in procs:
            p.start()
        out = dict(queue.get(timeout=1800) for _ in procs)
        for p in procs:
            p.join()
    return [out[r] for r in range(args.tp)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--skip-full", action="store_true", help="only the meta + load_checkpoint path")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as path:
        total = _write_checkpoint(args, path)
        n_files = len([f for f in os.listdir(path) if f.endswith(".safetensors")])
        print(f"GPT n_layer={args.layers} n_embd=2048 vocab=32000: {total / MB:.0f} MiB fp32 in {n_files} "
              f"safetensors files; TP={args.tp} gloo ranks on CPU\n")
        hdr = (f"{'how':<26}{'rank':>5}{'RSS before':>12}{'peak':>10}{'growth':>10}{'growth/model':>14}"
               f"{'load peak-before':>18}{'local shards':>14}{'load s':>8}")
        print(hdr)
        print("-" * len(hdr))
        ways = [("meta", "meta + load_checkpoint")] + ([] if args.skip_full else [("full", "full model, then shard")])
        for how, label in ways:
            for r, m in enumerate(_run(args, path, how)):
                growth = m["peak"] - m["before"]
                print(f"{label:<26}{r:>5}{m['before'] / MB:>10.0f}Mi{m['peak'] / MB:>8.0f}Mi{growth / MB:>8.0f}Mi"
                      f"{growth / total:>14.2f}{(m['peak_load'] - m['planned']) / MB:>16.0f}Mi"
                      f"{m['local'] / MB:>12.0f}Mi{m['load_s']:>8.1f}")


if __name__ == "__main__":
    main()
