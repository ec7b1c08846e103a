"""Generation on gloo ranks beside the untouched single-device model (tests/test_generate.py).

Each case builds a tiny HF model (``hf_models``), deep-copies it, ``tp_compile``s one copy and
calls ``generate`` on both the way HF users do; it returns the tokens, the graphs compiled, the
collectives per decode graph, and what the KV cache holds on this rank.
"""
from __future__ import annotations

import copy
import warnings

import torch

import hf_models


def _prompt(vocab: int, batch: int = 2, length: int = 6, pad: int = 0):
    """Left-padded prompts: row 0 full, the others shorter (pad on the left, masked out)."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(1, batch):
        ids[b, : 2 * b] = pad
        mask[b, : 2 * b] = 0
    return ids, mask


def generate_beside(rank: int, world: int, family: str, cache: str | None = None, new_tokens: int = 8,
                    backend: str = "aot_eager", sp: bool = False, **overrides) -> dict:
    """Greedy, then seeded sampling (temperature, top-k, top-p; each rank seeded differently on
    purpose: the model must agree anyway), ``generate`` of the tp model and of single device.
    Sampling reuses the greedy run's graphs (same shapes): the graph count covers both.
    ``overrides``: config fields (a MoE model's ``_experts_implementation``)."""
    import tpcompile
    from tpcompile.twin import state_bytes

    model = hf_models.make_model(family, **overrides).eval()
    ref = copy.deepcopy(model)
    ids, mask = _prompt(model.config.vocab_size)
    kw = dict(max_new_tokens=new_tokens, pad_token_id=0, attention_mask=mask, use_cache=True,
              return_dict_in_generate=True)
    if cache:
        kw["cache_implementation"] = cache
    sample = dict(do_sample=True, top_k=20, top_p=0.9, temperature=0.8)
    out = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tp = tpcompile.tp_compile(model, backend=backend, sequence_parallel=sp)
        counters = torch._dynamo.utils.counters
        counters.clear()
        with torch.no_grad():
            want = ref.generate(ids, do_sample=False, **kw)
            got = tp.generate(ids, do_sample=False, **kw)
            out["tokens"], out["ref_tokens"] = got.sequences.tolist(), want.sequences.tolist()
            out["kv_held"], out["kv_logical"] = state_bytes(got.past_key_values)
            torch.manual_seed(100)
            want = ref.generate(ids, **sample, **kw)
            torch.manual_seed(100 + rank)  # a rank seeded apart: generate() must still agree across ranks
            got = tp.generate(ids, **sample, **kw)
            out["sampled"], out["ref_sampled"] = got.sequences.tolist(), want.sequences.tolist()
    st = tpcompile.tp_state(tp)
    report = tpcompile.explain(tp, graph=-1)  # the last decode graph, as a user would ask after generate()
    head = next(f for f in ("lm_head.weight", "transformer.wte.weight", "model.embed_tokens.weight") if f in st.plan)
    out.update({
        "vocab": model.config.vocab_size, "returned_bytes": report.records[0].returned_bytes, "explain": str(report), "above_floor": report.above_floor(), "head": (head, st.plan[head].style,
                                                                              st.plan[head].local_shape),
        "n_graphs": len(st.records), "frames": dict(counters["stats"]),
        "collectives": [sorted((c.kind, c.nbytes) for c in r.collectives) for r in st.records],
        "exit": [r.exit_mappings for r in st.records],
        "warnings": [str(w.message) for w in caught if issubclass(w.category, tpcompile.TPWarning)],
        "styles": {f: pp.style for f, pp in st.plan.items()},
    })
    return out


class _CachedAttention(torch.nn.Module):
    """gpt-fast style: a static KV cache as module buffers, written in place each step
    (``index_copy_`` or ``cache[:, :, pos] = k``), attention over the whole cache with a mask."""

    def __init__(self, dim: int, heads: int, max_len: int, batch: int, write: str):
        super().__init__()
        self.heads, self.write = heads, write
        self.wq, self.wk, self.wv, self.wo = (torch.nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.norm = torch.nn.RMSNorm(dim)
        hd = dim // heads
        self.register_buffer("k_cache", torch.zeros(batch, heads, max_len, hd), persistent=False)
        self.register_buffer("v_cache", torch.zeros(batch, heads, max_len, hd), persistent=False)

    def forward(self, x, pos, mask):
        B, T, C = x.shape
        h = self.norm(x)
        q, k, v = (w(h).view(B, T, self.heads, C // self.heads).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        if self.write == "index_copy":
            self.k_cache.index_copy_(2, pos, k)
            self.v_cache.index_copy_(2, pos, v)
        else:
            self.k_cache[:, :, pos] = k
            self.v_cache[:, :, pos] = v
        y = torch.nn.functional.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask)
        return x + self.wo(y.transpose(1, 2).reshape(B, T, C))


class HandWrittenLM(torch.nn.Module):
    def __init__(self, vocab: int = 128, dim: int = 32, heads: int = 4, max_len: int = 16, batch: int = 2):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList(_CachedAttention(dim, heads, max_len, batch, w) for w in ("index_copy", "setitem"))
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.max_len = max_len

    def forward(self, idx, pos, mask):
        x = self.embed(idx)
        for b in self.blocks:
            x = b(x, pos, mask)
        return self.head(x)


def _decode_loop(model, prompt, new_tokens: int) -> list:
    """Prefill, then one token per call at its position (greedy): the gpt-fast loop."""
    T, L = prompt.shape[1], model.max_len
    pos = torch.arange(T)
    mask = torch.arange(L)[None, :] <= pos[:, None]
    logits = model(prompt, pos, mask)
    out = prompt.tolist()
    tok = logits[:, -1].argmax(-1)
    for t in range(T, T + new_tokens):
        for b in range(len(out)):
            out[b].append(int(tok[b]))
        pos = torch.tensor([t])
        logits = model(tok[:, None], pos, torch.arange(L)[None, :] <= t)
        tok = logits[:, -1].argmax(-1)
    return out


def hand_written_loop(rank: int, world: int, new_tokens: int = 8) -> dict:
    """The gpt-fast loop on a tp-compiled model beside single device: tokens, graphs, cache bytes."""
    import tpcompile
    from tpcompile.twin import state_bytes

    torch.manual_seed(0)
    model = HandWrittenLM().eval()
    ref = copy.deepcopy(model)
    prompt = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tp = tpcompile.tp_compile(model, backend="aot_eager")
        counters = torch._dynamo.utils.counters
        counters.clear()
        with torch.no_grad():
            want = _decode_loop(ref, prompt, new_tokens)
            got = _decode_loop(tp, prompt, new_tokens)
    st = tpcompile.tp_state(tp)
    caches = [t for b in model.blocks for t in (b.k_cache, b.v_cache)]
    held, logical = state_bytes(caches)
    return {"tokens": got, "ref_tokens": want, "n_graphs": len(st.records), "frames": dict(counters["stats"]),
            "kv_held": held, "kv_logical": logical,
            "styles": {f: p.style for f, p in st.plan.items()},
            "collectives": [sorted(c.kind for c in r.collectives) for r in st.records],
            "warnings": [str(w.message) for w in caught if issubclass(w.category, tpcompile.TPWarning)]}


def from_pretrained_generate(rank: int, world: int, path: str, new_tokens: int = 8) -> dict:
    """``tpcompile.from_pretrained`` on a ``save_pretrained`` directory (several shard files),
    then greedy ``generate``, beside the original model loaded whole by transformers."""
    import transformers as tf

    import tpcompile
    from parity import local_numel

    ref = tf.AutoModelForCausalLM.from_pretrained(path).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tp = tpcompile.from_pretrained(path, backend="aot_eager")
        ids, mask = _prompt(ref.config.vocab_size)
        kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, attention_mask=mask)
        with torch.no_grad():
            want, got = ref.generate(ids, **kw), tp.generate(ids, **kw)
    return {"tokens": got.tolist(), "ref_tokens": want.tolist(), "training": tp.training,
            "warnings": [str(w.message) for w in caught if issubclass(w.category, tpcompile.TPWarning)],
            "numel": local_numel(tp), "full_numel": sum(p.numel() for p in ref.parameters())}


def _nccl_entry(rank: int, world: int, store_path: str, queue) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        queue.put((rank, cuda_graph_loop(rank, world)))
    finally:
        dist.destroy_process_group()


def cuda_graph_loop(rank: int, world: int, new_tokens: int = 8) -> dict:
    """The gpt-fast loop on CUDA under ``tp_compile(mode="reduce-overhead")`` (Inductor's CUDA
    graphs): tokens against single device, and Inductor's count of graphs it would not capture."""
    import tpcompile

    torch.manual_seed(0)
    model = HandWrittenLM().eval().cuda()
    ref = copy.deepcopy(model)
    prompt = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(3)).cuda()
    counters = torch._dynamo.utils.counters
    counters.clear()
    tp = tpcompile.tp_compile(model, mode="reduce-overhead")
    with torch.no_grad():
        want = _decode_loop_on(ref, prompt, new_tokens)
        got = _decode_loop_on(tp, prompt, new_tokens)
    return {"tokens": got, "ref_tokens": want, "skips": counters["inductor"]["cudagraph_skips"],
            "n_graphs": len(tpcompile.tp_state(tp).records)}


def _decode_loop_on(model, prompt, new_tokens: int) -> list:
    """``_decode_loop`` with its position / mask tensors on the prompt's device."""
    dev, T, L = prompt.device, prompt.shape[1], model.max_len
    pos = torch.arange(T, device=dev)
    logits = model(prompt, pos, torch.arange(L, device=dev)[None, :] <= pos[:, None])
    out, tok = prompt.tolist(), logits[:, -1].argmax(-1)
    for t in range(T, T + new_tokens):
        for b in range(len(out)):
            out[b].append(int(tok[b]))
        logits = model(tok[:, None], torch.tensor([t], device=dev), torch.arange(L, device=dev)[None, :] <= t)
        tok = logits[:, -1].argmax(-1)
    return out
