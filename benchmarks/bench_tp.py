"""tpcompile beside its peers: step time, compile time, communication and memory, as ratios.

One invocation runs the same model, batch, optimizer and steps under every configuration,
each in fresh processes spawned from this one (gloo ranks on CPU, NCCL ranks on GPUs, the
same code), so the machine's noise hits them alike:

on torch's own test Transformer (common_dtensor.Transformer):
    single            the plain model on one device, torch.compile (Inductor)
    dtensor-eager     DTensor TP, torch's own plan for the model (dtensor_parallelize below), eager
    dtensor-compiled  the same, torch.compile (Inductor)
    dtensor-lossp     the same, compiled, the LM head left sharded and the loss under loss_parallel()
    tpcompile         tpcompile.tp_compile(model), nothing else
    tpcompile-sp      tpcompile.tp_compile(model, sequence_parallel=True)
    tpcompile-whole   tpcompile.tp_compile(model, regional=False): one graph of every layer (the depth sweep)
and on Hugging Face's LlamaForCausalLM of the same size (a random-weight checkpoint saved first):
    hf-single         from_pretrained(path), one device, torch.compile
    hf-auto           from_pretrained(path, tp_plan="auto"): HF's own TP plan, eager
    hf-tpcompile      tpcompile.tp_compile(from_pretrained(path))

    python benchmarks/bench_tp.py                       # TP=2, small: the issue's target row
    python benchmarks/bench_tp.py --tp 1 2 4 --sizes small medium
    python benchmarks/bench_tp.py --quick               # fewer steps, for a smoke run
    python benchmarks/bench_tp.py --depth-only          # only compile time vs depth (2, 4, 8, 16 layers)

Writes docs/benchmarks.md (markdown tables, every figure also as a ratio to tpcompile) and
docs/img/*.png. Every configuration starts with an empty Inductor cache, so "compile" is
what a user pays on a fresh machine.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from tpcompile.compat import torchvision_without_kernels

torchvision_without_kernels()  # transformers imports torchvision when it and pillow are there (timm's tests)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = ["single", "dtensor-eager", "dtensor-compiled", "dtensor-lossp", "tpcompile", "tpcompile-sp"]
DEPTH_CONFIGS = ["dtensor-compiled", "tpcompile", "tpcompile-whole"]  # compile time vs depth
HF_CONFIGS = ["hf-single", "hf-auto", "hf-tpcompile"]  # the Llama table: HF's own model under each


@dataclass(frozen=True)
class Size:
    n_layers: int
    dim: int
    n_heads: int
    vocab: int
    batch: int
    seq: int


SIZES = {
    # the target: torch's test Transformer, 4 layers, dim 256, 8 heads, vocab 8192, batch 8x128
    "small": Size(n_layers=4, dim=256, n_heads=8, vocab=8192, batch=8, seq=128),
    # twice as wide, twice the vocabulary, same depth (so compile time stays comparable)
    "medium": Size(n_layers=4, dim=512, n_heads=8, vocab=16384, batch=8, seq=128),
    "tiny": Size(n_layers=2, dim=64, n_heads=4, vocab=512, batch=4, seq=32),  # for checking the script
}


# ----------------------------------------------------------------------------- the models
def build_transformer(size: Size) -> nn.Module:
    """torch's own test Transformer (common_dtensor), dropout off so every configuration trains alike."""
    from torch.testing._internal.distributed._tensor.common_dtensor import ModelArgs, Transformer

    torch.manual_seed(0)
    args = ModelArgs(n_layers=size.n_layers, vocab_size=size.vocab, max_seq_len=size.seq, dim=size.dim,
                     n_heads=size.n_heads, dropout_p=0.0, weight_tying=True)
    return Transformer(args)


class WithLoss(nn.Module):
    """The user's training forward: logits, then the loss (inside the compiled region)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model(tokens)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def dtensor_parallelize(model: nn.Module, tp_mesh, loss_parallel: bool = False) -> nn.Module:
    """What a DTensor user writes for this model: torch's own plan for it (``Transformer.parallelize``,
    without sequence parallelism), spelled out. This is the code tpcompile makes unnecessary."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    parallelize_module(model, tp_mesh, {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "pos_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        # loss_parallel() wants the logits left sharded over the vocabulary, as a DTensor
        "output": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False) if loss_parallel
        else ColwiseParallel(output_layouts=Replicate()),
    })
    for layer in model.layers:
        parallelize_module(layer, tp_mesh, {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(),
        })
        # Attention.forward does .view(bsz, seq_len, self.n_heads, head_dim) on *local* q/k/v now
        layer.attention.n_heads = model.model_args.n_heads // tp_mesh.size()
    model.output.weight = model.tok_embeddings.weight  # parallelize_module replaced both: tie them again
    return model


def hf_llama_config(size: Size):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=size.vocab, hidden_size=size.dim, intermediate_size=4 * size.dim,
                       num_hidden_layers=size.n_layers, num_attention_heads=size.n_heads,
                       num_key_value_heads=size.n_heads, max_position_embeddings=size.seq,
                       tie_word_embeddings=False, attn_implementation="sdpa", use_cache=False)


