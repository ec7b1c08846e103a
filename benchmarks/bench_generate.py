"""Decode benchmark: HF Llama-style ``generate()`` at TP=1, 2, 4 (gloo) beside single device (issue 15, item 6).

    python benchmarks/bench_generate.py                       # TP 1 2 4, dynamic + static cache
    python benchmarks/bench_generate.py --tp 2 --cache static --new-tokens 64 --backend inductor

Per configuration: prefill time (the prompt's forward, compile excluded: measured on a second
``generate`` call), decode tokens/s (median, min-max over the decode steps of that call, from a
timer around every forward), collectives and bytes per decode token (from the compiled decode
graph's record), and the KV-cache bytes each rank holds against the logical cache. The tokens
are checked equal to single device's.

Peers: HF's own tensor parallelism, ``from_pretrained(dir, distributed_config=DistributedConfig(
tp_plan="auto", tp_size=tp))`` on a ``save_pretrained`` copy of the same model (DTensor, eager; it
needs ``accelerate``: ``pip install -e ".[bench]"``), its collectives counted as they are
dispatched (``bench_tp.CollectiveCounter``) over one decode step. Not run: a gpt-fast style
DTensor-free TP (gpt-fast is a script of its own models, not a library a Llama of HF's can use).

A second table: the collectives on the logits per decode token, HF ``generate()``'s path (the last
position's ``[B, 1, V]`` logits gathered, sampled in eager code) against a gpt-fast sampling step
(temperature, top-k, softmax, ``argmax(probs / exponential noise)``) compiled in the graph, whose
vocab-parallel selection moves a few values per row: from ``tpcompile.explain`` (one process).
``--plot out.png`` needs matplotlib.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, HERE)  # bench_tp's collective counter

from tpcompile.compat import torchvision_without_kernels  # noqa: E402

torchvision_without_kernels()  # transformers may import torchvision (a CUDA wheel under the CPU torch)


def _model(args):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=4 * args.dim,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=512,
                         attn_implementation="sdpa")
    return tf.LlamaForCausalLM(cfg).eval()


def _timed_generate(model, ids, args, cache):
    """One ``generate`` with a timer around every forward: (tokens, prefill s, per-step decode s, cache)."""
    times = []
    fwd = model.forward

    def timed(*a, **k):
        t = time.perf_counter()
        out = fwd(*a, **k)
        times.append(time.perf_counter() - t)
        return out

    model.forward = timed
    kw = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
              min_new_tokens=args.new_tokens)
    if cache == "static":
        kw["cache_implementation"] = "static"
    try:
        with torch.no_grad():
            out = model.generate(ids, **kw)
    finally:
        model.forward = fwd
    return out.sequences, times[0], times[1:], out.past_key_values


def _rank(rank: int, world: int, args, cache: str) -> dict:
    import warnings

    import tpcompile
    from tpcompile.twin import state_bytes

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    model = _model(args)
    ref = copy.deepcopy(model)
    ids = torch.randint(1, args.vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
    out = {}
    _timed_generate(ref, ids, args, cache)  # warm-up
    want, pre, steps, kv = _timed_generate(ref, ids, args, cache)  # single device, eager: the reference
    if world == 1:
        out["single"] = (pre, steps, state_bytes(kv))
    tp = tpcompile.tp_compile(model, backend=args.backend)
    t0 = time.perf_counter()
    _timed_generate(tp, ids, args, cache)  # compiles
    compile_s = time.perf_counter() - t0
    got, pre, steps, kv = _timed_generate(tp, ids, args, cache)
    st = tpcompile.tp_state(tp)
    decode = st.records[-1]
    out["tp"] = (pre, steps, state_bytes(kv), compile_s, len(st.records),
                 [(c.kind, c.nbytes) for c in decode.collectives], torch.equal(got, want))
    return out


def _hf_rank(rank: int, world: int, args, cache: str, path: str) -> dict:
    """HF's own TP (``tp_plan="auto"``, DTensor, eager) on the saved copy of the same model."""
    import warnings

    import transformers as tf
    from bench_tp import CollectiveCounter

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    from transformers.distributed import DistributedConfig

    model = tf.AutoModelForCausalLM.from_pretrained(
        path, distributed_config=DistributedConfig(tp_plan="auto", tp_size=world)).eval()
    ref = tf.AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(1, args.vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
    want = _timed_generate(ref, ids, args, cache)[0]
    _timed_generate(model, ids, args, cache)  # warm-up
    got, pre, steps, kv = _timed_generate(model, ids, args, cache)
    counter = CollectiveCounter()  # one decode step: the prompt, then a token, counted
    with torch.no_grad():
        out = model(ids, use_cache=True)
        with counter:
            model(ids[:, :1], past_key_values=out.past_key_values, use_cache=True)
    held = sum(t.numel() * t.element_size() for layer in kv.layers for t in (layer.keys, layer.values))
    return {"hf": (pre, steps, (held, held * min(world, args.kv_heads)), [(k, n) for _, k, n in counter.seen],
                   torch.equal(got, want), tuple(model.lm_head.weight.to_local().shape))}


def _run(world: int, args, cache: str, hf_path: str | None = None) -> dict:
    from multirank import run_ranks

    if hf_path is not None:
        return run_ranks(_hf_rank, world, args, cache, hf_path, timeout=3600)[0]
    return run_ranks(_rank, world, args, cache, timeout=3600)[0]  # a fresh process per run, TP=1 too


class _Sampler(torch.nn.Module):
    """One decode step with gpt-fast's sampler inside the graph: the next token, not the logits."""

    def __init__(self, model, k: int):
        super().__init__()
        self.model, self.k = model, k

    def forward(self, ids):
        logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1] / 0.8
        v, _ = torch.topk(logits, self.k)
        probs = torch.softmax(torch.where(logits < v[..., -1:], -float("inf"), logits), -1)
        return torch.argmax(probs / torch.empty_like(probs).exponential_(1), dim=-1)


