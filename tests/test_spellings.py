"""Every spelling of a linear layer (``F.linear``, ``@``, ``addmm``, ``einsum``, ``bmm`` / ``baddbmm``
of an expanded weight) gets Megatron's column -> row pattern, the shard dim following the weight's
actual layout (``[out, in]`` or ``[in, out]``); a contraction with a parameter and no rule (``einsum``
with a 3-D weight) stays replicated and correct, with a warning."""
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
    assert tuple(dict(model.named_parameters())[w1].to_local().shape) == tuple(local)


@pytest.mark.parametrize("cls", spellings.REPLICATED, ids=lambda c: c.__name__)
def test_no_rule_spellings_stay_replicated_with_a_warning(cls):
    with fake_group(world_size=2):
        model, x = spellings.make(cls)
        model = tpcompile.tp_compile(model, backend="eager")
        with pytest.warns(tpcompile.TPWarning) as rec:
            model(x)
        plan = tpcompile.tp_state(model).plan
    assert {pp.style for pp in plan.values()} == {"replicate"}
    msgs = [str(w.message) for w in rec if "no tensor-parallel rule for `einsum`" in str(w.message)]
    assert len(msgs) == 2  # one per 3-D weight: w1 and w2
    for fqn, line in (("w1", '"btd,dnk->btnk"'), ("w2", '"btnk,nkd->btd"')):
        (msg,) = [m for m in msgs if f"parameter {fqn} " in m]
        assert "spellings.py:" in msg and line in msg and "computed replicated" in msg
        assert "F.linear(x, W)" in msg and f"plan={{'{fqn}': 'replicate'}}" in msg
    # the override named in the warning silences it
    with fake_group(world_size=2):
        model, x = spellings.make(cls)
        model = tpcompile.tp_compile(model, backend="eager", plan={"w1": "replicate", "w2": "replicate"})
        with _no_warning():
            model(x)


@pytest.mark.parametrize("cls", list(spellings.SHARDED), ids=lambda c: c.__name__)
def test_spellings_hit_the_communication_floor(cls):
    """Forward: one all-reduce (the row-parallel output); backward: one (the f before the column
    projection). Counted on the AOTAutograd graphs at TP=2, as tests/test_floor.py does."""
    model, x = spellings.make(cls)
    rep = tpcompile.explain(model, x.requires_grad_(), world_size=2)  # x's gradient: the f's all-reduce
    assert rep.counts() == {("forward", "all_reduce"): 1, ("backward", "all_reduce"): 1}
    assert rep.above_floor() == {"forward": 0, "backward": 0} and not rep.warnings


def test_every_spelling_matches_single_device_on_gloo():
    results = run_ranks(spellings.parity_all, 2)
    for rank, res in enumerate(results):
        assert set(res) == {c.__name__ for c in spellings.ALL}
        for name, (loss, ref, err, styles) in res.items():
            assert abs(loss - ref) <= 1e-5 * abs(ref), f"rank {rank} {name}: {loss} vs {ref}"
            assert err <= 1e-5, f"rank {rank} {name}: gradient off by {err}"
            sharded = name in {c.__name__ for c in list(spellings.SHARDED) + spellings.FUSED}
            assert ("rowwise" in styles.values()) == sharded, (name, styles)
    assert torch.tensor([r["AddmmConv1D"][0] for r in results]).unique().numel() == 1


@pytest.mark.parametrize("world", [2, 4])
def test_fused_qkv_with_unequal_pieces(world):
    """q [16] bigger than k, v [8 each] (GQA). TP=2: each piece split on its own; TP=4: 2 kv heads
    for 4 ranks: kv-head copies (the weight stored replicated, each rank's program takes its q rows
    and the kv head its queries use), the output projection row-parallel, no warning."""
    with fake_group(world_size=world):
        model, x = spellings.make(spellings.FusedQKVGQA)
        model = tpcompile.tp_compile(model, backend="eager")
        with _no_warning():
            model(x)
        plan = tpcompile.tp_state(model).plan
    qkv, o = plan["qkv.weight"], plan["o.weight"]
    if world == 2:
        assert (qkv.style, qkv.dim, qkv.chunks, qkv.pieces, qkv.local_shape) == ("colwise", 0, 3, (16, 8, 8), (16, 16))
        assert plan["qkv.bias"].pieces == (16, 8, 8) and o.style == "rowwise"
        w = model.qkv.weight.to_local().detach()
        torch.manual_seed(0)
        full = spellings.FusedQKVGQA().qkv.weight.detach()  # rank 0 keeps q[:8], k[:4], v[:4]
        assert torch.equal(w, torch.cat([full[:8], full[16:20], full[24:28]]))
    else:
        assert (qkv.style, qkv.kv.sizes, qkv.kv.copies, o.style) == ("kvcopy", (16, 8, 8), (1, 2, 2), "rowwise")