def save_hf_checkpoint(size: Size, path: str) -> None:
    """A random-weight Llama checkpoint on disk: tp_plan="auto" only works through from_pretrained."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(hf_llama_config(size)).save_pretrained(path)


class HFWithLoss(nn.Module):
    """HF's causal-LM forward with our (unshifted) targets, so every row computes the same kind of loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=tokens, use_cache=False).logits
        if hasattr(logits, "full_tensor"):  # a DTensor (HF's plan keeps the head replicated; just in case)
            logits = logits.full_tensor()
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


# ----------------------------------------------------------------------------- counting collectives
COLL_KINDS = {  # functional collectives (DTensor, tpcompile, Inductor) and c10d ops (dist.* calls)
    "all_reduce": "all_reduce", "all_reduce_": "all_reduce", "allreduce_": "all_reduce",
    "all_gather_into_tensor": "all_gather", "all_gather_into_tensor_out": "all_gather",
    "allgather_": "all_gather", "_allgather_base_": "all_gather", "allgather_into_tensor_coalesced_": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter", "reduce_scatter_": "reduce_scatter",
    "_reduce_scatter_base_": "reduce_scatter", "all_to_all_single": "all_to_all", "alltoall_base_": "all_to_all",
    "broadcast_": "broadcast",
}


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


class CollectiveCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts collectives as they are dispatched (eager code: DTensor, HF).

    Bytes as tpcompile's records count them: the whole buffer reduced or gathered (a
    reduce-scatter's input, every other collective's output)."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.seen: list[tuple[str, str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ns = func.namespace
        if ns in ("_c10d_functional", "c10d"):
            kind = COLL_KINDS.get(func._opname)
            if kind is not None:
                # c10d ops return (tensors, work): their output is the first element
                res = out[0] if ns == "c10d" and isinstance(out, tuple) else out
                if kind == "reduce_scatter":
                    res = args[1] if ns == "c10d" else args[0]  # c10d: (outputs, inputs, ...)
                self.seen.append((self.phase, kind, _nbytes(res)))
        return out


def recording_inductor(seen: list):
    """torch.compile backend = Inductor, recording the collectives of each AOT forward/backward graph."""
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner
    from tpcompile.backend import collectives_of

    def inner(gm, example_inputs, *args, **kwargs):
        phase = "backward" if kwargs.get("is_backward", False) else "forward"
        seen.extend((c.phase, c.kind, c.nbytes) for c in collectives_of(gm, phase))
        return compile_fx_inner(gm, example_inputs, *args, **kwargs)

    return lambda gm, example_inputs: compile_fx(gm, example_inputs, inner_compile=inner)


# ----------------------------------------------------------------------------- one configuration, one rank
def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _local_bytes(model: nn.Module) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        t = p.to_local() if hasattr(p, "to_local") else p
        n += t.numel() * t.element_size()
    return n


