"""Memory of tensor parallelism composed with FSDP2: parameters + gradients + optimizer state per rank.

The claim (issue 12): with FSDP2 applied per block on a (dp, tp) mesh, a rank holds about
full / (dp * tp) of the parameters, gradients and AdamW state, plus one block's TP shard while
that block runs (FSDP gathers one block at a time). This script measures it on 4 gloo ranks
against the same model on one device, with the peers side by side:

    single        the plain model, one device
    tp4           tpcompile, TP=4 (no data parallelism)
    fsdp4         FSDP2 alone over 4 ranks (per block + root), no TP
    tp2-dp2       tpcompile TP=2 + FSDP2 over dp=2, per block + root (tp_compile(model, mesh=mesh))
    tp2-dp2-root  the same, FSDP2 on the root module only (gathers the whole model at once)

What is counted: the bytes of the distinct storages behind every registered parameter, every
gradient and every AdamW state tensor (a DTensor counts its local tensor), sampled at every
module's forward and backward boundary through one training step (so a block FSDP has gathered
counts whole while it runs); "at rest" is after ``optimizer.step()``. Activations are not
counted: they do not depend on the data-parallel scheme.

    python benchmarks/bench_fsdp_memory.py            # prints the table, writes docs/img/fsdp_memory.png
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.multiprocessing as mp
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["single", "tp4", "fsdp4", "tp2-dp2", "tp2-dp2-root"]
WORLD = 4


def _storages(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        t = getattr(t, "_local_tensor", t)
        s = t.untyped_storage()
        if s.data_ptr() not in seen and s.nbytes():
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


class Meter:
    """Resident parameter / gradient / optimizer-state bytes, sampled at module boundaries."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer):
        self.model, self.opt, self.peak = model, opt, 0
        for m in model.modules():
            m.register_forward_pre_hook(lambda *a: self.sample())
            m.register_forward_hook(lambda *a: self.sample())
            m.register_full_backward_pre_hook(lambda *a: self.sample())

    def parts(self) -> dict:
        params = [p for m in self.model.modules() for p in m._parameters.values()]
        grads = [p.grad for p in params if p is not None]
        state = [v for s in self.opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim()]
        return {"params": _storages(params), "grads": _storages(grads), "optim": _storages(state)}

    def sample(self) -> None:
        self.peak = max(self.peak, sum(self.parts().values()))


def _model(args):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import gpt

    return gpt.make_model(n_layer=args.layers, n_embd=args.dim, n_head=8, vocab_size=args.vocab, block_size=64,
                          batch_size=4)


def _run(config: str, args, rank: int = 0) -> dict:
    import torch.distributed as dist

    import tpcompile

    model, (x, y) = _model(args)
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    block = sum(p.numel() * p.element_size() for p in model.h[0].parameters())
    if config == "tp4":
        model = tpcompile.tp_compile(model, example_inputs=(x[:2], y[:2]), backend="aot_eager")
    elif config == "fsdp4":
        from torch.distributed.fsdp import fully_shard

        for b in model.h:
            fully_shard(b)
        fully_shard(model)
    elif config.startswith("tp2-dp2"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        if config == "tp2-dp2":
            model = tpcompile.tp_compile(model, mesh=mesh, example_inputs=(x[:2], y[:2]), backend="aot_eager")
        else:
            model = tpcompile.tp_compile(model, group=mesh["tp"], example_inputs=(x[:2], y[:2]), backend="aot_eager")
            fully_shard(model, mesh=mesh["dp"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    meter = Meter(model, opt)
    for _ in range(2):  # the second step has optimizer state from the start
        loss = model(x, y)
        loss.backward()
        meter.sample()
        opt.step()
        meter.sample()
        opt.zero_grad(set_to_none=False)
    rest = meter.parts()
    if dist.is_initialized():
        dist.barrier()
    dp, tp = {"single": (1, 1), "tp4": (1, 4), "fsdp4": (4, 1)}.get(config, (2, 2))
    return {"config": config, "rest": rest, "peak": meter.peak, "full": full, "block": block, "dp": dp, "tp": tp,
            "loss": loss.item()}


def _quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # the meter's own hooks
    warnings.filterwarnings("ignore", category=UserWarning, module="tpcompile")  # graph-break notes
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)


def _entry(rank: int, config: str, args, store: str, queue) -> None:
    import torch.distributed as dist

    _quiet()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, WORLD), rank=rank, world_size=WORLD)
    try:
        out = _run(config, args, rank)
    finally:
        dist.destroy_process_group()
    queue.put((rank, out))


def measure(config: str, args) -> list[dict]:
    if config == "single":
        return [_run(config, args)]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_entry, args=(r, config, args, os.path.join(tmp, "store"), queue))
                 for r in range(WORLD)]
        for p in procs:
            p.start()
        results = dict(queue.get(timeout=900) for _ in procs)
        for p in procs:
            p.join()
    return [results[r] for r in range(WORLD)]


def _mib(n: float) -> str:
    return f"{n / 2**20:7.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--plot", default=os.path.join(ROOT, "docs", "img", "fsdp_memory.png"))
    args = ap.parse_args()
    _quiet()
    rows = []
    for config in CONFIGS:
        rs = measure(config, args)
        worst = max(rs, key=lambda r: r["peak"])
        rows.append(worst)
    single = rows[0]
    full3 = 4 * single["full"]  # params + grads + AdamW's two moments, on one device
    print(f"GPT {args.layers} layers, dim {args.dim}, vocab {args.vocab}: {single['full'] / 2**20:.2f} MiB of "
          f"fp32 parameters, one block {single['block'] / 2**20:.2f} MiB; {WORLD} gloo ranks, the worst rank shown")
    print(f"{'config':<13} {'params':>8} {'grads':>8} {'optim':>8} {'at rest':>8} {'peak':>8} "
          f"{'full/(dp*tp)':>12} {'+block/tp':>10} {'peak / that':>11} {'vs single':>9}")
    for r in rows:
        share = full3 / (r["dp"] * r["tp"])
        bound = share + r["block"] / r["tp"] if r["dp"] > 1 else share
        rest = sum(r["rest"].values())
        print(f"{r['config']:<13} {_mib(r['rest']['params'])} {_mib(r['rest']['grads'])} {_mib(r['rest']['optim'])} "
              f"{_mib(rest)}  {_mib(r['peak'])} {_mib(share):>12} {_mib(bound):>10} {r['peak'] / bound:>11.2f} "
              f"{r['peak'] / single['peak']:>9.2f}")
    print("MiB; 'full/(dp*tp)' is params + grads + AdamW state of the whole model over dp*tp ranks, "
          "'+block/tp' adds one block's TP shard (what FSDP gathers while a block runs).")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        names = [r["config"] for r in rows]
        ax.bar(names, [r["peak"] / 2**20 for r in rows], label="peak (params + grads + AdamW state)")
        ax.bar(names, [sum(r["rest"].values()) / 2**20 for r in rows], width=0.4, label="at rest")
        ax.set_ylabel("MiB per rank (worst rank)")
        ax.legend()
        fig.tight_layout()
        os.makedirs(os.path.dirname(args.plot), exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {os.path.relpath(args.plot, ROOT)}")
    except ImportError:
        print("(matplotlib not installed: no plot; pip install -e '.[bench]')")


if __name__ == "__main__":
    main()
