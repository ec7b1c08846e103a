"""Acceptance: Hugging Face models, built from configs and called the HF way, train like single device.

``model(input_ids=..., labels=...).loss`` with the loss computed inside the model (shifted labels,
``ignore_index=-100``, fp32 upcast), the whole path rewritten, vocab-parallel CE included. fp32,
3 SGD steps on 2 and 4 gloo ranks: loss within 1e-4 relative at every step, the same loss on
every rank, logits within 1e-5, every gradient equal to its single-device slice (atol 1e-5),
parameters actually sharded (the layouts checked below). Families (tests/hf_models.py):
GPT-2 (Conv1D ``[in, out]`` weights via ``addmm``, fused ``c_attn`` QKV, learned positions,
tied head, vocabulary 250: padded at TP=4), Llama (GQA 8/4 heads, RoPE, SwiGLU), Qwen2
(q/k/v biases, 2 kv heads: fewer than tp at TP=4: kv-head copies).
"""
import functools
import os
from collections import Counter

import pytest
import torch

pytest.importorskip("transformers")

from multirank import per_case, run_ranks  # noqa: E402

import hf_models  # noqa: E402


def _check_parity(results, world):
    for rank, r in enumerate(results):
        assert len(r["loss"]) == 3
        for step, (a, b) in enumerate(zip(r["loss"], r["ref_loss"])):
            assert abs(a - b) <= 1e-4 * abs(b), f"rank {rank} step {step}: tp {a} vs single {b}"
        assert r["loss"] == results[0]["loss"], f"rank {rank} reports another loss than rank 0"
        assert r["grad_err"] <= 1e-5, f"rank {rank}: gradient off by {r['grad_err']}"
        assert r["logits_err"] <= 1e-5, f"rank {rank}: logits off by {r['logits_err']}"
        assert r["n_graphs"] == 1, "the model graph-broke"
        assert r["local_numel"] < 0.75 * r["full_numel"] if world == 2 else r["local_numel"] < 0.5 * r["full_numel"]
    return results[0]["plan"]


FAMILIES = ("gpt2", "llama", "qwen2")
MIXED = ({"dtype": torch.bfloat16}, {"autocast": True})  # Llama at TP=2: bf16 parameters; fp32 under autocast


@functools.cache
def _trained_all(world: int) -> dict:
    """Every training case of this file at one TP degree in one gloo job (one process start and
    one ``transformers`` import for all): the three acceptance families (Inductor for Llama at
    TP=2), at TP=2 the KV cache and activation checkpointing cases, then the ``MORE`` families."""
    cases = [(f, {"backend": "inductor" if (f, world) == ("llama", 2) else "aot_eager"}) for f in FAMILIES]
    names = list(FAMILIES)
    if world == 2:  # HF's default use_cache=True: the forward also builds and returns a KV cache
        cases.append(("llama", {"use_cache": True}))
        names.append("llama-cache")
        for f in ("gpt2", "llama"):  # HF activation checkpointing (torch.utils.checkpoint per layer)
            cases.append((f, {"grad_ckpt": {"use_reentrant": False}}))
            names.append(f"{f}-ckpt")
    if world == 2:  # mixed precision: bf16 parameters, fp32 ones under autocast(bfloat16)
        cases += [("llama", kw) for kw in MIXED]
        names += [f"mixed:{i}" for i in range(len(MIXED))]
    cases += [(f, {"_experts_implementation": impl, "num_hidden_layers": 1, **kw}) for f, impl, kw in MOE[world]]
    names += [f"moe:{i}" for i in range(len(MOE[world]))]
    cases += [(f, {"_experts_implementation": impl}) for f, impl in MOE_FAMILIES[world]]
    names += [f"moefam:{f}" for f, _ in MOE_FAMILIES[world]]
    more = [f for f, tps in MORE.items() if world in tps]
    cases += [(f, {"steps": 2}) for f in more]
    names += [f"more:{f}" for f in more]
    by_rank = run_ranks(hf_models.train_many, world, cases)
    return {f: per_case([r[i] for r in by_rank]) for i, f in enumerate(names)}