def _batches(size: Size, n: int, device) -> list:
    """A few fixed batches, cycled: the loss falls, so 'same loss after K steps' means something."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n):
        x = torch.randint(0, size.vocab, (size.batch, size.seq + 1), generator=g)
        out.append((x[:, :-1].contiguous().to(device), x[:, 1:].contiguous().to(device)))
    return out


def setup(config: str, size: Size, world: int, device, hf_path: str | None):
    """Build the model for ``config``; return (module, step_fn(tokens, targets, counter) -> loss, info)."""
    info: dict = {}
    seen: list = []  # collectives recorded by a compiler (compiled configs)
    ctx = contextlib.nullcontext
    if config in ("single", "dtensor-eager", "dtensor-compiled", "dtensor-lossp", "tpcompile", "tpcompile-sp",
                  "tpcompile-whole"):
        model = WithLoss(build_transformer(size)).to(device)
    if config == "single":
        fwd = torch.compile(model, backend=recording_inductor(seen))
    elif config.startswith("dtensor"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import loss_parallel

        mesh = init_device_mesh(device.type, (world,))
        lossp = config == "dtensor-lossp"
        dtensor_parallelize(model.model, mesh, loss_parallel=lossp)
        fwd = model if config == "dtensor-eager" else torch.compile(model, backend=recording_inductor(seen))
        if lossp:
            ctx = loss_parallel
    elif config.startswith("tpcompile"):
        import tpcompile

        model = tpcompile.tp_compile(model, sequence_parallel=config == "tpcompile-sp",
                                     regional=False if config == "tpcompile-whole" else None)
        fwd = model
    elif config.startswith("hf"):
        from transformers import LlamaForCausalLM

        if config == "hf-auto":
            # the deprecated spelling still works and is the one the docs show; DistributedConfig is the new one
            try:
                from transformers.distributed import DistributedConfig

                hf = LlamaForCausalLM.from_pretrained(hf_path, distributed_config=DistributedConfig(tp_plan="auto"))
            except ImportError:
                hf = LlamaForCausalLM.from_pretrained(hf_path, tp_plan="auto")
            model = HFWithLoss(hf)
            fwd = model
        else:
            model = HFWithLoss(LlamaForCausalLM.from_pretrained(hf_path)).to(device)
            if config == "hf-single":
                fwd = torch.compile(model, backend=recording_inductor(seen))
            else:
                import tpcompile

                fwd = tpcompile.tp_compile(model)
    else:
        raise ValueError(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(tokens, targets, counter=None):
        times = {}
        with ctx():
            t0 = time.perf_counter()
            if counter is not None:
                counter.phase = "forward"
            loss = fwd(tokens, targets)
            _sync(device)
            t1 = time.perf_counter()
            if counter is not None:
                counter.phase = "backward"
            loss.backward()
            _sync(device)
            t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        t3 = time.perf_counter()
        times.update(fwd=t1 - t0, bwd=t2 - t1, opt=t3 - t2, step=t3 - t0)
        return loss, times

    return model, step, seen, info


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_config(rank: int, world: int, config: str, size: Size, warmup: int, steps: int, hf_path: str | None,
               profile: bool = False) -> dict:
    """One configuration on one rank: first step (compile), warm-up, timed steps, one counted step."""
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rss0 = _rss_mib()
    model, step, seen, info = setup(config, size, world, device, hf_path)
    batches = _batches(size, 4, device)
    losses, times = [], []
    t0 = time.perf_counter()
    loss, first = step(*batches[0])
    compile_s = time.perf_counter() - t0
    losses.append(loss.item())
    for i in range(1, warmup + steps):
        if world > 1:
            dist.barrier()  # start each step together; not timed
        loss, t = step(*batches[i % len(batches)])
        losses.append(loss.item())
        if i >= warmup:
            times.append(t)
    out = {
        "config": config, "rank": rank, "world": world, "compile_s": compile_s, "first": first, "times": times,
        "losses": losses, "param_bytes": _local_bytes(model), "rss0_mib": rss0, "threads": torch.get_num_threads(),
    }
    # Communication: compiled configs report what their compiler put in the graphs (recorded once, at
    # compile time); eager configs are counted by a dispatch mode around one more (untimed) step.
    if config.startswith("tpcompile") or config == "hf-tpcompile":
        import tpcompile

        recs = tpcompile.tp_state(model if config != "hf-tpcompile" else model).records
        out["collectives"] = [(c.phase, c.kind, c.nbytes) for r in recs for c in r.collectives]
        out["count_method"] = "compiled graphs (tp_state(model).records)"
        out["rewrite_s"] = sum(r.rewrite_seconds for r in recs)
        out["graphs"] = len(recs)
        out["fallbacks"] = [m for r in recs for m in r.fallbacks]
    elif config in ("dtensor-eager", "hf-auto"):
        counter = CollectiveCounter()
        with counter:
            step(*batches[0], counter)
        out["collectives"] = counter.seen
        out["count_method"] = "TorchDispatchMode around one step"
    else:
        out["collectives"] = list(seen)
        out["count_method"] = "compiled graphs (AOT fwd/bwd)"
    if device.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["peak_kind"] = "max_memory_allocated"
    else:
        out["peak_mib"] = _peak_rss_mib()
        out["peak_kind"] = "peak RSS"
    from torch._dynamo.utils import compilation_time_metrics

    out["compile_breakdown"] = {k: sum(v) for k, v in compilation_time_metrics.items()}
    from torch._dynamo.utils import counters

    out["dynamo_graphs"] = counters["stats"]["unique_graphs"]
    out["graph_breaks"] = sum(counters["graph_break"].values())
    if profile:  # where one steady step spends its time (after everything above: it perturbs nothing timed)
        from torch.profiler import ProfilerActivity, profile as prof_ctx

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with prof_ctx(activities=acts) as prof:
            step(*batches[1])
        out["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60)
    out.update(info)
    return out


# ----------------------------------------------------------------------------- spawning ranks
def _entry(rank, world, store_path, queue, threads, cache_dir, args):
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir  # an empty cache: compile time from scratch
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
    try:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if world > 1 or args[0].startswith(("dtensor", "tpcompile", "hf-auto", "hf-tpcompile")):
            for k, v in {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": world}.items():
                os.environ[k] = str(v)
            store = dist.FileStore(store_path, world)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world)
        try:
            res = run_config(rank, world, *args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        queue.put((rank, True, res))
    except BaseException:  # noqa: BLE001 - every failure becomes an "n/a" row with its reason
        queue.put((rank, False, traceback.format_exc()))


THREADS = 0  # intra-op threads per rank; 0: the cores divided by the ranks


def spawn(world: int, config: str, size: Size, warmup: int, steps: int, hf_path, timeout: float,
          profile: bool = False) -> list | str:
    """Run one configuration on ``world`` fresh ranks; results by rank, or the first failure's text."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    threads = THREADS or max(1, (os.cpu_count() or 1) // world)
    with tempfile.TemporaryDirectory(prefix="bench-tp-") as tmp:
        procs = [ctx.Process(target=_entry, args=(r, world, os.path.join(tmp, "store"), queue, threads,
                                                   os.path.join(tmp, "inductor"),
                                                   (config, size, warmup, steps, hf_path, profile)))
                 for r in range(world)]
        for p in procs:
            p.start()
        results, error = {}, None
        try:
            for _ in range(world):
                r, ok, val = queue.get(timeout=timeout)
                if not ok:
                    error = val
                    break
                results[r] = val
        except Exception as e:  # noqa: BLE001 - queue.Empty on a hang
            error = f"no result in {timeout:.0f} s ({type(e).__name__})"
        finally:
            for p in procs:
                p.join(timeout=5 if error else timeout)
                if p.is_alive():
                    p.kill()
    if error:
        return error
    return [results[r] for r in range(world)]


