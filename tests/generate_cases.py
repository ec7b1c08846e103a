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


def generate_beside(rank: int, world: int, family: str, new_tokens: int = 8, sample: bool = False,
                    cache: str | None = None, backend: str = "aot_eager") -> dict:
    """Greedy (or seeded sampling: each rank seeded differently on purpose, the model must
    agree anyway) ``generate`` of the tp model and of single device."""
    import tpcompile
    from tpcompile.twin import state_bytes

    model = hf_models.make_model(family).eval()
    ref = copy.deepcopy(model)
    ids, mask = _prompt(model.config.vocab_size)
    kw = dict(max_new_tokens=new_tokens, do_sample=sample, pad_token_id=0, attention_mask=mask, use_cache=True,
              return_dict_in_generate=True)
    if sample:
        kw.update(top_k=20, top_p=0.9, temperature=0.8)
    if cache:
        kw["cache_implementation"] = cache
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tp = tpcompile.tp_compile(model, backend=backend)
        counters = torch._dynamo.utils.counters
        counters.clear()
        with torch.no_grad():
            torch.manual_seed(100)
            want = ref.generate(ids, **kw)
            torch.manual_seed(100 + rank)  # a rank seeded apart: generate() must still agree across ranks
            got = tp.generate(ids, **kw)
    st = tpcompile.tp_state(tp)
    held, logical = state_bytes(got.past_key_values)
    return {
        "tokens": got.sequences.tolist(), "ref_tokens": want.sequences.tolist(),
        "n_graphs": len(st.records), "frames": dict(counters["stats"]),
        "decode_collectives": [sorted((c.kind, c.nbytes) for c in r.collectives) for r in st.records],
        "exit": [r.exit_mappings for r in st.records],
        "kv_held": held, "kv_logical": logical,
        "warnings": [str(w.message) for w in caught if issubclass(w.category, tpcompile.TPWarning)],
    }
