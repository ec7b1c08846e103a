"""litgpt's GPT (Lightning AI), built from a Llama-style ``Config`` with random weights, trained with no plan.

litgpt 0.5 fuses q, k and v into one ``qkv`` Linear cut by ``split((q, k, v), dim=-1)``: unequal
pieces under grouped-query attention. ``import litgpt`` imports Lightning, which replaces
``torch.compile`` with a wrapper that deep-copies its keyword arguments (tpcompile's backend among
them): these cases run under it.
"""
from __future__ import annotations

import torch

from models_common import assert_at_floor, assert_parity, train_beside

N_HEAD = 8


def _config(n_query_groups: int):
    from litgpt import Config

    return Config(block_size=32, vocab_size=128, padded_vocab_size=128, n_layer=2, n_embd=64, n_head=N_HEAD,
                  n_query_groups=n_query_groups, rotary_percentage=1.0, parallel_residual=False, bias=False,
                  norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=128)


def groups_for(name: str, world: int) -> int:
    """kv groups of a case at ``world``: "mha" one per head; "kv_below_tp" fewer than tp (1 at TP=2, 2 at TP=4)."""
    return N_HEAD if name == "mha" else max(1, world // 2)


def _loss(model, batch):
    idx, targets = batch
    logits = model(idx)
    return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def run(rank: int, world: int, name: str) -> dict:
    import litgpt

    torch.manual_seed(0)
    model = litgpt.GPT(_config(groups_for(name, world)))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 128, (2, 16), generator=g), torch.randint(0, 128, (2, 16), generator=g))
               for _ in range(3)]
    out = train_beside(rank, world, model, batches, _loss)
    out["compile_wrapped"] = hasattr(torch.compile, "__wrapped__")  # Lightning's wrapper is in place
    return out


CASES = {name: (run, (name,)) for name in ("mha", "kv_below_tp")}


def check(name: str, world: int, results: list) -> None:
    r = assert_parity(results)  # correct in every case, kv heads < tp included
    assert r["compile_wrapped"], "Lightning's torch.compile wrapper was not in place"
    assert r["n_graphs"] == 1, r["n_graphs"]
    plan = r["plan"]
    # the loss is outside the model: its logits leave it, so the head stays whole, said once with its cost
    (w,) = r["warnings"]
    assert w.startswith("tpcompile: the LM head stays replicated") and "lm_head ([128, 64]" in w, w
    for i in range(2):
        pre = f"transformer.h.{i}."
        assert plan[pre + "mlp.fc_1.weight"][:2] == plan[pre + "mlp.fc_2.weight"][:2] == ("colwise", 0)
        assert plan[pre + "mlp.proj.weight"][:2] == ("rowwise", 1)
        assert plan[pre + "attn.proj.weight"][:2] == ("rowwise", 1)
        if name == "kv_below_tp":  # kv-head copies: stored whole, each rank's program takes its q rows and kv head
            assert plan[pre + "attn.qkv.weight"][0] == "kvcopy"
        else:
            assert plan[pre + "attn.qkv.weight"][:3] == ("colwise", 0, 3)  # q | k | v pieces, queries sharded
        assert plan[pre + "norm_1.weight"][0] == "replicate"
    assert plan["transformer.wte.weight"][0] == "vocab"
    assert plan["lm_head.weight"][0] == "replicate"  # the loss is outside the model: its logits leave it whole
    assert_at_floor(r)
    assert r["local_numel"] < (0.75 if name == "kv_below_tp" else 0.6) * r["full_numel"]