def reason(err: str) -> str:
    """The last line of a traceback: the exception, short enough for a table cell."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else err
    return last.replace("|", "/")[:160]


# ----------------------------------------------------------------------------- summarising
def summarise(res: list, size: Size) -> dict:
    r0 = res[0]
    step = [t["step"] for t in r0["times"]]
    fwd = [t["fwd"] for t in r0["times"]]
    bwd = [t["bwd"] for t in r0["times"]]
    opt = [t["opt"] for t in r0["times"]]
    med = statistics.median(step)
    coll = {}
    for phase, kind, nbytes in r0["collectives"]:
        c = coll.setdefault(phase, [0, 0])
        c[0] += 1
        c[1] += max(nbytes, 0)
    return {
        "compile_s": max(r["compile_s"] for r in res),
        "step_ms": med * 1e3, "step_min_ms": min(step) * 1e3, "step_max_ms": max(step) * 1e3,
        "fwd_ms": statistics.median(fwd) * 1e3, "bwd_ms": statistics.median(bwd) * 1e3,
        "opt_ms": statistics.median(opt) * 1e3,
        "tok_s": size.batch * size.seq / med,
        "coll_fwd": coll.get("forward", [0, 0])[0], "bytes_fwd": coll.get("forward", [0, 0])[1],
        "coll_bwd": coll.get("backward", [0, 0])[0], "bytes_bwd": coll.get("backward", [0, 0])[1],
        "count_method": r0["count_method"],
        "param_mib": max(r["param_bytes"] for r in res) / 2**20,
        "peak_mib": max(r["peak_mib"] for r in res), "peak_kind": r0["peak_kind"],
        "rss0_mib": max(r["rss0_mib"] for r in res),
        "loss0": r0["losses"][0], "lossK": r0["losses"][-1], "K": len(r0["losses"]),
        "rank_losses_equal": all(r["losses"] == r0["losses"] for r in res),
        "rewrite_s": r0.get("rewrite_s"), "graphs": r0.get("graphs"), "fallbacks": r0.get("fallbacks", []),
        "threads": r0["threads"], "n_steps": len(step),
        "dynamo_graphs": r0.get("dynamo_graphs", 0), "graph_breaks": r0.get("graph_breaks", 0),
    }


def _mib(b: int) -> str:
    return f"{b / 2**20:.2f}"


def _ratio(a, b) -> str:
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}x"


def table(rows: dict, base: str = "tpcompile") -> str:
    """One markdown table: a row per configuration, each figure followed by its ratio to ``base``."""
    b = rows.get(base) if isinstance(rows.get(base), dict) else None
    head = ("| configuration | compile s (first step) | step ms median [min–max] | fwd / bwd / opt ms | tokens/s "
            "| collectives fwd / bwd | collective buffers MiB fwd / bwd | param MiB / rank | peak MiB / rank | "
            "loss step 0 → K | Dynamo graphs / breaks |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, s in rows.items():
        if not isinstance(s, dict):
            lines.append(f"| {name} | n/a: {s} |" + " |" * 9)
            continue

        def r(key):
            return f" ({_ratio(s[key], b[key])})" if b else ""

        lines.append(
            f"| {name} | {s['compile_s']:.1f}{r('compile_s')} "
            f"| {s['step_ms']:.1f} [{s['step_min_ms']:.1f}–{s['step_max_ms']:.1f}]{r('step_ms')} "
            f"| {s['fwd_ms']:.1f} / {s['bwd_ms']:.1f} / {s['opt_ms']:.1f} "
            f"| {s['tok_s']:.0f}{r('tok_s')} "
            f"| {s['coll_fwd']} / {s['coll_bwd']} "
            f"| {_mib(s['bytes_fwd'])} / {_mib(s['bytes_bwd'])} "
            f"| {s['param_mib']:.2f}{r('param_mib')} | {s['peak_mib']:.0f}{r('peak_mib')} "
            f"| {s['loss0']:.4f} → {s['lossK']:.4f}{'' if s['rank_losses_equal'] else ' (ranks differ!)'} "
            f"| {s['dynamo_graphs']} / {s['graph_breaks']} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots
def plots(results: dict, img_dir: str) -> list[str]:
    """Bar charts, one panel per (size, TP): step time (with min–max), compile time, peak memory."""
    try:
        import matplotlib
    except ImportError:
        print("no plots: matplotlib is not installed (pip install -e '.[bench]', or `make bench`)")
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(img_dir, exist_ok=True)
    sizes = list(dict.fromkeys(k[0] for k in results))
    tps = list(dict.fromkeys(k[1] for k in results))
    written = []
    for key, label, fname in [("step_ms", "steady step time, ms (median; bars: min–max)", "step_time.png"),
                              ("compile_s", "compile time: the first step, s", "compile_time.png"),
                              ("peak_mib", "peak memory per rank, MiB", "memory.png")]:
        fig, axes = plt.subplots(len(sizes), len(tps), figsize=(4.2 * len(tps), 3.6 * len(sizes)), squeeze=False)
        for (size_name, tp), rows in results.items():
            ax = axes[sizes.index(size_name)][tps.index(tp)]
            names = [n for n, s in rows.items() if isinstance(s, dict)]
            vals = [rows[n][key] for n in names]
            colors = ["tab:red" if n.startswith("tpcompile") else "tab:gray" if n == "single" else "tab:blue"
                      for n in names]
            yerr = None
            if key == "step_ms":
                yerr = [[rows[n]["step_ms"] - rows[n]["step_min_ms"] for n in names],
                        [rows[n]["step_max_ms"] - rows[n]["step_ms"] for n in names]]
            ax.bar(range(len(names)), vals, color=colors, yerr=yerr, capsize=3)
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
            ax.set_title(f"{size_name}, TP={tp}", fontsize=9)
        for ax in axes.flat:
            if not ax.has_data():
                ax.set_visible(False)
        fig.suptitle(label, fontsize=11)
        fig.tight_layout()
        path = os.path.join(img_dir, fname)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


# ----------------------------------------------------------------------------- main
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores ({cpu}){gpu}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, nargs="+", default=[2], help="TP degrees (the scaling grid)")
    p.add_argument("--sizes", nargs="+", default=["small"], choices=list(SIZES), help="model sizes (the grid)")
    p.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS + ["tpcompile-whole"],
                   help="configurations at the headline point (first size, TP=2 if listed, else the first TP)")
    p.add_argument("--scaling-configs", nargs="+", default=["single", "dtensor-compiled", "tpcompile"],
                   choices=CONFIGS + ["tpcompile-whole"], help="configurations at every other point of the grid")
    p.add_argument("--depths", type=int, nargs="*", default=[2, 4, 8, 16],
                   help="layer counts of the compile-time-vs-depth sweep (first size, headline TP); none: skip it")
    p.add_argument("--depth-configs", nargs="+", default=DEPTH_CONFIGS, choices=CONFIGS + ["tpcompile-whole"])
    p.add_argument("--depth-steps", type=int, default=2, help="timed steps per depth point (after 1 warm-up)")
    p.add_argument("--depth-only", action="store_true",
                   help="run only the depth sweep and replace its section of --out (the rest of the file is kept)")
    p.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True,
                   help="at the headline point, HF's LlamaForCausalLM: single device, tp_plan='auto' and "
                        "tpcompile (the same model in all three, so the ratios compare like with like)")
    p.add_argument("--warmup", type=int, default=2, help="steps after the first (compile) step, not timed")
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--quick", action="store_true", help="warm-up 1, 4 timed steps")
    p.add_argument("--profile", action="store_true", help="profile one extra steady step of each configuration at the headline point")
    p.add_argument("--timeout", type=float, default=900, help="seconds per configuration before it is n/a")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads per rank (0: cores // ranks). 1 keeps a busy 2-core machine from "
                        "thrashing OpenMP; single device then also gets one core")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    p.add_argument("--img", default=os.path.join(ROOT, "docs", "img"))
    p.add_argument("--json", default=None, help="also dump every raw result here")
    args = p.parse_args(argv)
    global THREADS
    THREADS = args.threads
    if args.quick:
        args.warmup, args.steps = 1, 4
    warmup = args.warmup + 1  # the first step (compile) is never timed
    cmd = "python benchmarks/bench_tp.py " + " ".join(sys.argv[1:] if argv is None else argv)
    head = (args.sizes[0], 2 if 2 in args.tp else args.tp[0])
    started = time.perf_counter()
    results: dict = {}  # (size, tp) -> {config: summary | reason}
    raw: dict = {}
    single: dict = {}  # size -> the single-device row (the same for every TP degree)

    def one(size_name: str, tp: int, config: str, hf_path: str | None, layers: int | None = None):
        size = SIZES[size_name] if layers is None else replace(SIZES[size_name], n_layers=layers)
        if config == "single" and size_name in single and layers is None:
            return single[size_name]
        world = 1 if config in ("single", "hf-single") else tp
        t = time.perf_counter()
        if layers is None:
            out = spawn(world, config, size, warmup, args.steps, hf_path, args.timeout,
                        args.profile and (size_name, tp) == head)
        else:  # the depth sweep: compile time is the figure; a short steady phase checks the losses
            out = spawn(world, config, size, 2, args.depth_steps, hf_path, args.timeout)
            size_name = f"{size_name}/{layers} layers"
        dt = time.perf_counter() - t
        if isinstance(out, str):
            print(f"[{size_name} tp={tp}] {config}: n/a ({dt:.0f} s)\n{out}", flush=True)
            row = reason(out)
        else:
            raw[f"{size_name}/tp{tp}/{config}"] = out
            row = summarise(out, size)
            print(f"[{size_name} tp={tp}] {config}: compile {row['compile_s']:.1f} s, step {row['step_ms']:.1f} ms, "
                  f"loss {row['lossK']:.4f} ({dt:.0f} s)", flush=True)
        if config == "single" and layers is None:
            single[size_name] = row
        return row

    depth: dict = {}  # layers -> {config: summary | reason}

    def run_depths() -> None:
        for layers in args.depths:
            depth[layers] = {}
            for config in args.depth_configs:
                depth[layers][config] = one(head[0], head[1], config, None, layers)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(raw, f, indent=1, default=str)

    if args.depth_only:
        run_depths()
        imgs = depth_plot(depth, args.img, head)
        replace_depth_section(args.out, depth_section(args, cmd, head, depth, imgs, time.perf_counter() - started))
        print(f"wrote the depth section of {args.out} and {', '.join(imgs)} in {time.perf_counter() - started:.0f} s")
        return 0

    hf_rows: dict = {}
    grid = [(n, t) for n in args.sizes for t in args.tp]
    for size_name, tp in grid:
        results[(size_name, tp)] = {}

    def flush(final: bool = False) -> list:
        """Write what there is so far: a run cut short still leaves a table."""
        if args.json:
            with open(args.json, "w") as f:
                json.dump(raw, f, indent=1, default=str)
        done = {k: v for k, v in results.items() if v}
        imgs = plots(done, args.img) if final else []
        write_markdown(args, cmd, head, done, hf_rows, raw, imgs, time.perf_counter() - started, final)
        return imgs

    # the headline point first, then the Hugging Face table, then the rest of the grid
    for config in args.configs:
        results[head][config] = one(*head, config, None)
        flush()
    if args.hf:
        size_name, tp = head
        with tempfile.TemporaryDirectory(prefix="bench-hf-") as hf_dir:
            try:
                save_hf_checkpoint(SIZES[size_name], hf_dir)
            except Exception as e:  # noqa: BLE001 - e.g. transformers not installed
                hf_rows = {c: f"{type(e).__name__}: {e}" for c in HF_CONFIGS}
            else:
                for config in HF_CONFIGS:
                    hf_rows[config] = one(size_name, tp, config, hf_dir)
                    flush()
    for size_name, tp in grid:
        if (size_name, tp) == head:
            continue
        for config in args.scaling_configs:
            results[(size_name, tp)][config] = one(size_name, tp, config, None)
            flush()
    run_depths()
    imgs = flush(final=True)
    imgs += depth_plot(depth, args.img, head)
    if depth:
        with open(args.out, "a") as f:
            f.write("\n" + depth_section(args, cmd, head, depth, imgs, time.perf_counter() - started, own_header=False))
    total = time.perf_counter() - started
    print(f"wrote {args.out} and {', '.join(imgs)} in {total:.0f} s")
    return 0


# ----------------------------------------------------------------------------- compile time vs depth
DEPTH_START, DEPTH_END = "<!-- depth sweep: start -->", "<!-- depth sweep: end -->"


def depth_verdict(depth: dict) -> list[str]:
    """Issue 17's targets: tpcompile's compile at the deepest point <= 0.35x DTensor compiled's, and
    its growth from 4 layers to the deepest <= 1.3x."""
    ok = {d: rows for d, rows in depth.items() if all(isinstance(rows.get(c), dict) for c in ("tpcompile", "dtensor-compiled"))}
    if not ok:
        return []
    deep = max(ok)
    t, d = ok[deep]["tpcompile"]["compile_s"], ok[deep]["dtensor-compiled"]["compile_s"]
    out = [f"Targets (issue 17), first step (compile) at {deep} layers: tpcompile / dtensor-compiled {t / d:.2f}x "
           f"({'met' if t / d <= 0.35 else 'missed'}: <= 0.35x)"]
    if 4 in ok and deep > 4:
        g = t / ok[4]["tpcompile"]["compile_s"]
        gd = d / ok[4]["dtensor-compiled"]["compile_s"]
        out[0] += (f"; growth from 4 to {deep} layers: tpcompile {g:.2f}x ({'met' if g <= 1.3 else 'missed'}: "
                   f"<= 1.3x), dtensor-compiled {gd:.2f}x")
    return [out[0] + ".", ""]


def depth_table(depth: dict) -> str:
    configs = list(dict.fromkeys(c for rows in depth.values() for c in rows))
    lines = ["| layers | " + " | ".join(f"{c} compile s" for c in configs) + " | tpcompile / dtensor-compiled "
             "| tpcompile / tpcompile-whole | losses at step K equal |", "|" + "---|" * (len(configs) + 4)]
    for layers, rows in depth.items():
        cells = [f"{rows[c]['compile_s']:.1f}" if isinstance(rows.get(c), dict) else f"n/a: {rows.get(c)}"
                 for c in configs]
        t = rows.get("tpcompile")

        def rat(other):
            o = rows.get(other)
            return _ratio(t["compile_s"], o["compile_s"]) if isinstance(t, dict) and isinstance(o, dict) else "–"

        losses = [r["lossK"] for r in rows.values() if isinstance(r, dict)]
        same = all(abs(x - losses[0]) <= 1e-4 * abs(losses[0]) for x in losses) if losses else False
        lines.append(f"| {layers} | " + " | ".join(cells) + f" | {rat('dtensor-compiled')} | {rat('tpcompile-whole')} "
                     f"| {'yes' if same else 'NO'} ({', '.join(f'{x:.4f}' for x in losses)}) |")
    return "\n".join(lines)


def depth_plot(depth: dict, img_dir: str, head: tuple) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        return []
    if not depth:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(img_dir, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    configs = list(dict.fromkeys(c for rows in depth.values() for c in rows))
    style = {"tpcompile": ("tab:red", "o-"), "tpcompile-whole": ("tab:orange", "s--"),
             "dtensor-compiled": ("tab:blue", "^-")}
    for c in configs:
        pts = [(d, rows[c]["compile_s"]) for d, rows in depth.items() if isinstance(rows.get(c), dict)]
        if pts:
            color, fmt = style.get(c, ("tab:gray", "x-"))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], fmt, color=color, label=c)
    ax.set_xlabel("layers")
    ax.set_ylabel("first step (compile), s")
    ax.set_xticks(sorted(depth))
    ax.set_ylim(bottom=0)
    ax.set_title(f"compile time vs depth: {head[0]} width, TP={head[1]}, empty Inductor cache", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(img_dir, "compile_vs_depth.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def _load() -> str:
    try:
        return "load average (1/5/15 min) %.1f / %.1f / %.1f" % os.getloadavg()
    except OSError:
        return "load average n/a"


def depth_section(args, cmd: str, head: tuple, depth: dict, imgs: list, total: float, own_header: bool = True) -> str:
    size = SIZES[head[0]]
    L = [DEPTH_START, f"## Compile time vs depth: torch's test Transformer, {head[0]} width (dim {size.dim}, "
         f"{size.n_heads} heads, vocab {size.vocab}, batch {size.batch}x{size.seq}), TP={head[1]}", ""]
    if own_header:
        L += [f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; machine: {machine()}; "
              f"{args.threads or 'cores // ranks'} intra-op thread(s) per rank; torch {torch.__version__}",
              f"- command: `{cmd}` ({total / 60:.1f} min in all); {_load()} at the end of the run", ""]
    L += ["Every point is fresh processes with an empty Inductor cache (`TORCHINDUCTOR_CACHE_DIR` a new directory "
          "per configuration); the figure is the first step (Dynamo, the rewrite, AOTAutograd and Inductor for "
          "forward and backward, plus one step). `tpcompile` compiles each repeated block once (regional compilation, the default"
          f"); `tpcompile-whole` is `tp_compile(model, regional=False)`. Then 1 warm-up "
          f"and {args.depth_steps} timed steps; the losses at the last step must agree.", "",
          depth_table(depth), ""] + depth_verdict(depth)
    L += [f"![compile_vs_depth.png](img/{os.path.basename(i)})" for i in imgs if i.endswith("compile_vs_depth.png")]
    L += ["", DEPTH_END, ""]
    return "\n".join(L)


def replace_depth_section(path: str, section: str) -> None:
    """Put ``section`` in place of the depth sweep's section of ``path`` (appended if it has none)."""
    text = open(path).read() if os.path.exists(path) else ""
    if DEPTH_START in text and DEPTH_END in text:
        a, b = text.index(DEPTH_START), text.index(DEPTH_END) + len(DEPTH_END)
        text = text[:a] + section.rstrip("\n") + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w") as f:
        f.write(text)


