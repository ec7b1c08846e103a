"""End to end: the vocab-parallel CE custom ops inside tp_compile, against single device.

The example GPT with label smoothing 0.1 and a quarter of the target rows ignored
(``gpt_smoothed.py``), 3 SGD steps on 2 gloo ranks with Inductor and on 4 with aot_eager
(Inductor on 4 ranks of 2 cores costs a minute more and tests nothing new here): loss within
1e-5 relative at every step, every gradient equal to its single-device slice (atol 1e-5),
one all-gather (the loss statistics) in the forward and none in the backward.
(``test_vocab_parallel.py`` checks that the op reaches the graphs as ``tpcompile::ce_stats``
/ ``ce_grad``.)
"""
import pytest

from multirank import run_ranks
from parity import train_beside_reference


@pytest.mark.parametrize("world,backend", [(2, "inductor"), (4, "aot_eager")])
def test_smoothed_ignored_loss_matches_single_device(world, backend):
    results = run_ranks(train_beside_reference, world, "gpt_smoothed", steps=3, backend=backend)
    for rank, r in enumerate(results):
        for step, (a, b) in enumerate(zip(r["loss"], r["ref_loss"])):
            assert abs(a - b) <= 1e-5 * abs(b), f"rank {rank} step {step}: tp {a} vs single {b}"
        assert r["grad_err"] <= 1e-5, f"rank {rank}: gradient off by {r['grad_err']}"
        assert r["local_numel"] == r["expected_numel"]
        # the loss stays vocab-parallel: one all-gather (its stats) in the forward, and
        # the lm head is still sharded over the vocabulary
        assert r["collectives"].count(("forward", "all_gather")) == 1
        assert not any(k == "all_gather" for p, k in r["collectives"] if p == "backward")
        assert r["plan"]["gpt.wte.weight"] == "vocab"
    assert results[0]["warnings"] == []
