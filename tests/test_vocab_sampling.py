"""Vocab-parallel selection at decode: argmax / max / top-k / softmax / log_softmax / logsumexp over
the vocabulary of a column-parallel LM head, and gpt-fast's sampling step compiled in one graph.

One spawned gloo group at TP=2 runs both cases (``sampling_cases``): an untied head of an uneven
vocabulary (101 and 127: padded at TP=2) on integer weights (logits that tie exactly), and the
hand-written static-cache model whose forward ends in temperature + top-k + softmax + an exponential
race (``multinomial_sample_one_no_sync``). The head stays vocab-sharded (1/tp of its weight per rank);
the only collectives on the logits are one small all-gather per selection (a few values per row),
never an all-gather of ``[B, V]``; sampled tokens equal single device's under the same seed, on
every rank. The fake group checks the plan and the floor at TP=4 without processes.
"""
import functools

import pytest
import torch

import sampling_cases as S
from multirank import run_cases


@functools.cache
def _gloo() -> dict:
    cases = {"select": (S.select_beside, ()), "sampling": (S.sampling_beside, ())}
    return dict(zip(cases, run_cases(2, list(cases.values()))))


def _same_on_every_rank(results, key):
    for rank, r in enumerate(results):
        assert r[key] == results[0][key], f"rank {rank}: other {key} than rank 0"


def test_selection_over_the_vocabulary_equals_single_device():
    """Exact where torch defines the answer: argmax / max (ties: the lowest index, as torch's first
    maximum), top-k values; top-k indices equal wherever the values are distinct, and on ties name
    entries holding exactly those values (torch leaves that order unspecified; ours is lowest index
    first, the same on every rank). softmax / log_softmax / logsumexp to rounding (sums in another
    order). The head vocab-sharded and padded (101 rows at TP=2: 51 per rank), one all-gather per
    selection, none of the logits: only the returned ``full`` logits are gathered, at the end."""
    results = _gloo()["select"]
    x = S.select_inputs()
    for r in results:
        want, got = r["want"], r["got"]
        assert torch.equal(got["full"], want["full"])
        for k in ("argmax", "argmax_keep", "max", "max_index", "topk_values"):
            assert torch.equal(got[k], want[k]), k
        ties = (want["full"].unsqueeze(-1) == want["topk_values"].unsqueeze(-2)).sum(-2) > 1  # [.., k] tied
        assert ties.any() and (~ties).any()
        assert torch.equal(got["topk_index"][~ties], want["topk_index"][~ties])
        assert torch.equal(want["full"].gather(-1, got["topk_index"]), want["topk_values"])
        assert (got["topk_index"].sort(-1).values.diff(dim=-1) > 0).all()  # distinct entries
        for k in ("softmax", "log_softmax", "logsumexp"):
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)
        assert r["head"].style == "colwise" and r["head"].local_shape == (51, 16), r["head"]
        rows, tp = 3 * 4, 2
        returned = 3 * rows * 102 * 4  # softmax, log_softmax and the logits returned whole: [3, 4, 102] fp32 each
        small = [n for k, n in r["collectives"] if k == "all_gather" and n != rows * 102 * 4]
        assert [k for k, _ in r["collectives"]] == ["all_gather"] * 10, r["collectives"]
        assert sum(n for _, n in r["collectives"]) - sum(small) == returned, r["collectives"]
        # 7 selections: (value, index) or (max, sum-exp) per row as float64, k of them for top-k
        assert sorted(small) == [tp * 2 * rows * 8] * 6 + [tp * 2 * rows * 7 * 8], small
        assert r["warnings"] == []
    for k in results[0]["got"]:
        assert all(torch.equal(r["got"][k], results[0]["got"][k]) for r in results), k