def scaling_table(results: dict) -> str:
    """One line per (size, TP, configuration): the cost curve, plus tpcompile's rewrite share of compile."""
    lines = ["| size | TP | configuration | compile s | step ms median [min–max] | tokens/s | param MiB / rank "
             "| peak MiB / rank | vs tpcompile: step / compile / peak | rewrite passes, share of compile |",
             "|" + "---|" * 10]
    for (size_name, tp), rows in results.items():
        b = rows.get("tpcompile") if isinstance(rows.get("tpcompile"), dict) else None
        for name, s in rows.items():
            if not isinstance(s, dict):
                lines.append(f"| {size_name} | {tp} | {name} | n/a: {s} |" + " |" * 6)
                continue
            rat = (f"{_ratio(s['step_ms'], b['step_ms'])} / {_ratio(s['compile_s'], b['compile_s'])} / "
                   f"{_ratio(s['peak_mib'], b['peak_mib'])}") if b else "–"
            rw = (f"{s['rewrite_s'] * 1e3:.0f} ms = {100 * s['rewrite_s'] / s['compile_s']:.2f}%"
                  if s.get("rewrite_s") is not None else "")
            lines.append(f"| {size_name} | {tp} | {name} | {s['compile_s']:.1f} | {s['step_ms']:.1f} "
                         f"[{s['step_min_ms']:.1f}–{s['step_max_ms']:.1f}] | {s['tok_s']:.0f} | {s['param_mib']:.2f} "
                         f"| {s['peak_mib']:.0f} | {rat} | {rw} |")
    return "\n".join(lines)


