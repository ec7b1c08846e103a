"""The communication floor, counted on the graphs Inductor compiled (DESIGN.md).

Per layer, TP without SP: forward 2 all-reduces (attention out-proj, MLP down-proj),
backward 2 (the f before the column projections). Plus the vocab-parallel embedding's
forward all-reduce, the LM head input's backward all-reduce, and the loss's single
all-gather in the forward (its backward needs none).
"""
from collections import Counter

import pytest
import torch

import gpt
import llama
import tpcompile
from fakepg import fake_group


@pytest.mark.parametrize("make, layers_kw", [(gpt.make_model, "n_layer"), (llama.make_model, "n_layers")])
def test_collectives_on_inductor_graphs_hit_the_floor(make, layers_kw):
    L = 3
    before = sum(torch._dynamo.utils.counters["inductor"].values())
    with fake_group(world_size=4, rank=1):
        model, args = make(**{layers_kw: L})
        model = tpcompile.tp_compile(model)
        model(*args).backward()
        (record,) = tpcompile.tp_state(model).records
    phases = Counter(phase for phase, _ in record.compiled_graphs)
    assert phases == {"forward": 1, "backward": 1}
    counts = Counter((c.phase, c.kind) for c in record.collectives)
    assert counts == {
        ("forward", "all_reduce"): 2 * L + 1,
        ("forward", "all_gather"): 1,
        ("backward", "all_reduce"): 2 * L + 1,
    }
    # the counts above come from the graphs handed to Inductor; Inductor itself ran
    assert sum(torch._dynamo.utils.counters["inductor"].values()) > before
    # bytes: every all-reduce moves one B*T*C fp32 activation
    B, T = args[0].shape
    C = model.config.n_embd if hasattr(model.config, "n_embd") else model.config.dim
    assert {c.nbytes for c in record.collectives if c.kind == "all_reduce"} == {B * T * C * 4}
    # the logits are never gathered: the one all-gather carries 3 floats per token row
    (gather,) = [c for c in record.collectives if c.kind == "all_gather"]
    n_rows = args[0].numel()
    assert gather.nbytes <= 4 * n_rows * 4 * 4  # <= tp * rows * 4 stats * fp32


def test_heads_not_divisible_keep_attention_whole_with_one_warning():
    """6 heads at tp=4: q/k/v (and the out-projection reading them) stay whole, the MLP and the
    vocabulary stay sharded, and one TPWarning says what it costs and which tp would shard them.
    Naming those projections column-parallel in ``plan=`` is the error (the user asked for a split
    that cannot be made)."""
    model, args = gpt.make_model(n_head=6, n_embd=96)
    rep = tpcompile.explain(model, *args, world_size=4)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert rep.plan[f"h.0.attn.{name}.weight"] == "replicate", rep.plan
    assert rep.plan["h.0.mlp.fc.weight"] == "colwise" and rep.plan["h.0.mlp.proj.weight"] == "rowwise"
    assert rep.plan["wte.weight"] == "vocab"
    # one warning per layer (a repeated block is planned once as a region, and warns for each layer)
    msg, other = [w for w in rep.warnings if "does not divide" in w]
    assert other == msg.replace("h.0.", "h.1."), other
    assert "h.0.attn.q_proj (6)" in msg and "h.0.attn.o_proj" in msg and "tp in {1, 2, 3, 6}" in msg, msg
    assert "parameters (" in msg and "more" in msg and "4x their share of the compute" in msg, msg
    assert not [w for w in rep.warnings if "no tensor-parallel rule" in w], rep.warnings
    model, args = gpt.make_model(n_head=6, n_embd=96)
    with pytest.raises(tpcompile.TPShardingError) as e:
        tpcompile.explain(model, *args, world_size=4, plan={"h.*.attn.q_proj": "colwise"})
    msg = str(e.value)
    assert "6 heads" in msg and "tp=4" in msg and "{1, 2, 3, 6}" in msg and "gpt.py" in msg, msg


def test_vocab_not_divisible_is_padded():
    """250 rows at tp=4: every rank's program takes 63 (the last one 61 real + 2 zero rows); the
    parameter (a DTensor, uneven Shard(0)) holds the 61 real ones; the plan keeps the full size and
    records the padded one. Loss parity: tests/test_hf_models.py (GPT-2, TP=4)."""
    with fake_group(world_size=4, rank=3):
        model, args = gpt.make_model(vocab_size=250)
        model = tpcompile.tp_compile(model, backend="eager")
        model(*args)
        pp = tpcompile.tp_state(model).plan["wte.weight"]
    assert (pp.style, pp.full_shape, pp.local_shape, pp.padded_shape) == ("vocab", (250, 64), (63, 64), (252, 64))
    local = model.wte.weight._local_tensor
    assert tuple(model.wte.weight.shape) == (250, 64) and tuple(local.shape) == (61, 64)
    program = local._tp_padded  # what the compiled graph takes: the real rows, then zeros
    assert tuple(program.shape) == (63, 64) and program[-2:].abs().sum().item() == 0.0
    assert program.untyped_storage().data_ptr() == local.untyped_storage().data_ptr()  # no copy per call


def test_plan_override_keeps_a_module_replicated():
    with fake_group(world_size=2):
        model, args = llama.make_model()
        model = tpcompile.tp_compile(model, backend="eager", plan={"layers.*.feed_forward.*": "replicate"})
        model(*args)
        plan = tpcompile.tp_state(model).plan
    assert plan["layers.0.feed_forward.gate.weight"].style == "replicate"
    assert plan["layers.0.feed_forward.down.weight"].style == "replicate"
    assert plan["layers.0.attention.q_proj.weight"].style == "colwise"
    assert tuple(model.layers[0].feed_forward.down.weight.to_local().shape) == (64, 128)
    assert tuple(model.layers[0].attention.o_proj.weight.to_local().shape) == (64, 32)


def test_plan_override_names_a_tied_weight_by_either_name():
    with fake_group(world_size=2):
        model, args = gpt.make_model()
        model = tpcompile.tp_compile(model, backend="eager", plan={"lm_head": "replicate"})
        model(*args)
        plan = tpcompile.tp_state(model).plan
    assert plan["wte.weight"].style == "replicate"  # lm_head.weight is wte.weight
    assert plan["h.0.mlp.fc.weight"].style == "colwise"