def test_gpt_fast_sampling_step_keeps_the_lm_head_vocab_sharded():
    """Prefill and 7 decode steps of the sampling model: the sampled and greedy tokens equal single
    device's (same seed: the exponential noise is each rank's slice of single device's draw), the same
    on both ranks; two graphs; per graph 3 all-reduces (the embedding, two out-projections) and 4 small
    all-gathers (top-k candidates, softmax stats, the two argmaxes), at the floor; no all-gather of
    ``[B, V]`` logits; the head 64 of 127 rows per rank (padded)."""
    results = _gloo()["sampling"]
    _same_on_every_rank(results, "tokens")
    r = results[0]
    assert r["tokens"] == r["ref_tokens"]
    assert r["head"] == "colwise" and r["head_local"] == (64, 32), (r["head"], r["head_local"])
    assert r["n_graphs"] == 2
    B, V = 2, 127
    for graph, floor in zip(r["collectives"], r["floor"]):
        kinds = [k for k, _ in graph]
        assert kinds.count("all_reduce") == 3 and kinds.count("all_gather") == 4, graph
        assert all(n < B * V * 4 for k, n in graph if k == "all_gather"), graph
        assert floor == {"forward": {"row-parallel linear": 2, "vocab-parallel embedding": 1,
                                     "vocab-parallel selection": 4}, "backward": {}}, floor
    assert r["warnings"] == []


def test_explain_of_a_decode_step_has_no_backward_floor():
    """``explain`` under ``no_grad`` (a decode step): no backward, and the floor says so (it counted
    the backward of a training graph: "-N vs the floor"); the selections are the floor's, per token."""
    import tpcompile

    model = S.SamplingLM(vocab=127).eval()
    tok, L = torch.zeros(2, 1, dtype=torch.long), model.max_len
    with torch.no_grad():
        report = tpcompile.explain(model, tok, torch.tensor([5]), torch.arange(L)[None, :] <= 5, world_size=4)
    assert report.above_floor() == {"forward": 0, "backward": 0}, report.above_floor()
    assert report.floor["backward"] == {}
    assert report.floor["forward"]["vocab-parallel selection"] == 4
    assert report.plan["head.weight"] == "colwise" and report.params["head.weight"].local_shape == (32, 32)
    text = str(report)
    assert "backward none" in text and "-" not in text.split("backward none")[1].split("\n")[1], text


def test_selection_that_needs_a_gradient_is_made_whole():
    """In training (values need a gradient) the selection rules do not apply: the softmax of sharded
    logits is gathered first, with a TPWarning naming it (right, and loud); the head stays replicated."""
    import warnings

    import tpcompile
    from fakepg import fake_group

    class Distill(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(16, 64, bias=False)

        def forward(self, x):
            return torch.softmax(self.head(x), -1).sum()

    with fake_group(2), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = tpcompile.tp_compile(Distill(), backend="eager")
        model(torch.randn(3, 16)).backward()
    assert tpcompile.tp_state(model).plan["head.weight"].style == "replicate"
    assert any("softmax" in str(w.message) for w in caught if issubclass(w.category, tpcompile.TPWarning))


def test_top_p_over_the_whole_vocabulary_is_gathered_loudly():
    """Top-p written with a ``sort`` of the whole vocabulary (HF's ``TopPLogitsWarper``) has no
    vocab-parallel rule (the nucleus may lie outside any rank's candidates): the logits are made whole
    first, with a TPWarning naming ``sort`` (right, and loud). Top-p over ``topk`` candidates needs no
    rule: ``topk``'s output is whole on every rank."""
    import warnings

    import tpcompile
    from fakepg import fake_group

    class TopP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(16, 64, bias=False)

        def forward(self, x):
            logits = self.head(x)
            sorted_logits, idx = torch.sort(logits, descending=True)
            drop = sorted_logits.softmax(-1).cumsum(-1) > 0.9
            return logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf")).argmax(-1)

    with fake_group(2), warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        tpcompile.tp_compile(TopP().eval(), backend="eager")(torch.randn(3, 16))
    assert any("`sort`" in str(w.message) for w in caught if issubclass(w.category, tpcompile.TPWarning)), \
        [str(w.message) for w in caught]
