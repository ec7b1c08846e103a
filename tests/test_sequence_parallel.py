"""sequence_parallel=True: parity with single-device training and the SP communication floor.

Between TP regions the residual stream, norms and dropout hold 1/tp of the tokens; the
all-reduces become reduce-scatters + all-gathers of the same buffers, and the replicated
weights used on token shards (norm weights, row-parallel biases) get their gradients
all-reduced. fp32, gloo ranks; tolerances as in test_parity.
"""
import functools
import importlib.util
from collections import Counter

import re

import pytest
import torch

import gpt
import llama
import tpcompile
import hf_models
from fakepg import fake_group
from models_common import assert_parity
from multirank import run_cases
from parity import train_beside_reference


TRAINING = [("gpt", 2, "inductor"), ("gpt", 4, "aot_eager"), ("llama", 2, "aot_eager"), ("llama", 4, "aot_eager")]


@functools.cache
def _gloo(world: int) -> list:
    """The gloo cases of this file at one TP degree in one job: the TRAINING rows of that degree,
    then (TP=2) the dropout case."""
    cases = [(train_beside_reference, (m, 3, 0.1, b, None, True)) for m, w, b in TRAINING if w == world]
    if world == 2:
        cases.append((_sp_dropout_ranks, ()))
        if importlib.util.find_spec("transformers") is not None:  # last: GPT-2 (HF Conv1D) under SP
            cases.append((functools.partial(hf_models.train_hf_beside_reference, sequence_parallel=True), ("gpt2",)))
    return run_cases(world, cases)


@pytest.mark.parametrize("model_name, world, backend", TRAINING)
def test_sequence_parallel_training_matches_single_device(model_name, world, backend):
    results = _gloo(world)[[(m, b) for m, w, b in TRAINING if w == world].index((model_name, backend))]
    for rank, r in enumerate(results):
        for step, (a, b) in enumerate(zip(r["loss"], r["ref_loss"])):
            assert abs(a - b) <= 1e-5 * abs(b), f"rank {rank} step {step}: tp+sp {a} vs single {b}"
        assert r["loss"] == results[0]["loss"]
        assert r["grad_err"] <= 1e-5, f"rank {rank}: gradient off by {r['grad_err']}"
        assert r["local_numel"] == r["expected_numel"]
    kinds = Counter(results[0]["collectives"])
    assert ("forward", "reduce_scatter") in kinds and ("forward", "all_reduce") not in kinds


@pytest.mark.parametrize("make, layers_kw, norm_params, backend", [
    (gpt.make_model, "n_layer", lambda L: 6 * L + 2, "inductor"),  # ln_1, ln_2 w+b; o_proj/proj biases; ln_f w+b
    (llama.make_model, "n_layers", lambda L: 2 * L + 1, "aot_eager"),  # attention_norm, ffn_norm; final norm
])
def test_sp_collectives_on_compiled_graphs(make, layers_kw, norm_params, backend):
    L, tp = 3, 4
    with fake_group(world_size=tp, rank=2):
        model, args = make(**{layers_kw: L})
        model = tpcompile.tp_compile(model, sequence_parallel=True, backend=backend)
        model(*args).backward()
        (record,) = tpcompile.tp_state(model).records
    counts = Counter((c.phase, c.kind) for c in record.collectives)
    sliced = 1 if make is gpt.make_model else 0  # GPT's learned position embedding enters the region
    assert counts == {
        ("forward", "reduce_scatter"): 2 * L + 1,  # row-parallel outputs + the embedding
        ("forward", "all_gather"): 2 * L + 1 + 1,  # column-parallel inputs + LM head input, + the loss
        ("backward", "all_gather"): 2 * L + 1 + sliced,
        ("backward", "reduce_scatter"): 2 * L + 1,
        ("backward", "all_reduce"): 1,  # every norm weight / bias gradient in one bucket
    }
    # the same bytes as the all-reduces of plain TP: every reduce-scatter/all-gather moves B*T*C
    B, T = args[0].shape
    C = model.config.n_embd if hasattr(model.config, "n_embd") else model.config.dim
    big = [c for c in record.collectives if c.kind in ("reduce_scatter", "all_gather") and c.nbytes == B * T * C * 4]
    assert len(big) == 4 * (2 * L + 1)
    assert sum(record.floor["forward"].values()) == 4 * L + 3
    assert sum(record.floor["backward"].values()) == 4 * L + 2 + 1 + sliced
    bucket = next(n for n in record.rewritten.graph.nodes if n.meta.get("tp_mapping") == "copy_to_tp_bucketed")
    assert len(bucket.args[0]) == norm_params(L)


def test_explain_shows_sequence_parallel_at_the_floor():
    model, args = llama.make_model(n_layers=2, device="meta")
    rep = tpcompile.explain(model, *args, world_size=4, sequence_parallel=True)
    assert rep.above_floor() == {"forward": 0, "backward": 0}
    assert rep.graph_code.count("gather_from_sp(") == 5 and rep.graph_code.count("reduce_scatter_to_sp(") == 4
    assert "sp_dim = 1" in rep.graph_code  # the embedding reduce-scatters over tokens
    assert "reduce-scatter into SP" in str(rep)