def _logits_collectives(args, world: int) -> list:
    """(path, collectives on the logits, bytes) per decode token at ``world``: HF generate()'s (the
    returned logits gathered) and the in-graph sampler's (vocab-parallel selection)."""
    import warnings

    import tpcompile

    warnings.simplefilter("ignore")
    model = _model(args)
    ids = torch.zeros(args.batch, 1, dtype=torch.long)
    rows = []
    with torch.no_grad():
        for name, m, kw in (("HF generate(): logits returned", model, {"use_cache": False, "logits_to_keep": 1}),
                            ("gpt-fast sampler in the graph", _Sampler(model, 50), {})):
            rep = tpcompile.explain(m, ids, world_size=world, **kw)
            head = [c for c in rep.collectives if c.kind == "all_gather"]  # the layers' are all-reduces
            layers = [c for c in rep.collectives if c.kind != "all_gather"]
            rows.append((name, len(head), sum(c.nbytes for c in head), len(layers), sum(c.nbytes for c in layers),
                         next(pp.local_shape for f, pp in rep.params.items() if f.endswith("lm_head.weight"))))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--cache", nargs="+", default=["dynamic", "static"])
    ap.add_argument("--backend", default="aot_eager")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--no-hf", action="store_true", help="skip HF's own tp_plan='auto' peer")
    args = ap.parse_args()
    hf_path = None
    if not args.no_hf:
        hf_path = tempfile.mkdtemp(prefix="bench-generate-hf-")
        _model(args).save_pretrained(hf_path)
    rows = []
    for cache in args.cache:
        for world in args.tp:
            if hf_path is not None and world > 1:
                try:
                    pre, steps, (held, logical), coll, same, head = _run(world, args, cache, hf_path)["hf"]
                    kinds = {}
                    for k, n in coll:
                        kinds.setdefault(k, []).append(n)
                    per_tok = ", ".join(f"{len(v)} {k} ({sum(v)} B)" for k, v in sorted(kinds.items()))
                    rows.append((cache, f"HF tp_plan=auto TP={world}", pre, steps, held, logical, None, None,
                                 per_tok, same))
                except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
                    print(f"HF tp_plan='auto' at TP={world}, {cache} cache, did not run: {str(e).splitlines()[-1]}")
            r = _run(world, args, cache)
            if "single" in r:
                pre, steps, (held, logical) = r["single"]
                rows.append((cache, "single device", pre, steps, held, logical, None, None, "", True))
            pre, steps, (held, logical), comp, graphs, coll, same = r["tp"]
            kinds = {}
            for k, n in coll:
                kinds.setdefault(k, []).append(n)
            per_tok = ", ".join(f"{len(v)} {k} ({sum(max(n, 0) for n in v)} B)" for k, v in sorted(kinds.items()))
            rows.append((cache, f"tpcompile TP={world}", pre, steps, held, logical, comp, graphs, per_tok, same))
    print(f"HF Llama {args.layers} layers, dim {args.dim}, {args.heads}/{args.kv_heads} heads, vocab {args.vocab}, "
          f"batch {args.batch}, prompt {args.prompt}, {args.new_tokens} new tokens, backend {args.backend}, CPU gloo")
    print("| cache | run | prefill ms | decode tok/s median (min-max) | KV bytes/rank (of logical) | compile s | "
          "graphs | collectives per decode token | tokens = single |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cache, name, pre, steps, held, logical, comp, graphs, per_tok, same in rows:
        rate = sorted(args.batch / s for s in steps)
        print(f"| {cache} | {name} | {pre * 1e3:.1f} | {statistics.median(rate):.0f} ({rate[0]:.0f}-{rate[-1]:.0f}) | "
              f"{held} ({held / logical:.2f}) | {'' if comp is None else f'{comp:.1f}'} | {graphs or ''} | {per_tok} | "
              f"{same} |")
    print()
    print("collectives on the LM head's logits per decode token (the layers' beside them), tpcompile.explain:")
    print("| TP | path | logits collectives | bytes | layers' collectives | bytes | LM head weight per rank |")
    print("|---|---|---|---|---|---|---|")
    for world in [w for w in args.tp if w > 1]:
        for name, n, nb, nl, lb, head in _logits_collectives(args, world):
            print(f"| {world} | {name} | {n} all-gather | {nb} | {nl} all-reduce | {lb} | {list(head)} |")
    if args.plot:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = [f"{c}\n{n}" for c, n, *_ in rows]
        ax.bar(labels, [statistics.median(args.batch / s for s in r[3]) for r in rows])
        ax.set_ylabel("decode tokens/s (median)")
        ax.tick_params(axis="x", labelsize=7)
        fig.tight_layout()
        fig.savefig(args.plot)


if __name__ == "__main__":
    main()
