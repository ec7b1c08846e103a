"""Tiny 2-layer Hugging Face models built from configs (random weights, no downloads).

``CONFIGS`` has one entry per family the tests cover; the comment on each says what it
exercises. The first three are the acceptance families: ``gpt2`` (Conv1D ``[in, out]`` weights
via ``torch.addmm``, fused ``c_attn`` QKV, learned positions, tied head, vocabulary 250: not
divisible by 4), ``llama`` (GQA 8/4 heads, RoPE, SwiGLU, RMSNorm) and ``qwen2`` (q/k/v biases,
2 kv heads: fewer than tp at TP=4). Biases and norm weights are perturbed from HF's zeros and
ones so that their gradients are checked for real.
"""
from __future__ import annotations

import torch

_LLAMA_LIKE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   max_position_embeddings=64, tie_word_embeddings=False)

# family -> (transformers config class, model class, config fields)
CONFIGS = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        vocab_size=250, n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_LLAMA_LIKE, num_attention_heads=8, num_key_value_heads=4)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_LLAMA_LIKE, num_attention_heads=4, num_key_value_heads=2)),
    # interleaved fused QKV ([heads, 3, head_dim]), partial rotary, parallel residual, biases
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        _LLAMA_LIKE, num_attention_heads=4, rotary_pct=0.5, use_parallel_residual=True)),
    # fused qkv_proj cut by slicing, fused gate_up_proj cut by chunk
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        _LLAMA_LIKE, num_attention_heads=8, num_key_value_heads=4, pad_token_id=0, eos_token_id=1, bos_token_id=1)),
    # MQA (1 kv head), GeGLU, scaled embedding, tied head
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(
        _LLAMA_LIKE, num_attention_heads=4, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)),
    # MQA through a fused QKV cut by index, parallel attention + MLP
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
        new_decoder_architecture=False, parallel_attn=True, bias=False, max_position_embeddings=64)),
    # per-head q/k RMSNorm (qk-norm) on head-sharded q, k
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        _LLAMA_LIKE, num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_LLAMA_LIKE, num_attention_heads=8, num_key_value_heads=4)),
    # q/k RMSNorm over the whole projection (not per head)
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(_LLAMA_LIKE, num_attention_heads=4, num_key_value_heads=4)),
    # MQA fused c_attn split into unequal pieces (q, k, v = C, hd, hd)
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(
        vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4, multi_query=True, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0)),
    # ALiBi, interleaved fused QKV
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(
        vocab_size=256, hidden_size=64, n_layer=2, n_head=4, attn_implementation="eager")),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(
        vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=64, dropout=0.0)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(
        _LLAMA_LIKE, num_attention_heads=4, num_key_value_heads=4, partial_rotary_factor=0.5)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(
        _LLAMA_LIKE, num_attention_heads=4, num_key_value_heads=4, partial_rotary_factor=0.5, resid_pdrop=0.0,
        embd_pdrop=0.0)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(_LLAMA_LIKE, num_attention_heads=4, num_key_value_heads=2)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        _LLAMA_LIKE, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    # MoE: top-k router, 3-D expert weights (gate_up_proj [E, 2I, H], down_proj [E, H, I]) per experts implementation
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        _LLAMA_LIKE, num_attention_heads=4, num_key_value_heads=4, head_dim=16, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=64, norm_topk_prob=True)),
    # MoE with a shared expert (a plain MLP beside the routed ones, scaled by a sigmoid gate)
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        _LLAMA_LIKE, num_attention_heads=4, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=64, shared_expert_intermediate_size=128)),
    # MLA attention (low-rank q: q_a_proj -> q_a_layernorm -> q_b_proj; kv_a_proj_with_mqa -> compressed kv +
    # decoupled RoPE key k_pe shared by every head -> kv_a_layernorm -> kv_b_proj), group-limited top-k router
    # (sigmoid scores, 2 groups, 1 kept), a shared expert, the first layer dense (first_k_dense_replace=1)
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        _LLAMA_LIKE, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
        n_group=2, topk_group=1, moe_intermediate_size=64, n_shared_experts=1, first_k_dense_replace=1,
        routed_scaling_factor=2.5, rope_interleave=True)),
    # experts [E, H, 2I] with gate / up interleaved ([..., ::2], [..., 1::2]), expert biases, clamped SwiGLU,
    # attention sinks (eager attention), a sliding-window layer beside a full one, q/k/v/o biases
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        _LLAMA_LIKE, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, intermediate_size=64, sliding_window=8, attention_bias=True,
        layer_types=["sliding_attention", "full_attention"], attn_implementation="eager",
        rope_parameters={"rope_type": "default", "rope_theta": 150000.0})),
    # masked LM: positions and token types looked up with buffers (position_ids, token_type_ids), tied decoder
    "bert": ("BertConfig", "BertForMaskedLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
    # encoder-decoder, relative position bias [buckets, heads] added to the attention scores, tied shared embedding
    "t5": ("T5Config", "T5ForConditionalGeneration", dict(
        vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dropout_rate=0.0,
        relative_attention_num_buckets=32, relative_attention_max_distance=64, decoder_start_token_id=0,
        pad_token_id=0)),
}


