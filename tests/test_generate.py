"""Acceptance: ``generate()`` of tp-compiled Hugging Face models, called as HF users call it.

Tiny configs of Llama (GQA 8/4), GPT-2 (fused c_attn, tied vocab-parallel head), Qwen2 (2 kv heads:
fewer than tp at TP=4) and Gemma (MQA: 1 kv head), ``model.eval()``, a batch of 2 left-padded
prompts with an attention mask, the default dynamic cache, on 2 and 4 gloo ranks (one spawned group
per degree for every case). Greedy tokens equal single device's on every rank. The KV cache the
model hands back to HF stays head-sharded between graphs (``tpcompile.twin.state_ghost``): each
rank holds 1/tp of it where tp divides the kv heads, all of it where k / v stay replicated (kv
heads < tp, until kv-head copies exist), and it is never gathered at a graph's end. Decode with the
dynamic cache compiles 3 graphs in all: the prompt, the first decode step (static shapes), and one
graph with a symbolic cache length for every later step. Sampling: ranks seeded apart on purpose,
``generate`` starts them from rank 0's RNG state, so all ranks draw the same tokens.
"""
import functools

import pytest

pytest.importorskip("transformers")

import generate_cases as G  # noqa: E402
from multirank import run_cases  # noqa: E402

FAMILIES = ("llama", "gpt2", "qwen2", "gemma")
KV_HEADS = {"llama": 4, "gpt2": 4, "qwen2": 2, "gemma": 1}
LAYERS = 2


@functools.cache
def _gloo(world: int) -> dict:
    cases = {f: (G.generate_beside, (f,)) for f in FAMILIES}
    cases["llama-sample"] = (G.generate_beside, ("llama", 8, True))
    return dict(zip(cases, run_cases(world, list(cases.values()))))


def _same_tokens(results):
    for rank, r in enumerate(results):
        assert r["tokens"] == results[0]["tokens"], f"rank {rank} generated other tokens than rank 0"
    return results[0]


@pytest.mark.parametrize("world", [2, 4], ids=["tp2", "tp4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_matches_single_device(world, family):
    r = _same_tokens(_gloo(world)[family])
    assert r["tokens"] == r["ref_tokens"]
    assert r["n_graphs"] == 3, r["n_graphs"]  # prompt, first decode step, one dynamic decode graph
    sharded = KV_HEADS[family] % world == 0
    assert r["kv_held"] * (world if sharded else 1) == r["kv_logical"], (r["kv_held"], r["kv_logical"])
    for graph in r["decode_collectives"][1:]:  # per decode step: no k / v gathered
        kinds = [k for k, _ in graph]
        assert kinds.count("all_reduce") == 2 * LAYERS + 1, graph  # attention + MLP per layer, the embedding
        assert kinds.count("all_gather") <= 1, graph  # at most the last position's logits
    for exit_maps in r["exit"]:
        assert len(exit_maps) <= 1, exit_maps
    if sharded:
        assert r["warnings"] == [], r["warnings"]
    else:
        assert r["warnings"] and all("grouped-query attention" in w for w in r["warnings"]), r["warnings"]


@pytest.mark.parametrize("world", [2, 4], ids=["tp2", "tp4"])
def test_sampling_agrees_across_ranks(world):
    """``do_sample=True`` with temperature, top-k and top-p, every rank seeded differently: the
    same tokens on every rank, and (rank 0 seeded as single device) single device's tokens."""
    r = _same_tokens(_gloo(world)["llama-sample"])
    assert r["tokens"] == r["ref_tokens"]
    assert r["n_graphs"] == 3
