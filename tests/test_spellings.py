"""Every spelling of a linear layer gets Megatron's column -> row pattern, the shard dim following
the weight's actual layout (``[out, in]`` or ``[in, out]``); spellings with no rule (``einsum``,
``baddbmm`` with a parameter operand) stay replicated and correct."""
import pytest
import torch

import spellings
import tpcompile
from fakepg import fake_group
from multirank import run_ranks


@pytest.mark.parametrize("cls", list(spellings.SHARDED), ids=lambda c: c.__name__)
@pytest.mark.parametrize("world", [2, 4])
def test_plan_follows_weight_layout(cls, world):
    with fake_group(world_size=world):
        model, x = spellings.make(cls)
        model = tpcompile.tp_compile(model, backend="eager")
        model(x)
        plan = tpcompile.tp_state(model).plan
    (w1, s1, d1), (w2, s2, d2) = spellings.SHARDED[cls]
    assert (plan[w1].style, plan[w1].dim) == (s1, d1)
    assert (plan[w2].style, plan[w2].dim) == (s2, d2)
    local = list(plan[w1].full_shape)
    local[d1] //= world
    assert plan[w1].local_shape == tuple(local)
    assert tuple(dict(model.named_parameters())[w1].shape) == tuple(local)


@pytest.mark.parametrize("cls", spellings.REPLICATED, ids=lambda c: c.__name__)
def test_no_rule_spellings_stay_replicated(cls):
    with fake_group(world_size=2):
        model, x = spellings.make(cls)
        model = tpcompile.tp_compile(model, backend="eager")
        model(x)
        plan = tpcompile.tp_state(model).plan
    assert {pp.style for pp in plan.values()} == {"replicate"}


def test_every_spelling_matches_single_device_on_gloo():
    results = run_ranks(spellings.parity_all, 2)
    for rank, res in enumerate(results):
        assert set(res) == {c.__name__ for c in spellings.ALL}
        for name, (loss, ref, err, styles) in res.items():
            assert abs(loss - ref) <= 1e-5 * abs(ref), f"rank {rank} {name}: {loss} vs {ref}"
            assert err <= 1e-5, f"rank {rank} {name}: gradient off by {err}"
            sharded = name in {c.__name__ for c in spellings.SHARDED}
            assert ("rowwise" in styles.values()) == sharded, (name, styles)
    assert torch.tensor([r["AddmmConv1D"][0] for r in results]).unique().numel() == 1