def make_config(family: str, **overrides):
    import transformers as tf

    cfg_cls, _, fields = CONFIGS[family]
    cfg = getattr(tf, cfg_cls)(**{"attn_implementation": "sdpa", "use_cache": False, **fields})
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def make_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    model = getattr(tf, CONFIGS[family][1])(make_config(family, **overrides))
    with torch.no_grad():  # HF initialises biases to zero and norm weights to one: make them matter
        for n, p in model.named_parameters():
            if n.endswith("bias") or (p.dim() == 1 and "norm" in n):
                p.add_(torch.randn_like(p) * 0.1)
    return model.train()


def enable_checkpointing(model, kwargs: dict) -> None:
    """HF's activation checkpointing, under the name the installed transformers gives it
    (``activation_checkpointing_enable`` from 5.25 on, ``gradient_checkpointing_enable`` before)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def train_hf_beside_reference(rank: int, world: int, family: str, steps: int = 3, lr: float = 0.1,
                              backend: str = "aot_eager", batch: tuple = (2, 16), dtype=None,
                              autocast: bool = False, grad_ckpt: dict | None = None, regional: bool | None = None,
                              sequence_parallel: bool = False, **overrides) -> dict:
    """SGD steps of a tp-compiled HF model and its single-device copy (``models_common.train_beside``),
    called the HF way: ``model(input_ids=..., labels=...)``, two ignored positions per row.

    Adds the logits error, the plan's local and padded shapes, and how many forward ops the
    backward recomputes (activation checkpointing); collectives as ``(phase, kind)``."""
    from models_common import called_nodes, train_beside

    import tpcompile

    model = make_model(family, **overrides)
    if grad_ckpt is not None:  # HF's activation checkpointing: torch.utils.checkpoint around each layer
        enable_checkpointing(model, grad_ckpt)
    if dtype is not None:
        model = model.to(dtype)
    g = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, batch, generator=g)
        labels = ids.clone()
        labels[:, :2] = -100  # ignored positions, as padding in a real batch
        batches.append((ids, labels))

    def report(tp, ref, out):
        st = tpcompile.tp_state(tp)
        out["plan"] = {fqn: (pp.style, pp.dim, pp.chunks, pp.local_shape, pp.padded_shape) for fqn, pp in st.plan.items()}
        out["collectives"] = [(phase, kind) for _, phase, kind in out["collectives"]]
        out["floor_why"] = [r.floor for r in st.records]
        out["regions"] = [r.regions for r in st.records]  # subgraph -> block prefix per call (regional compilation)
        bw = [n for r in st.records for ph, g in r.compiled_graphs if ph == "backward" for n in called_nodes(g)]
        out["recomputed"] = sum(n.meta.get("recompute") == torch.utils.checkpoint.CheckpointPolicy.PREFER_RECOMPUTE
                                for n in bw if n.op == "call_function")

    return train_beside(rank, world, model, batches, lambda m, b: m(input_ids=b[0], labels=b[1]), lr=lr,
                        autocast=autocast, report=report, backend=backend, regional=regional,
                        sequence_parallel=sequence_parallel)


def train_many(rank: int, world: int, cases: list) -> list:
    """``train_hf_beside_reference`` for each ``(family, kwargs)`` in ``cases``, in one gloo job
    (one process start and one ``transformers`` import per rank for all of them)."""
    import torch._dynamo

    from multirank import isolated

    out = []
    for family, kw in cases:  # a case that raises is reported by its own test (multirank.per_case)
        out.append(isolated(train_hf_beside_reference, rank, world, family, **kw))
        torch._dynamo.reset()
    return out


def sharded_logits(rank: int, world: int, family: str) -> dict:
    """``tp_compile(sharded_outputs=True)``: the HF output's ``logits`` come back as a DTensor
    (no gather of ``[B, T, V]``); loss and gradients as single device's."""
    import copy

    import tpcompile
    from parity import grad_errors

    model = make_model(family)
    ref = copy.deepcopy(model)
    tp = tpcompile.tp_compile(model, backend="aot_eager", sharded_outputs=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    res, ref_res = tp(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    res.loss.backward()
    ref_res.loss.backward()
    st = tpcompile.tp_state(tp)
    logits = res.logits
    return {
        "type": type(logits).__name__,
        "placements": str(logits.placements),
        "shape": tuple(logits.shape),
        "local": tuple(logits.to_local().shape),
        "logits_err": (logits.full_tensor() - ref_res.logits).abs().max().item(),
        "loss": (res.loss.item(), ref_res.loss.item()),
        "grad_err": max(grad_errors(tp, ref, rank).values()),
        "gathers": [c.nbytes for c in st.records[0].collectives if c.kind == "all_gather"],
    }