@pytest.mark.parametrize("cls", [spellings.FusedQKVReshapeUnbind, spellings.FusedQKVReshapeIndex], ids=lambda c: c.__name__)
@pytest.mark.parametrize("world", [2, 4])
def test_fused_qkv_reshaped_pieces_first_is_a_three_piece_column_shard(cls, world):
    """ViT's ``qkv(x).reshape(B, T, 3, heads, hd).permute(2, 0, 3, 1, 4)`` then ``unbind(0)`` or
    ``[0], [1], [2]`` is ``split`` by another name: qkv column-parallel in 3 pieces (a rank keeps the
    q, k and v rows of its heads), the reshape shards heads, the output projection row-parallel, at
    the floor. It used to read the 3 as heads and refuse tp=2."""
    with fake_group(world_size=world):
        model, x = spellings.make(cls)
        model = tpcompile.tp_compile(model, backend="eager")
        with _no_warning():
            model(x)
        plan = tpcompile.tp_state(model).plan
        w = model.qkv.weight.to_local().detach()
    qkv, n = plan["qkv.weight"], spellings.D // world
    assert (qkv.style, qkv.dim, qkv.chunks, qkv.local_shape) == ("colwise", 0, 3, (3 * n, spellings.D))
    assert plan["qkv.bias"].chunks == 3 and plan["o.weight"].style == "rowwise"
    full = spellings.make(cls)[0].qkv.weight.detach()  # rank 0: rows [0, n) of each of q, k, v
    assert torch.equal(w, torch.cat([full[i * spellings.D:i * spellings.D + n] for i in range(3)]))
    model, x = spellings.make(cls)
    rep = tpcompile.explain(model, x.requires_grad_(), world_size=world)
    assert rep.counts() == {("forward", "all_reduce"): 1, ("backward", "all_reduce"): 1}
    assert rep.above_floor() == {"forward": 0, "backward": 0} and not rep.warnings
    assert f"reshape(2, 8, 3, {4 // world}, 4)" in rep.graph_code


@pytest.mark.parametrize("world,dim,heads", [(2, 24, 3), (4, 16, 2)])
def test_fused_qkv_reshaped_with_heads_tp_does_not_divide_stays_whole_and_names_the_heads(world, dim, heads):
    """The hint counts heads, not the 3 pieces: tp must divide the heads. Left to tpcompile, qkv and
    the projection reading it stay whole, with the heads in the warning; named column-parallel in
    ``plan=``, it is refused with the same count."""
    torch.manual_seed(0)
    model = spellings.FusedQKVReshapeUnbind(dim, heads)
    rep = tpcompile.explain(model, torch.randn(2, 8, dim), world_size=world)
    assert rep.plan["qkv.weight"] == "replicate" and rep.plan["o.weight"] == "replicate", rep.plan
    (msg,) = rep.warnings
    assert f"qkv ({heads})" in msg and f"tp={world} does not divide" in msg and f"tp in {{1, {heads}}}" in msg, msg
    with pytest.raises(tpcompile.TPShardingError, match=rf"qkv \(column-parallel as plan= asks\) is split into "
                       rf"{heads} heads .* not divisible by tp={world}\. Use tp in \{{1, {heads}\}}"):
        tpcompile.explain(model, torch.randn(2, 8, dim), world_size=world, plan={"qkv": "colwise"})


class _no_warning:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error", tpcompile.TPWarning)

    def __exit__(self, *a):
        return self._cm.__exit__(*a)


def test_sdpa_enable_gqa_with_fewer_kv_heads_than_tp_on_gloo():
    """TP=4, 2 kv heads: kv-head copies (k / v stored whole, each rank's program takes the one kv head
    of its query heads and SDPA's GQA runs on it); loss and gradients equal single device."""
    for rank, res in enumerate(run_ranks(spellings.parity_all, 4, ["SDPAEnableGQA"])):
        loss, ref, err, styles = res["SDPAEnableGQA"]
        assert abs(loss - ref) <= 1e-5 * abs(ref) and err <= 1e-5, (rank, loss, ref, err)
        assert styles["q.weight"] == "colwise" and styles["o.weight"] == "rowwise"
        assert styles["k.weight"] == styles["v.weight"] == styles["k.bias"] == "kvcopy"


class _GatedMLP(torch.nn.Module):
    """Qwen2-MoE's shared expert: ``sigmoid(gate(x)) * mlp(x)`` with a ``[.., 1]`` gate, then another MLP."""

    def __init__(self, C: int = 32):
        super().__init__()
        self.gate, self.fc, self.proj = torch.nn.Linear(C, 1, bias=False), torch.nn.Linear(C, 4 * C), torch.nn.Linear(4 * C, C)
        self.fc2, self.proj2 = torch.nn.Linear(C, 4 * C), torch.nn.Linear(4 * C, C)

    def forward(self, x):
        h = x + torch.sigmoid(self.gate(x)) * self.proj(torch.relu(self.fc(x)))
        return (h + self.proj2(torch.relu(self.fc2(h)))).sum()


def test_a_size_one_gate_times_a_row_output_keeps_the_next_layer_sharded():
    """A ``[.., 1]`` value broadcast against ``[.., C]`` is no shard of the product. The pointwise rule
    used to carry the gate's column try through the multiply as a shard of the residual stream, so
    the next MLP lost its column / row plan (replicated, with 3 warnings)."""
    rep = tpcompile.explain(_GatedMLP(), torch.randn(2, 8, 32), world_size=2)
    assert rep.plan == {"gate.weight": "replicate", "fc.weight": "colwise", "fc.bias": "colwise",
                        "proj.weight": "rowwise", "proj.bias": "replicate", "fc2.weight": "colwise",
                        "fc2.bias": "colwise", "proj2.weight": "rowwise", "proj2.bias": "replicate"}
    assert rep.counts()[("forward", "all_reduce")] == 2 and rep.warnings == []