def test_tokens_not_divisible_run_without_sp_with_a_warning():
    """A token count tp does not divide (a decode step of one token, an odd batch) is planned without
    SP: the plain TP program, at its own floor, and a TPWarning naming the line and the fix."""
    model, args = gpt.make_model(block_size=30)
    rep = tpcompile.explain(model, *args, world_size=4, sequence_parallel=True)
    assert any(re.search(r"30 tokens per sequence.*not divisible by tp=4.*without sequence parallelism.*pad the "
                         r"sequence length to a multiple of 4", w, re.S) for w in rep.warnings), rep.warnings
    assert rep.above_floor() == {"forward": 0, "backward": 0}
    assert "gather_from_sp(" not in rep.graph_code and "reduce_scatter_to_sp(" not in rep.graph_code
    plain = tpcompile.explain(model, *args, world_size=4)
    assert [(c.kind, c.phase) for c in rep.records[0].collectives] == \
        [(c.kind, c.phase) for c in plain.records[0].collectives]


def test_a_non_token_wise_consumer_gets_the_whole_value():
    """A model that returns its hidden states: the SP region is gathered back for the output."""

    class Hidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, _ = gpt.make_model(n_layer=1)

        def forward(self, idx):
            x = self.inner.wte(idx)
            x = x + self.inner.h[0](x)
            return self.inner.ln_f(x)

    _, (idx, _) = gpt.make_model(n_layer=1)
    rep = tpcompile.explain(Hidden(), idx, world_size=2, sequence_parallel=True)
    assert "gather_from_tp(" in rep.graph_code
    assert rep.above_floor()["forward"] == 1  # that gather is the one collective above the floor


def _sp_dropout_ranks(rank, world):
    """Dropout in the token-sharded residual stream: a full-sequence mask, this rank's tokens."""
    model, (x, y) = gpt.make_model(dropout=0.2)
    model = tpcompile.tp_compile(model, backend="aot_eager", sequence_parallel=True)
    torch.manual_seed(7)
    train_loss = model(x, y).item()
    model.eval()
    eval_loss = model(x, y).item()
    code = tpcompile.tp_state(model).records[0].graph_code
    return train_loss, eval_loss, code.count("sharded_dropout(")


def test_dropout_in_the_token_sharded_stream():
    results = _gloo(2)[sum(w == 2 for _, w, _ in TRAINING)]  # after the TRAINING rows of TP=2
    for train_loss, eval_loss, n in results:
        assert n >= 3  # embedding dropout and both residual dropouts of each block are region ops
        assert train_loss == results[0][0]  # every rank combines the same loss
        assert train_loss != eval_loss  # the masks are live


class _HandRMSNorm(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


NORMS = {
    "nn.RMSNorm": lambda: torch.nn.RMSNorm(16),  # torch.rms_norm in the graph (torchtune's RMSNorm too)
    "F.rms_norm": lambda: (lambda x: torch.nn.functional.rms_norm(x, (16,))),
    "torch.rms_norm": lambda: (lambda x: torch.rms_norm(x, (16,))),
    "nn.LayerNorm": lambda: torch.nn.LayerNorm(16),
    "torch.layer_norm": lambda: (lambda x: torch.layer_norm(x, (16,))),
    "hand-written RMSNorm": lambda: _HandRMSNorm(16),
}


@pytest.mark.parametrize("norm", NORMS)
def test_torch_rms_norm_runs_on_token_shards_under_sequence_parallel(norm):
    """Every norm spelling is a region op: before, ``torch.rms_norm`` had no rule, so the norms
    ran on whole sequences (all-gathered, then sliced again: collectives above the floor)."""

    class Blocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = torch.nn.Embedding(32, 16)
            self.norms = torch.nn.ModuleList(torch.nn.Module() for _ in range(2))
            for m in self.norms:
                m.norm, m.up, m.down = NORMS[norm](), torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)
            self.head = torch.nn.Linear(16, 32, bias=False)

        def forward(self, idx, targets):
            x = self.wte(idx)
            for m in self.norms:
                x = x + m.down(torch.nn.functional.gelu(m.up(m.norm(x))))
            return torch.nn.functional.cross_entropy(self.head(x).flatten(0, 1), targets.flatten())

    idx = torch.randint(0, 32, (2, 8))
    rep = tpcompile.explain(Blocks(), idx, idx, world_size=2, sequence_parallel=True)
    assert rep.above_floor() == {"forward": 0, "backward": 0}, rep.graph_code
    assert "gather_from_tp(" not in rep.graph_code and rep.graph_code.count("reduce_scatter_to_sp(") == 2


def test_gpt2_token_flattened_conv1d_trains_under_sp_at_the_floor():
    """HF GPT-2's Conv1D runs ``addmm`` on ``x.view(-1, C)`` (batch and tokens in one dim) and views the
    result back to ``[B, T, C]``; SP follows the token dim through that flatten
    (``sequence_parallel._tokens_through_flattens``): the row-parallel sums are reduce-scattered over
    tokens after the view back, the all-gathers go before the flatten. It used to be refused.
    3 SGD steps at TP=2: loss, logits and every gradient as single device, ranks agree, no warning,
    every collective an SP one, at the SP floor plus the returned logits' all-gather."""
    pytest.importorskip("transformers")
    results = _gloo(2)[-1]
    r = assert_parity(results, rel=1e-5, grad_atol=1e-5)
    assert all(x["logits_err"] <= 1e-5 for x in results), [x["logits_err"] for x in results]
    assert r["warnings"] == [], r["warnings"]
    kinds = Counter(r["collectives"])  # (phase, kind)
    assert ("forward", "all_reduce") not in kinds and kinds[("forward", "reduce_scatter")] == 2 * 2 + 1, kinds
    (floor,) = r["floor"]
    have = Counter(ph for ph, _ in r["collectives"])
    assert have == {"forward": floor["forward"] + 1, "backward": floor["backward"]}, (have, floor)
    assert r["plan"]["transformer.h.0.attn.c_attn.weight"][:2] == ("colwise", 1)  # Conv1D: [in, out]