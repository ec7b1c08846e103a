"""Heads that tp does not divide: one behaviour for every spelling of the attention projections.

Whatever the spelling (separate q/k/v, one fused projection split or chunked, interleaved per head
or per kv group, ``reshape(B, T, 3, H, hd)``, unequal GQA pieces), the projections whose heads tp
does not divide stay whole (replicated) with one ``TPWarning`` that states the cost and the tp values
that would shard them, and the rest of the model (MLP, embedding, LM head) stays sharded. Trained on
4 gloo ranks beside an untouched single-device copy (``fuzz_models.run_case``: 2 SGD steps, the loss
and every gradient, all ranks equal), one job for the file.
"""
from __future__ import annotations

import functools
import re
from dataclasses import replace

import pytest

from fuzz_models import Spec, classify, run_case, spec
from multirank import run_cases

BASE = Spec(seed=7, vocab=64, heads=6, kv_heads=6, head_dim=4, ffn_mult=4, layers=1, qkv="separate",
            spellings=("module",) * 6, bias=True, norm="layernorm", qk_norm=False, block="pre", mlp="gelu",
            attention="sdpa", positions="rope", tied=False, checkpoint=False, graph_break="none",
            loss=(True, 0.0, "mean"), dtype="fp32", plan=(), sequence_parallel=False, batch=2, seq=8, dropout=0.0)

SPELLINGS = {  # 6 query heads at tp=4 in each; the attention projections concerned, by module
    "separate": (dict(qkv="separate", spellings=("matmul", "conv1d", "einsum", "module", "module", "module")),
                 ("q", "k", "v")),
    "fused_split": (dict(qkv="fused_split"), ("qkv",)),
    "fused_per_head": (dict(qkv="fused_per_head", attention="manual"), ("qkv",)),
    "fused_per_group": (dict(qkv="fused_per_group", kv_heads=3), ("qkv",)),
    # one kv group: the view keeps its shard (on the group's 8 pieces), the split (6, 1, 1) cannot; this said
    # "no tensor-parallel rule for `split`" (fuzz seeds 92009, 92016, 92017 at TP=2), now the heads warning
    "fused_per_group_one_group": (dict(qkv="fused_per_group", kv_heads=1), ("qkv",)),
    "reshape_3_heads": (dict(qkv="fused_reshape3", spellings=("conv1d",) * 6), ("qkv",)),
    "fused_gqa_pieces": (dict(qkv="fused_gqa", kv_heads=2, block="parallel"), ("qkv",)),
}
TP = 4


def _spec(name: str) -> Spec:
    return replace(BASE, **SPELLINGS[name][0])


@functools.cache
def _gloo() -> list:
    cases = [(run_case, (0, "aot_eager", _spec(name))) for name in SPELLINGS]
    cases.append((run_case, (91026,)))
    return run_cases(TP, cases, timeout=900)


def _outcome(by_rank: list) -> tuple[str, str]:
    outcome, why = classify(by_rank)
    assert outcome in ("match", "loud"), f"{outcome}: {why}"
    assert all(r["error"] is None for r in by_rank), by_rank[0]["error"]
    return outcome, why


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_heads_tp_does_not_divide_stay_whole_with_one_warning_in_every_spelling(name):
    by_rank = _gloo()[list(SPELLINGS).index(name)]
    _outcome(by_rank)
    r = by_rank[0]
    plan, whole = r["plan"], SPELLINGS[name][1]
    for m in whole:
        assert plan[f"blocks.0.attn.{m}.weight"] == "replicate", (m, plan)
    assert plan["blocks.0.mlp.up.weight"] == "colwise" and plan["blocks.0.mlp.down.weight"] == "rowwise", plan
    assert plan["wte.weight"] == "vocab" and plan["head.weight"] == "colwise", plan
    (msg,) = r["warnings"]  # one warning, and only that one
    for m in whole:
        assert f"blocks.0.attn.{m} (" in msg, msg
    assert f"tp={TP} does not divide" in msg and "parameters (" in msg and f"{TP}x their share of the compute" in msg, msg
    assert re.search(r"tp in \{1(, \d+)*\} would shard them", msg), msg


def test_two_query_heads_at_tp4_never_leave_a_rank_without_heads():
    """Found by the fuzzer (seed 91026: 2 heads of 4, per-group fused qkv, parallel block, hand-written
    attention): the MLP's up projection, beside qkv on the same input, passed for a query projection,
    so qkv took kv-head copies and the query heads were narrowed to 2 // 4 = 0 per rank
    (``RuntimeError: shape '[2, 8, 2]' is invalid for input of size 0``). Now no rule may shard a dim
    that tp does not divide (``propagate._splits_evenly``) and kv copies need a sibling whose heads
    split: qkv and the output projection stay whole, the MLP sharded, at parity."""
    s = spec(91026)
    assert (s.heads, s.kv_heads, s.qkv, s.block) == (2, 2, "fused_per_group", "parallel")
    by_rank = _gloo()[-1]
    outcome, why = _outcome(by_rank)
    plan = by_rank[0]["plan"]
    assert plan["blocks.0.attn.qkv.weight"] == "replicate" and plan["blocks.0.attn.o.weight"] == "replicate", plan
    assert plan["blocks.0.mlp.up.weight"] == "colwise", plan
    assert outcome == "loud" and "blocks.0.attn.qkv (2)" in why, why