def verdict(rows: dict) -> list[str]:
    """The issue's targets at the headline point, measured: step <= 0.9x and compile <= 0.8x of
    DTensor compiled, with the same losses."""
    t, d = rows.get("tpcompile"), rows.get("dtensor-compiled")
    if not (isinstance(t, dict) and isinstance(d, dict)):
        return []
    step, comp = t["step_ms"] / d["step_ms"], t["compile_s"] / d["compile_s"]
    same = abs(t["lossK"] - d["lossK"]) <= 1e-4 * abs(d["lossK"])
    return [f"Targets (issue 6), tpcompile / dtensor-compiled: steady step {step:.2f}x "
            f"({'met' if step <= 0.9 else 'missed'}: <= 0.9x), compile {comp:.2f}x "
            f"({'met' if comp <= 0.8 else 'missed'}: <= 0.8x), loss at step K {t['lossK']:.6f} vs {d['lossK']:.6f} "
            f"({'same' if same else 'DIFFERENT'} to 1e-4 relative).", ""]


def write_markdown(args, cmd: str, head: tuple, results: dict, hf_rows: dict, raw: dict, imgs: list,
                   total: float, final: bool = True) -> None:
    size_name, tp = head
    size = SIZES[size_name]
    L = ["# Benchmarks: tpcompile beside its peers", "",
         "Generated by `benchmarks/bench_tp.py` (`make bench`); do not edit by hand.", ""]
    L += [f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
          f"- machine: {machine()}; {args.threads or 'cores // ranks'} intra-op thread(s) per rank",
          f"- torch {torch.__version__}, backend {'nccl' if torch.cuda.is_available() else 'gloo'}",
          f"- command: `{cmd}` ({total / 60:.1f} min in all{'' if final else '; INCOMPLETE: still running or cut short'})",
          f"- each configuration: 1 first step (includes compiling; timed alone), {args.warmup} warm-up steps, "
          f"{args.steps} timed steps (median, [min–max], rank 0; the ranks start each step together); "
          "AdamW (lr 1e-3), 4 fixed batches cycled, fp32, dropout off; fresh processes with an empty Inductor "
          "cache, all spawned by this one command, one configuration at a time. The loss column: step 0 and "
          f"step K = {args.warmup + args.steps} (the last; rank 0; every rank reports the same unless marked).",
          "- collectives: compiled configurations: counted in the AOT forward/backward graphs the compiler "
          "produced (tpcompile: `tp_state(model).records`; others: a recording Inductor backend); eager ones "
          "(DTensor eager, HF): a `TorchDispatchMode` around one extra step, counting `_c10d_functional` and "
          "`c10d` collectives. Bytes: the whole buffer each collective reduces or gathers (a reduce-scatter's "
          "input, otherwise the output), summed; on a ring an all-reduce of N sends what an all-gather plus a "
          "reduce-scatter of N send together, so SP rows read twice the buffer MiB for the same traffic. Memory: "
          + ("`torch.cuda.max_memory_allocated`" if torch.cuda.is_available() else
             "peak RSS of the rank's process (includes ~300-400 MiB of torch itself and Inductor's compile)") + ".",
          ""]
    L += [f"## Headline: torch's test Transformer, {size_name} ({size.n_layers} layers, dim {size.dim}, "
          f"{size.n_heads} heads, vocab {size.vocab}, batch {size.batch}x{size.seq}), TP={tp}", "",
          "In brackets: the ratio to tpcompile (tokens/s: higher is better; everything else: lower).", "",
          table(results.get(head, {})), ""] + verdict(results.get(head, {}))
    if hf_rows:
        L += [f"## Hugging Face `LlamaForCausalLM` of the same size, TP={tp}", "",
              "`hf-auto` is `from_pretrained(path, tp_plan=\"auto\")` (eager; HF's own plan); `hf-single` the same "
              "checkpoint on one device, compiled; `hf-tpcompile` it under `tpcompile.tp_compile`. "
              "Ratios are to hf-tpcompile.", "", table(hf_rows, base="hf-tpcompile"), ""]
    if len(results) > 1:
        L += ["## Scaling: TP degree and model size", "",
              "Sizes: " + "; ".join(f"{n}: {SIZES[n].n_layers} layers, dim {SIZES[n].dim}, {SIZES[n].n_heads} heads, "
                                    f"vocab {SIZES[n].vocab}, batch {SIZES[n].batch}x{SIZES[n].seq}"
                                    for n in args.sizes) + ". The single-device row is the same at every TP.", "",
              scaling_table(results), ""]
    prof = {k: v[0]["profile"] for k, v in raw.items() if v[0].get("profile")}
    if prof:
        L += ["## Where a steady step spends its time (rank 0, `torch.profiler`, top ops by self CPU time)", ""]
        for k, t in prof.items():
            L += [f"### {k}", "", "```", t.strip(), "```", ""]
    if imgs:
        L += ["## Plots", ""] + [f"![{os.path.basename(i)}](img/{os.path.basename(i)})" for i in imgs] + [""]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(L))


if __name__ == "__main__":
    sys.exit(main())