@pytest.fixture(scope="module", params=[2, 4], ids=["tp2", "tp4"])
def trained(request):
    """The acceptance families (and, at TP=2, the KV-cache and checkpointing cases) per TP degree."""
    return request.param, {f: r for f, r in _trained_all(request.param).items() if ":" not in f}


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_training_matches_single_device(trained, family):
    world, by_family = trained
    results = by_family[family]
    plan = _check_parity(results, world)
    w = results[0]["warnings"]
    if family == "gpt2":
        # Conv1D weight [in, out]: column-parallel on dim 1, three strided pieces (q, k, v)
        assert plan["transformer.h.0.attn.c_attn.weight"][:3] == ("colwise", 1, 3)
        assert plan["transformer.h.0.attn.c_attn.bias"][:3] == ("colwise", 0, 3)
        assert plan["transformer.h.0.attn.c_proj.weight"][:2] == ("rowwise", 0)
        assert plan["transformer.h.1.mlp.c_fc.weight"][:2] == ("colwise", 1)
        assert plan["transformer.h.1.mlp.c_proj.weight"][:2] == ("rowwise", 0)
        assert plan["transformer.wpe.weight"][0] == "replicate"  # learned positions stay whole
        wte = plan["transformer.wte.weight"]
        assert wte[0] == "vocab"
        if world == 4:  # 250 rows: padded to 252, 63 per rank
            assert wte[3] == (63, 64) and wte[4] == (252, 64)
        else:
            assert wte[3] == (125, 64) and wte[4] is None
        assert w == []
    elif family == "llama":
        for name in ("q_proj", "k_proj", "v_proj"):
            assert plan[f"model.layers.1.self_attn.{name}.weight"][0] == "colwise"
        assert plan["model.layers.1.self_attn.k_proj.weight"][3] == (32 // world, 64)
        assert plan["model.layers.1.mlp.down_proj.weight"][:2] == ("rowwise", 1)
        assert plan["lm_head.weight"][:2] == ("colwise", 0)
        assert w == []
    else:
        assert plan["model.layers.0.self_attn.q_proj.bias"][0] == "colwise"
        kv = "kvcopy" if world == 4 else "colwise"  # 2 kv heads < 4: stored whole, one kv head per rank's program
        for name in ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"):
            assert plan[f"model.layers.0.self_attn.{name}"][0] == kv
        assert plan["model.layers.0.self_attn.o_proj.weight"][:2] == ("rowwise", 1)
        assert plan["model.layers.0.mlp.down_proj.weight"][:2] == ("rowwise", 1)
        assert w == []
        # Megatron's floor (+ at TP=4 one all-reduce per layer of the k / v weights' and biases' gradients),
        # plus one all-gather: the [B, T, V] logits returned
        r = results[0]
        have = Counter(ph for ph, _ in r["collectives"])
        (floor,) = r["floor"]
        assert have == {"forward": floor["forward"] + 1, "backward": floor["backward"]}, (have, floor)
        assert floor["backward"] == 2 * 2 + 1 + (2 if world == 4 else 0), floor


@pytest.mark.parametrize("trained", [2], indirect=True, ids=["tp2"])
def test_hf_kv_cache_built_in_the_forward(trained):
    """``use_cache=True``: the cache starts as ``torch.tensor([])`` and is ``cat``-ed with the
    head-sharded k / v; that keeps them sharded, and the returned cache stays sharded too (state
    ghosts: ``tpcompile.twin.state_ghost``; generation with it: tests/test_generate.py)."""
    world, by_family = trained
    results = by_family["llama-cache"]
    plan = _check_parity(results, world)
    assert plan["model.layers.0.self_attn.k_proj.weight"][0] == "colwise"
    assert results[0]["warnings"] == []


@pytest.mark.parametrize("trained", [2], indirect=True, ids=["tp2"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hf_gradient_checkpointing_is_sharded_and_recomputed(trained, family):
    """``model.gradient_checkpointing_enable()``: each decoder layer runs under
    ``torch.utils.checkpoint``; its insides are sharded as without it, the backward recomputes
    them, and no collective is added."""
    world, by_family = trained
    results, plain = by_family[f"{family}-ckpt"], by_family[family]
    plan = _check_parity(results, world)
    assert plan == plain[0]["plan"]
    assert results[0]["collectives"] == plain[0]["collectives"]
    assert results[0]["recomputed"] > 0 and plain[0]["recomputed"] == 0
    assert results[0]["warnings"] == []


def test_hf_bf16_params_and_autocast():
    """Mixed precision: bf16 parameters, and fp32 parameters under ``torch.autocast(bfloat16)``
    (Llama, TP=2). The loss path runs in fp32 (HF upcasts the logits, the vocab-parallel CE
    accumulates in fp32); the remaining difference is bf16 rounding of the matmuls in another
    order (measured ~3e-5 relative on the loss)."""
    for i, kw in enumerate(MIXED):
        results = _trained_all(2)[f"mixed:{i}"]
        for r in results:
            for a, b in zip(r["loss"], r["ref_loss"]):
                assert abs(a - b) <= 1e-3 * abs(b), (kw, a, b)
            assert r["loss"] == results[0]["loss"]
            assert r["grad_err"] <= 1e-2 and r["logits_err"] <= 2e-2, (kw, r["grad_err"], r["logits_err"])
            assert r["local_numel"] < 0.75 * r["full_numel"]


# More families, TP=2 (TP=4 for the ones whose heads or fused pieces behave differently there).
# Every one matches single device (the same checks as above). Where a construct has no rule the
# model still trains correctly, the parameters behind it stay replicated, and the TPWarnings say
# so; their number is pinned here, and docs/models.md lists what each one is.
MORE = {  # family -> {tp: number of TPWarnings}
    "gpt_neox": {2: 0, 4: 0},  # interleaved fused QKV [heads, 3, head_dim], partial rotary, parallel residual
    "qwen3": {2: 0, 4: 0},  # per-head q/k RMSNorm; 2 kv heads < 4: kv-head copies
    "mistral": {2: 0},
    "granite": {2: 0},
    "stablelm": {2: 0},  # partial rotary, LayerNorm
    "phi": {2: 0},  # parallel attention + MLP, q/k/v biases, partial rotary
    "opt": {2: 0},  # embedding padding_idx (vocab-parallel), learned positions with an offset
    "gemma": {2: 0, 4: 0},  # MQA (1 kv head): kv-head copies; GeGLU; scaled embedding; tied head
    "phi3": {2: 0, 4: 0},  # fused qkv_proj cut by slicing (unequal q/k/v pieces), fused gate_up_proj
    "olmo2": {2: 0},  # q/k RMSNorm over the whole projection: a partial mean (one small all-reduce)
    "falcon": {2: 1},  # MQA through a fused QKV cut by index lists (1 kv head, unequal pieces): attention
    # replicated (and so its out-proj), said once as heads tp does not divide (4 rule-less warnings before)
    "gpt_bigcode": {2: 6},  # MQA fused c_attn after unsqueeze: attention replicated
    "bloom": {2: 8},  # GeLU as a custom autograd.Function, ALiBi: attention and MLP replicated
    # position_ids / token_type_ids buffers: those tables replicated, only the word embedding vocab-parallel.
    # The one warning: the MLM head's dense feeds a LayerNorm over its features, so it stays replicated
    "bert": {2: 1},  # TP=4: plan and collectives in tests/test_attention_spellings.py
    "t5": {2: 0},  # relative position bias column-parallel on its heads: added to head-sharded scores
}
# Regional compilation (the default) plans a block once and warns for each layer what the block leaves
# replicated; the whole graph warns once per op without a rule, naming every layer it touches (and the
# final norm's op too): the same parameters replicated, fewer warnings here
MORE_REGIONAL = {"gpt_bigcode": {2: 4}, "bloom": {2: 6}}


@pytest.fixture(scope="module", params=[2, 4], ids=["tp2", "tp4"])
def trained_more(request):
    return request.param, {f[5:]: r for f, r in _trained_all(request.param).items() if f.startswith("more:")}


def test_more_hf_families_match_single_device(trained_more):
    world, by_family = trained_more
    for family, results in by_family.items():
        for rank, r in enumerate(results):
            for step, (a, b) in enumerate(zip(r["loss"], r["ref_loss"])):
                assert abs(a - b) <= 1e-4 * abs(b), (family, rank, step, a, b)
            assert r["loss"] == results[0]["loss"], family
            assert r["grad_err"] <= 1e-5 and r["logits_err"] <= 1e-5, (family, r["grad_err"], r["logits_err"])
            assert r["n_graphs"] == 1, family
        w = results[0]["warnings"]
        regional = results[0]["regions"] != [{}]
        assert len(w) == (MORE_REGIONAL if regional and family in MORE_REGIONAL else MORE)[family][world], (family, w)
        assert all("correct" in m for m in w), (family, w)
        plan = results[0]["plan"]
        sharded = [f for f, p in plan.items() if p[0] != "replicate"]
        assert any(p[0] == "rowwise" for p in plan.values()) or family == "bloom", (family, plan)
        assert sharded, family
        assert results[0]["local_numel"] < (0.7 if world == 2 else 0.5) * results[0]["full_numel"] or w, family
    if world == 2:
        neox = by_family["gpt_neox"][0]["plan"]
        assert neox["gpt_neox.layers.0.attention.query_key_value.weight"][:3] == ("colwise", 0, 1)  # heads interleaved: plain
        assert by_family["opt"][0]["plan"]["model.decoder.embed_tokens.weight"][0] == "vocab"  # padding_idx kept
        q3 = by_family["qwen3"][0]["plan"]
        assert q3["model.layers.0.self_attn.q_norm.weight"][0] == "replicate"
        assert q3["model.layers.0.self_attn.q_proj.weight"][0] == "colwise"
        phi3 = by_family["phi3"][0]["plan"]  # the slices qkv[..., :q], [..., q:q+k], [..., q+k:] as pieces
        assert phi3["model.layers.0.self_attn.qkv_proj.weight"][:3] == ("colwise", 0, 3)
        assert phi3["model.layers.0.mlp.gate_up_proj.weight"][:3] == ("colwise", 0, 2)
        gemma = by_family["gemma"][0]["plan"]
        assert gemma["model.layers.0.self_attn.k_proj.weight"][0] == "kvcopy"
        assert gemma["model.layers.0.self_attn.q_proj.weight"][0] == "colwise"
        for family in ("bert", "t5"):  # Megatron's floor, plus one all-gather: the [B, T, V] logits returned
            r = by_family[family][0]
            have = Counter(ph for ph, _ in r["collectives"])
            (floor,) = r["floor"]
            assert have == {"forward": floor["forward"] + 1, "backward": floor["backward"]}, (family, have, floor)
        bert = by_family["bert"][0]
        assert bert["plan"]["bert.embeddings.word_embeddings.weight"][0] == "vocab"
        assert bert["plan"]["bert.embeddings.position_embeddings.weight"][0] == "replicate"
        assert bert["plan"]["bert.embeddings.token_type_embeddings.weight"][0] == "replicate"
        assert bert["floor"] == [{"forward": 2 * 2 + 1 + 1, "backward": 2 * 2 + 1}]  # + embedding, loss; + head input
        assert "cls.predictions.transform.dense" in bert["warnings"][0]
        t5 = by_family["t5"][0]
        for stack in ("encoder", "decoder"):
            bias = t5["plan"][f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
            assert bias[:4] == ("colwise", 1, 1, (32, 2)), bias  # [buckets, heads]: this rank's heads
        assert t5["plan"]["shared.weight"][0] == "vocab"
        assert not any(k == "all_gather" for ph, k in t5["collectives"] if ph == "backward")


def test_sharded_outputs_return_logits_as_dtensor_without_gathering():
    """GPT-2 at TP=4 (vocabulary 250: ranks hold 63, 63, 63, 61 columns, DTensor's uneven split):
    the logits are a ``Shard(2)`` DTensor whose ``full_tensor()`` is single device's; the only
    all-gather left is the loss's (3 floats per token row), not the ``[B, T, V]`` logits."""
    results = run_ranks(hf_models.sharded_logits, 4, "gpt2")
    for rank, r in enumerate(results):
        assert r["type"] == "DTensor" and r["placements"] == "(Shard(dim=2),)"
        assert r["shape"] == (2, 16, 250) and r["local"] == (2, 16, 63 if rank < 3 else 61)
        assert r["logits_err"] <= 1e-5 and r["grad_err"] <= 1e-5
        assert abs(r["loss"][0] - r["loss"][1]) <= 1e-5 * r["loss"][1]
        assert r["gathers"] == [2 * 16 * 3 * 4 * 4]  # the CE's (max, sum, target logit) per row, from 4 ranks


# MoE (docs/models.md): experts tensor-parallel in each experts implementation that runs on CPU. "grouped_mm"
# compiles to HF's opaque `transformers::grouped_mm_fallback` op in fp32 and to `F.grouped_mm` in bf16 (its fake
# kernel checks the weight's strides: 3-D ghosts expand one shared NaN matrix, tpcompile.twin._matrix_ghost);
# "batched_mm" is `W[expert_ids]` + `bmm`. One decoder layer each (the collectives are per layer).
MOE = {  # tp -> [(family, experts implementation, other fields)]: each implementation at each tp, one shared expert each
    2: [("mixtral", "grouped_mm", {}), ("mixtral", "batched_mm", {"dtype": torch.bfloat16}), ("qwen2_moe", "grouped_mm", {}),
        ("mixtral", "grouped_mm", {"dtype": torch.bfloat16})],  # bf16: torch's F.grouped_mm on the experts
    4: [("qwen3_moe", "grouped_mm", {}), ("qwen2_moe", "batched_mm", {})],
}


@pytest.mark.parametrize("world", [2, 4], ids=["tp2", "tp4"])
def test_moe_experts_are_tensor_parallel(world):
    """Mixtral, Qwen3-MoE and Qwen2-MoE (a shared expert): every expert's gate|up split on its intermediate
    dim (two pieces), its down projection on the same dim, router replicated; loss, logits and every
    gradient as single device for 3 SGD steps, ranks agree, no warning, 1/tp of each expert tensor per
    rank, and one all-reduce per MoE layer forward (the shared expert's sum joins it), at the floor."""
    trained = _trained_all(world)
    for i, (family, impl, kw) in enumerate(MOE[world]):
        results = trained[f"moe:{i}"]
        bf16 = kw.get("dtype") is torch.bfloat16
        for rank, r in enumerate(results):
            for a, b in zip(r["loss"], r["ref_loss"]):
                assert abs(a - b) <= (1e-3 if bf16 else 1e-5) * abs(b), (family, impl, rank, a, b)
            assert r["loss"] == results[0]["loss"], (family, impl)
            assert r["grad_err"] <= (1e-2 if bf16 else 1e-5) and r["logits_err"] <= (2e-2 if bf16 else 1e-5), \
                (family, impl, r["grad_err"], r["logits_err"])
            assert r["n_graphs"] == 1 and len(r["loss"]) == 3
        r = results[0]
        assert r["warnings"] == [], (family, impl, r["warnings"])
        plan = r["plan"]
        gate_up, down = plan["model.layers.0.mlp.experts.gate_up_proj"], plan["model.layers.0.mlp.experts.down_proj"]
        assert gate_up[:3] == ("expert-colwise", 1, 2) and down[:2] == ("expert-rowwise", 2), (gate_up, down)
        cfg = hf_models.make_config(family)
        E = getattr(cfg, "num_local_experts", None) or cfg.num_experts
        inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
        assert gate_up[3] == (E, 2 * inter // world, cfg.hidden_size) and down[3] == (E, cfg.hidden_size, inter // world)
        assert plan["model.layers.0.mlp.gate.weight"][0] == "replicate"
        if family == "qwen2_moe":  # the shared expert: a plain MLP, column / row like any other
            assert plan["model.layers.0.mlp.shared_expert.gate_proj.weight"][0] == "colwise"
            assert plan["model.layers.0.mlp.shared_expert.down_proj.weight"][0] == "rowwise"
            assert plan["model.layers.0.mlp.shared_expert_gate.weight"][0] == "replicate"
        (why,) = r["floor_why"]
        # one layer: embedding, o_proj, the MoE combine (routed + shared: one), the loss
        assert why["forward"] == {"row-parallel linear": 1, "vocab-parallel embedding": 1, "vocab-parallel loss": 1,
                                  "expert combine": 1}, why
        # q/k/v, the experts' tokens (the shared expert's too: one), the LM head; the routing weights (and the
        # shared expert's sigmoid gate) scale a pending sum: their gradients are summands
        assert why["backward"] == {"column-parallel input": 3,
                                   "scale of a pending sum": 2 if family == "qwen2_moe" else 1}, why
        have = Counter(r["collectives"])
        qk_norm = 2 if family == "qwen3_moe" else 0  # q_norm / k_norm weights on head-sharded q, k (as Qwen3)
        assert have == {("forward", "all_reduce"): 3, ("forward", "all_gather"): 2,
                        ("backward", "all_reduce"): sum(why["backward"].values()) + qk_norm}, (family, impl, have)


# MoE families with more than experts: 2 layers each (DeepSeek-V3's first one dense), one experts implementation per
# tp. The default suite runs them at TP=2 (its time budget); TPCOMPILE_MOE_ALL=1 adds TP=4 (batched_mm; gpt-oss
# there with kv-head copies)
MOE_ALL = bool(os.environ.get("TPCOMPILE_MOE_ALL"))
MOE_FAMILIES = {2: [("deepseek_v3", "grouped_mm"), ("gpt_oss", "grouped_mm")],
                4: [("deepseek_v3", "batched_mm"), ("gpt_oss", "batched_mm")] if MOE_ALL else []}
MOE_WORLDS = [2, 4] if MOE_ALL else [2]


def _moe_family_parity(world: int, family: str) -> tuple[dict, dict]:
    """``_check_parity`` plus every rank's loss within 1e-5 relative and no warning: (plan, rank 0's result)."""
    results = _trained_all(world)[f"moefam:{family}"]
    plan = _check_parity(results, world)
    for r in results:
        assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(r["loss"], r["ref_loss"])), (r["loss"], r["ref_loss"])
    assert results[0]["warnings"] == [], results[0]["warnings"]
    return plan, results[0]


@pytest.mark.parametrize("world", MOE_WORLDS, ids=lambda w: f"tp{w}")
def test_deepseek_v3_mla_and_experts_are_tensor_parallel(world):
    """DeepSeek-V3 (MLA attention, group-limited top-k, a shared expert, the first layer dense): the low-rank
    down-projections ``q_a_proj`` / ``kv_a_proj_with_mqa`` and their norms stay whole (a latent every head
    shares, as Megatron-core keeps them), ``q_b_proj`` / ``kv_b_proj`` column-parallel on the heads, ``o_proj``
    row-parallel; the rotary key ``k_pe`` (one for all heads) is expanded to this rank's heads, its gradient
    all-reduced ("broadcast into a shard"). Experts expert-TP, the shared expert's sum joins the combine's.
    Loss, logits and every gradient as single device for 3 SGD steps, ranks agree, no warning, at the floor."""
    plan, r = _moe_family_parity(world, "deepseek_v3")
    for i in (0, 1):
        attn = f"model.layers.{i}.self_attn"
        for name in ("q_a_proj", "q_a_layernorm", "kv_a_proj_with_mqa", "kv_a_layernorm"):
            assert plan[f"{attn}.{name}.weight"][0] == "replicate", (name, plan[f"{attn}.{name}.weight"])
        assert plan[f"{attn}.q_b_proj.weight"][:4] == ("colwise", 0, 1, (4 * 24 // world, 32))
        assert plan[f"{attn}.kv_b_proj.weight"][:4] == ("colwise", 0, 1, (4 * 32 // world, 32))
        assert plan[f"{attn}.o_proj.weight"][:2] == ("rowwise", 1)
    assert plan["model.layers.0.mlp.gate_proj.weight"][0] == "colwise"  # first_k_dense_replace: a plain MLP
    assert plan["model.layers.0.mlp.down_proj.weight"][0] == "rowwise"
    moe = "model.layers.1.mlp"
    assert plan[f"{moe}.experts.gate_up_proj"][:4] == ("expert-colwise", 1, 2, (4, 2 * 64 // world, 64))
    assert plan[f"{moe}.experts.down_proj"][:4] == ("expert-rowwise", 2, 1, (4, 64, 64 // world))
    assert plan[f"{moe}.gate.weight"][0] == "replicate"  # the router, its weight cast to fp32 in the graph
    assert plan[f"{moe}.shared_experts.up_proj.weight"][0] == "colwise"
    assert plan[f"{moe}.shared_experts.down_proj.weight"][0] == "rowwise"
    (why,) = r["floor_why"]
    assert why["forward"] == {"row-parallel linear": 3, "vocab-parallel embedding": 1, "vocab-parallel loss": 1,
                              "expert combine": 1}, why  # o_proj x 2, the dense MLP; the shared expert joins the combine
    # q / kv latents x 2 layers, the dense MLP, the experts and the shared expert, the LM head; k_pe x 2
    assert why["backward"] == {"column-parallel input": 8, "scale of a pending sum": 1, "broadcast into a shard": 2}, why
    have = Counter(r["collectives"])
    assert have == {("forward", "all_reduce"): 5, ("forward", "all_gather"): 2,  # + the loss's, the returned logits
                    ("backward", "all_reduce"): 11}, have


@pytest.mark.parametrize("world", MOE_WORLDS, ids=lambda w: f"tp{w}")
def test_gpt_oss_interleaved_experts_with_biases_are_tensor_parallel(world):
    """gpt-oss: experts ``[E, H, 2I]`` with gate / up interleaved (``[..., ::2]``, ``[..., 1::2]``): gate_up
    expert-colwise on dim 2 as one plain shard (every rank holds whole (gate, up) pairs), down expert-rowwise
    on dim 1. The expert biases stay whole: the gate|up one is cut to the rank's columns; the down one is added
    after the row projection (``out.add_(bias)``, made out of place), so the pending sum is reduced first and
    the bias added once, not tp times. Attention sinks (replicated, cut to the rank's heads), a sliding-window
    layer beside a full one, q/k/v/o biases; TP=4: 2 kv heads, kv-head copies. Parity as above, no warning."""
    plan, r = _moe_family_parity(world, "gpt_oss")
    for i in (0, 1):
        layer = f"model.layers.{i}"
        assert plan[f"{layer}.self_attn.q_proj.weight"][0] == "colwise"
        assert plan[f"{layer}.self_attn.k_proj.weight"][0] == ("kvcopy" if world == 4 else "colwise")
        assert plan[f"{layer}.self_attn.o_proj.weight"][:2] == ("rowwise", 1)
        assert plan[f"{layer}.self_attn.sinks"][0] == "replicate"
        assert plan[f"{layer}.mlp.experts.gate_up_proj"][:4] == ("expert-colwise", 2, 1, (4, 64, 128 // world))
        assert plan[f"{layer}.mlp.experts.down_proj"][:4] == ("expert-rowwise", 1, 1, (4, 64 // world, 64))
        for name in ("experts.gate_up_proj_bias", "experts.down_proj_bias", "router.weight", "router.bias"):
            assert plan[f"{layer}.mlp.{name}"][0] == "replicate", name
    (why,) = r["floor_why"]
    assert why["forward"] == {"row-parallel linear": 2, "vocab-parallel embedding": 1, "vocab-parallel loss": 1,
                              "expert combine": 2}, why
    have = Counter(r["collectives"])
    kv = 2 if world == 4 else 0
    # backward above the floor by 4 all-gathers: per layer, the sinks' and the gathered gate|up bias rows'
    # gradients (whole values cut to the rank's heads / columns)
    assert have == {("forward", "all_reduce"): 5, ("forward", "all_gather"): 2,
                    ("backward", "all_reduce"): 5 + kv, ("backward", "all_gather"): 4}, have
    assert why["backward"] == {"column-parallel input": 5, **({"kv-copy weight gradient": 2} if kv else {})}, why


def test_explain_mixtral_at_world_size_8_experts_at_the_floor():
    """``explain`` (one process, fake group) of HF Mixtral (1 layer, 8 heads, 8 experts of intermediate 128,
    ``"grouped_mm"``) at world size 8: every expert tensor ``expert-colwise`` / ``expert-rowwise``, the router
    replicated, one all-reduce per MoE layer forward (after the weighted combine), at the floor it states."""
    import tpcompile

    model = hf_models.make_model("mixtral", _experts_implementation="grouped_mm", num_attention_heads=8,
                                 num_key_value_heads=8, num_local_experts=8, num_hidden_layers=1)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    rep = tpcompile.explain(model, input_ids=ids, labels=ids, world_size=8, rank=3)
    for i in range(1):
        assert rep.plan[f"model.layers.{i}.mlp.experts.gate_up_proj"] == "expert-colwise"
        assert rep.plan[f"model.layers.{i}.mlp.experts.down_proj"] == "expert-rowwise"
        assert rep.plan[f"model.layers.{i}.mlp.gate.weight"] == "replicate"
        assert rep.params[f"model.layers.{i}.mlp.experts.down_proj"].local_shape == (8, 64, 128 // 8)
    assert rep.floor["forward"] == {"row-parallel linear": 1, "vocab-parallel embedding": 1, "vocab-parallel loss": 1,
                                    "expert combine": 1}, rep.floor
    fwd = [(c.module, c.nbytes) for c in rep.collectives if c.phase == "forward" and c.kind == "all_reduce"]
    # the MoE sum reduced where the layer's residual add needs it whole: [N, H] after the combine, not [N*k, H]
    assert fwd == [("model.embed_tokens", 8192)] + [(f"model.layers.{i}{m}", 2 * 16 * 64 * 4) for i in range(1)
                                                     for m in (".self_attn.o_proj", "")], fwd
    assert rep.above_floor() == {"forward": 1, "backward": 0}, (rep.above_floor(), str(rep))  # + the returned logits
    assert rep.warnings == [], rep.warnings


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
def test_explain_llama_at_tp2_is_at_the_floor(ckpt):
    """``explain`` (one process, fake group) of HF Llama at TP=2, with and without HF's activation
    checkpointing: one graph, at the floor (plus the all-gather of the returned logits), no warning. Under
    transformers 5.25 the checkpointed layers used to leave the graph (the ``kernels`` context variable's
    side effect inside the checkpoint): ``make test-latest`` runs this against the newest release."""
    import tpcompile

    model = hf_models.make_model("llama")
    if ckpt:
        hf_models.enable_checkpointing(model, {"use_reentrant": False})
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    rep = tpcompile.explain(model, input_ids=ids, labels=ids, world_size=2, rank=1)
    assert len(rep.records) == 1
    assert rep.plan["model.layers.1.self_attn.q_proj.weight"] == "colwise"
    assert rep.plan["model.layers.1.mlp.down_proj.weight"] == "rowwise"
    assert rep.above_floor() == {"forward": 1, "backward": 0}, str(rep)
    assert rep.warnings == [], rep.warnings
