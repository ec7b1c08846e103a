"""Vocab-parallel selection on gloo ranks beside single device (tests/test_vocab_sampling.py).

``SelectHead``: an untied LM head followed by every selection op over the vocabulary (argmax, max,
top-k, softmax, log_softmax, logsumexp), on integer-valued weights and inputs so that logits tie
exactly. ``SamplingLM``: the hand-written static-cache model of ``generate_cases`` whose forward ends
in gpt-fast's decode step (temperature, top-k mask, softmax, ``multinomial_sample_one_no_sync``:
``argmax(probs / exponential noise)``), compiled as one graph with the LM head vocab-sharded.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F

from generate_cases import HandWrittenLM

TOP_K = 5


class SelectHead(torch.nn.Module):
    def __init__(self, dim: int = 16, vocab: int = 101, k: int = 7):
        super().__init__()
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.k = k
        with torch.no_grad():  # small integers: exact logits, many of them equal
            self.head.weight.copy_(torch.randint(-1, 2, self.head.weight.shape, generator=torch.Generator().manual_seed(1)))

    def forward(self, x):
        logits = self.head(x)
        v, i = torch.topk(logits, self.k)
        m, mi = logits.max(-1)
        return {"argmax": torch.argmax(logits, dim=-1), "argmax_keep": logits.argmax(-1, keepdim=True),
                "max": m, "max_index": mi, "topk_values": v, "topk_index": i,
                "softmax": F.softmax(logits.float() / 3, dim=-1), "log_softmax": torch.log_softmax(logits / 3, -1),
                "logsumexp": torch.logsumexp(logits, -1), "full": logits}


def select_inputs(dim: int = 16):
    x = torch.randint(-1, 2, (3, 4, dim), generator=torch.Generator().manual_seed(2)).float()
    x[0, 0] = 0  # one row of all-zero logits: every entry ties
    return x


def select_beside(rank: int, world: int) -> dict:
    """Every selection op of ``SelectHead`` at TP beside single device (no_grad, aot_eager)."""
    import tpcompile

    torch.manual_seed(0)
    model = SelectHead().eval()
    ref = copy.deepcopy(model)
    x = select_inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tp = tpcompile.tp_compile(model, backend="aot_eager")
        with torch.no_grad():
            want, got = ref(x), tp(x)
    st = tpcompile.tp_state(tp)
    return {"want": want, "got": got, "head": st.plan["head.weight"],
            "local_head": tuple(tp.head.weight.to_local().shape) if hasattr(tp.head.weight, "to_local") else None,
            "collectives": [(c.kind, c.nbytes) for r in st.records for c in r.collectives],
            "warnings": [str(w.message) for w in caught if issubclass(w.category, tpcompile.TPWarning)]}


def multinomial_sample_one_no_sync(probs):
    """gpt-fast's sampler: an exponential race, no device-host sync."""
    q = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / q, dim=-1, keepdim=True).to(dtype=torch.int)


def logits_to_probs(logits, temperature: float = 1.0, top_k: int | None = None):
    logits = logits / max(temperature, 1e-5)
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        pivot = v.select(-1, -1).unsqueeze(-1)
        logits = torch.where(logits < pivot, -float("Inf"), logits)
    return F.softmax(logits, dim=-1)


class SamplingLM(HandWrittenLM):
    """The gpt-fast decode step in one graph: the model, then the next token (sampled) and the greedy one."""

    def forward(self, idx, pos, mask):
        logits = super().forward(idx, pos, mask)[:, -1]
        probs = logits_to_probs(logits, 0.8, TOP_K)
        return multinomial_sample_one_no_sync(probs)[:, 0], logits.argmax(-1)


def sample_loop(model, prompt, new_tokens: int, seed: int = 11) -> tuple[list, list]:
    """Prefill, then one sampled token per call (the greedy choice recorded beside it)."""
    torch.manual_seed(seed)
    T, L = prompt.shape[1], model.max_len
    pos = torch.arange(T)
    tok, greedy = model(prompt, pos, torch.arange(L)[None, :] <= pos[:, None])
    toks, greedies = [tok.tolist()], [greedy.tolist()]
    for t in range(T, T + new_tokens - 1):
        tok, greedy = model(tok[:, None].long(), torch.tensor([t]), torch.arange(L)[None, :] <= t)
        toks.append(tok.tolist())
        greedies.append(greedy.tolist())
    return toks, greedies


def sampling_beside(rank: int, world: int, vocab: int = 127, new_tokens: int = 8) -> dict:
    """The gpt-fast sampling loop at TP beside single device, same seed: tokens, collectives, head shard."""
    import tpcompile

    torch.manual_seed(0)
    model = SamplingLM(vocab=vocab).eval()
    ref = copy.deepcopy(model)
    prompt = torch.randint(0, vocab, (2, 5), generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tp = tpcompile.tp_compile(model, backend="aot_eager")
        with torch.no_grad():
            want = sample_loop(ref, prompt, new_tokens)
            got = sample_loop(tp, prompt, new_tokens)
    st = tpcompile.tp_state(tp)
    w = tp.head.weight
    return {"tokens": got, "ref_tokens": want, "head": st.plan["head.weight"].style,
            "head_local": tuple((w.to_local() if hasattr(w, "to_local") else w).shape),
            "n_graphs": len(st.records),
            "collectives": [sorted((c.kind, c.nbytes) for c in r.collectives) for r in st.records],
            "floor": [r.floor for r in st.records],
            "warnings": [str(w.message) for w in caught if issubclass(w.category, tpcompile.TPWarning)]}
