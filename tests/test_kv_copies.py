"""kv-head copies: grouped-query attention with fewer kv heads than tp (issue 14, item 2b).

Megatron / vLLM keep the queries sharded and give each rank the kv head its query heads use.
tpcompile stores those k / v weights (or the fused ``[q | k | v]``) replicated, so every user view
is the plain ``Replicate`` one, and the program takes its kv head's rows in the graph (``take_rows``:
Megatron's f, then a narrow; the gradients of one attention's k / v weights and biases are all-reduced
together in the backward, one collective). On gloo, for the
spellings users write (HF's ``repeat_kv`` with attention written out, SDPA ``enable_gqa``,
``repeat_interleave``, a fused ``[q | k | v]`` cut by ``split``), MQA (one kv head) included: loss,
every gradient and ``clip_grad_norm_``'s norm over AdamW steps equal single device; the queries and
the MLP are sharded, the residual stream whole; the collectives exactly at the floor ``explain`` states.

The default suite runs two cases at TP=4 (HF's spelling with two ranks per kv head, a fused MQA
projection); ``TPCOMPILE_KV_SWEEP=1`` runs every spelling at TP=2 and TP=4 with 2 layers. The
Hugging Face families with kv heads < tp (Qwen2 / Qwen3 at TP=4, Gemma's MQA) are in test_hf_models.py,
litgpt's fused qkv in test_models.py, the state-dict / checkpoint round trip in test_checkpoint.py.
"""
import os
from collections import Counter

import pytest

import kv_models
from multirank import run_cases



def _check(world, spelling, kv, layers, results):
    for rank, r in enumerate(results):
        for step, (a, b) in enumerate(zip(r["loss"], r["ref_loss"])):
            assert abs(a - b) <= 1e-5 * abs(b), (spelling, rank, step, a, b)
        for a, b in zip(r["norm"], r["ref_norm"]):
            assert abs(a - b) <= 1e-5 * b and b > 0.5, (spelling, rank, a, b)  # the global norm, and it clipped
        assert r["loss"] == results[0]["loss"], (spelling, rank)
        assert r["grad_err"] <= 1e-5, (spelling, rank, r["grad_err"])
        # the replicated kv-copy weights stay one model after the AdamW steps: bitwise equal on every rank
        # (the losses above, computed with the stepped parameters, compare them with single device)
        for f, t in r["kv_params"].items():
            assert t == results[0]["kv_params"][f], (spelling, rank, f)
        assert r["kv_params"], spelling
        assert r["warnings"] == [], r["warnings"]
        m, hd = world // kv, kv_models.D // kv_models.HEADS
        head = rank // m  # the kv head of this rank's query heads
        for i in range(layers):
            pre = f"blocks.{i}."
            if spelling == "fused":
                q = kv_models.D
                assert r["plan"][pre + "attn.qkv.weight"][0] == "kvcopy"
                assert r["rows"][pre + "attn.qkv.weight"] == [
                    (rank * q // world, q // world), (q + head * hd, hd), (q + kv * hd + head * hd, hd)]
            else:
                assert r["plan"][pre + "attn.q.weight"][:2] == ("colwise", 0)
                for name in ("k", "v"):
                    assert r["plan"][pre + f"attn.{name}.weight"][0] == "kvcopy"
                    assert r["rows"][pre + f"attn.{name}.weight"] == [(head * hd, hd)]
            assert r["plan"][pre + "attn.o.weight"][:2] == ("rowwise", 1)
            assert r["plan"][pre + "up.weight"][:2] == ("colwise", 0)
            assert r["plan"][pre + "down.weight"][:2] == ("rowwise", 1)
            assert r["plan"][pre + "n1.weight"][0] == "replicate"
        assert r["plan"]["emb.weight"][0] == "vocab" and r["plan"]["head.weight"][:2] == ("colwise", 0)
    r = results[0]
    (floor,) = r["floor"]
    have = Counter(ph for ph, _ in r["collectives"])
    # Megatron's floor (per layer 2 row-parallel, 2 column inputs; the embedding, the loss, the head's
    # input) plus one backward all-reduce per attention for the weights kv copies are taken from (k and v
    # weights and biases together, or the fused qkv)
    copied = layers
    assert floor == {"forward": {"row-parallel linear": 2 * layers, "vocab-parallel embedding": 1,
                                 "vocab-parallel loss": 1},
                     "backward": {"column-parallel input": 2 * layers + 1, "kv-copy weight gradient": copied}}, floor
    assert have == {"forward": 2 * layers + 2, "backward": 2 * layers + 1 + copied}, (spelling, have)


def _run(world, cases, layers):
    results = run_cases(world, [(kv_models.train, (kv, s, layers)) for s, kv in cases])
    for (s, kv), res in zip(cases, results):
        _check(world, s, kv, layers, res)


def test_kv_copies_train_like_single_device():
    """TP=4: HF's repeat_kv (2 kv heads, two ranks share each) and a fused [q | k | v] with one kv head."""
    _run(4, [("repeat_kv", 2), ("fused", 1)], layers=1)


if os.environ.get("TPCOMPILE_KV_SWEEP"):
    @pytest.mark.parametrize("world", [2, 4])
    def test_kv_copies_every_spelling(world):
        kvs = (1,) if world == 2 else (1, 2)
        _run(world, [(s, kv) for s in kv_models.SPELLINGS for kv in kvs], layers=2)
