"""Correct or loud, on 2 gloo ranks: inputs that differ across ranks, new input shapes,
inference, an op with no placement rule, a graph break. Each is checked against the
single-device model (fp32, atol 1e-5). ``aot_eager`` keeps these fast; Inductor is
covered by test_parity / test_floor.
"""
import copy
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

import gpt
import tpcompile
from multirank import run_cases


@functools.cache
def _gloo() -> dict:
    """Every gloo case of this file in one 2-rank job."""
    cases = {"inputs": (_inputs_shapes_inference, ()), "unsupported": (_unsupported_and_break, ()),
             "whole_grads": (_one_step, (_WholeGradOperands,)), "partial": (_one_step, (_NormOverShards,)),
             "sharded_break": (_sharded_outputs_break, ()), "divergence": (_replicas_drift, ())}
    return dict(zip(cases, run_cases(2, list(cases.values()))))

TOL = 1e-5


def _inputs_shapes_inference(rank, world):
    out = {}
    # 1. a data loader seeded per rank: loud on the first call
    model, (x, y) = gpt.make_model()
    model = tpcompile.tp_compile(model, backend="aot_eager")
    try:
        model(x + rank, y)
        out["mismatch"] = None
    except tpcompile.TPInputMismatchError as e:
        out["mismatch"] = str(e)
    # 2. broadcast_inputs=True: every rank computes on rank 0's batch
    model, (x, y) = gpt.make_model()
    ref = copy.deepcopy(model)
    model = tpcompile.tp_compile(model, backend="aot_eager", broadcast_inputs=True)
    out["broadcast"] = (model((x + rank) % 256, y).item(), ref(x, y).item())
    # 3. new input shapes recompile and stay right; 4. eval + no_grad returns whole logits
    model, (x, y) = gpt.make_model()
    ref = copy.deepcopy(model)
    model = tpcompile.tp_compile(model, backend="aot_eager")
    out["shapes"] = []
    for b, t in [(4, 32), (2, 16), (3, 8)]:
        xs, ys = x[:b, :t].contiguous(), y[:b, :t].contiguous()
        out["shapes"].append((model(xs, ys).item(), ref(xs, ys).item()))
    model.eval()
    ref.eval()
    with torch.no_grad():
        logits, ref_logits = model(x), ref(x)
    out["logits_shape"] = tuple(logits.shape)
    out["logits_err"] = (logits - ref_logits).abs().max().item()
    out["graphs"] = len(tpcompile.tp_state(model).records)
    return out


def test_inputs_shapes_and_inference():
    for r in _gloo()["inputs"]:
        assert "TP ranks [1] got different inputs" in r["mismatch"] and "broadcast_inputs=True" in r["mismatch"]
        tp_loss, ref_loss = r["broadcast"]
        assert abs(tp_loss - ref_loss) <= TOL * ref_loss
        for tp_loss, ref_loss in r["shapes"]:
            assert abs(tp_loss - ref_loss) <= TOL * ref_loss
        assert r["logits_shape"] == (4, 32, 256)
        assert r["logits_err"] <= TOL
        assert r["graphs"] >= 3  # a second shape recompiled (dynamic), inference compiled again


class CumsumMLP(nn.Module):
    """An MLP with an op tpcompile has no placement rule for (cumsum over the hidden dim)."""

    def __init__(self, mlp):
        super().__init__()
        self.fc, self.proj = mlp.fc, mlp.proj

    def forward(self, x):
        return self.proj(torch.cumsum(F.gelu(self.fc(x)), dim=-1) * 0.01)


class BreakingMLP(nn.Module):
    """An MLP that graph-breaks between its two projections."""

    def __init__(self, mlp):
        super().__init__()
        self.fc, self.proj = mlp.fc, mlp.proj

    def forward(self, x):
        h = F.gelu(self.fc(x))
        torch._dynamo.graph_break()
        return self.proj(h)


class Net(nn.Module):
    """Embedding, two residual MLPs called one after the other (no loop), untied head, loss."""

    def __init__(self, mlp2_cls):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(256, 64)
        self.mlp1 = gpt.MLP(gpt.GPTConfig())
        self.mlp2 = mlp2_cls(gpt.MLP(gpt.GPTConfig()))
        self.head = nn.Linear(64, 256, bias=False)

    def forward(self, idx, targets):
        x = self.emb(idx)
        x = x + self.mlp1(x)
        x = x + self.mlp2(x)
        return F.cross_entropy(self.head(x).view(-1, 256), targets.view(-1))


def _train(model, x, y, steps=3):
    ref = copy.deepcopy(model)
    model = tpcompile.tp_compile(model, backend="aot_eager")
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, ref))
    losses = []
    for _ in range(steps):
        loss, ref_loss = model(x, y), ref(x, y)
        loss.backward()
        ref_loss.backward()
        losses.append((loss.item(), ref_loss.item()))
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad()
    return losses, tpcompile.tp_state(model)


def _unsupported_and_break(rank, world):
    import warnings

    out = {}
    _, (x, y) = gpt.make_model()
    model, _ = gpt.make_model()
    model.h[0].mlp = CumsumMLP(model.h[0].mlp)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["losses"], st = _train(model, x, y)
    out["warnings"] = [str(w.message) for w in caught if issubclass(w.category, tpcompile.TPWarning)]
    out["plan"] = {k: v.style for k, v in st.plan.items()}
    # a graph break between two projections: values crossing it are made whole
    out["break_losses"], st = _train(Net(BreakingMLP), x, y)
    out["break_graphs"] = len(st.records)
    out["break_plan"] = {k: v.style for k, v in st.plan.items()}
    # a graph break inside the loop over blocks: Dynamo runs GPT.forward eagerly; the modules it
    # calls are compiled on their own (tests/test_graph_breaks.py has the parity of every gradient)
    model, _ = gpt.make_model()
    model.h[1].mlp = BreakingMLP(model.h[1].mlp)
    out["loop_break_losses"], st = _train(model, x, y)
    return out


def test_unsupported_op_and_graph_break_stay_correct():
    for r in _gloo()["unsupported"]:
        for tp_loss, ref_loss in r["losses"] + r["break_losses"] + r["loop_break_losses"]:
            assert abs(tp_loss - ref_loss) <= TOL * ref_loss
        (msg,) = [w for w in r["warnings"] if "cumsum" in w]
        assert "test_behaviour.py" in msg and "h.0.mlp.fc" in msg and "replicated" in msg
        assert r["plan"]["h.0.mlp.fc.weight"] == "replicate"
        assert r["plan"]["h.1.mlp.fc.weight"] == "colwise"  # the rest of the model is still sharded
        assert r["plan"]["h.0.attn.o_proj.weight"] == "rowwise"
        assert r["break_graphs"] >= 2
        assert r["break_plan"]["emb.weight"] == "vocab" and r["break_plan"]["mlp1.fc.weight"] == "colwise"


class _SharedForward(nn.Module):
    """Many classes, one ``forward`` code object: each new class is a recompile of that frame."""

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def test_past_the_recompile_limit_the_eager_forward_is_right_and_says_so():
    """Past Dynamo's recompile limit the frame runs eagerly, on the twin. It used to compute on the
    memory-free stand-ins (NaN, then a ``TPEagerFallbackError``); now its parameter reads get the real
    values (``tpcompile.eager``): the single-device output, and a ``TPWarning`` naming the frame."""
    import copy
    import warnings

    import torch._dynamo

    from fakepg import fake_group

    torch._dynamo.reset()
    with fake_group(world_size=2), torch._dynamo.config.patch(recompile_limit=2):
        for i in range(3):
            m = type(f"Shared{i}", (_SharedForward,), {})()
            m.up, m.down = nn.Linear(8, 16), nn.Linear(16, 8)
            ref = copy.deepcopy(m)
            model = tpcompile.tp_compile(m, backend="eager")
            x = torch.randn(4, 8)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = model(x)
            if i == 2:  # (a fake group's collectives are no-ops: only the eager, unsharded call is comparable)
                torch.testing.assert_close(out, ref(x), rtol=0, atol=1e-6)
            assert torch.isfinite(out).all()
            eager = [str(w.message) for w in caught if "ran eagerly" in str(w.message)]
            assert (len(eager) == 1 and "recompile" in eager[0]) if i == 2 else not eager, eager


class _RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class _WholeGradOperands(nn.Module):
    """Replicated values that need a gradient, used whole by ops on sharded activations:
    a per-head norm weight on head-sharded q (Qwen3 / OLMo2 qk-norm), and the ``rsqrt`` of a
    gathered mean broadcast over a hidden-sharded stream (what Phi-3's replicated fused QKV
    leads to: its out-projection turns column-parallel)."""

    def __init__(self):
        super().__init__()
        self.q, self.o = nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False)
        self.q_norm, self.norm = _RMSNorm(4), _RMSNorm(16)
        self.a, self.b = nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q = self.q_norm(self.q(x).view(B, T, 4, 4))  # heads sharded, weight [head_dim] whole
        x = x + self.o(q.reshape(B, T, C))
        h = x + self.a(x)  # a column-parallel output joins the stream: the stream is hidden-sharded
        return self.b(self.norm(h)).pow(2).mean()


def _one_step(rank, world, model_cls):
    """One forward/backward of ``model_cls()`` tp-compiled and on one device: (tp loss, loss,
    {fqn: largest gradient error against its single-device slice}, {fqn: style},
    [(phase, kind, nbytes) per collective], TPWarnings)."""
    from parity import grad_errors

    torch.manual_seed(0)
    model = model_cls()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(1))
    tp = tpcompile.tp_compile(model, backend="aot_eager")
    loss, ref_loss = tp(x), ref(x)
    loss.backward()
    ref_loss.backward()
    st = tpcompile.tp_state(tp)
    errs = grad_errors(model, ref, rank)
    rec = st.records[0]
    return (loss.item(), ref_loss.item(), errs, {f: pp.style for f, pp in st.plan.items()},
            [(c.phase, c.kind, c.nbytes) for c in rec.collectives], rec.fallbacks)


def test_replicated_operands_of_sharded_ops_get_whole_gradients():
    for loss, ref_loss, errs, plan, _, _ in _gloo()["whole_grads"]:
        assert abs(loss - ref_loss) <= TOL * ref_loss
        assert plan["q_norm.weight"] == "replicate" and plan["a.weight"] == "colwise" and plan["norm.weight"] == "colwise"
        assert max(errs.values()) <= 1e-5, errs


class _NormOverShards(nn.Module):
    """Reductions over the sharded dim: an RMSNorm over a whole column-parallel output (OLMo-2's
    q/k norm), a ``sum`` over it, and a ``mean`` over every dim of a sharded tensor."""

    def __init__(self):
        super().__init__()
        self.q, self.o = nn.Linear(16, 32, bias=False), nn.Linear(32, 16, bias=False)
        self.q_norm = _RMSNorm(32)

    def forward(self, x):
        q = self.q_norm(self.q(x))
        gate = torch.sigmoid(q.sum(-1, keepdim=True))
        return self.o(q * gate).pow(2).mean() + q.mean()


def test_sum_and_mean_over_the_sharded_dim_are_partial():
    """Each is a local reduction plus one all-reduce of its (small) result, not a gather of its input."""
    for loss, ref_loss, errs, plan, collectives, warns in _gloo()["partial"]:
        assert abs(loss - ref_loss) <= TOL * abs(ref_loss) and max(errs.values()) <= 1e-5, (loss, ref_loss, errs)
        fwd = [(kind, nbytes) for phase, kind, nbytes in collectives if phase == "forward"]
        assert plan["q.weight"] == "colwise" and plan["q_norm.weight"] == "colwise" and plan["o.weight"] == "rowwise"
        assert warns == []
        # 3 partial reductions ([2, 4, 1] x2, a scalar) + the row-parallel output [2, 4, 16]; nothing gathered
        assert sorted(fwd) == [("all_reduce", 4), ("all_reduce", 32), ("all_reduce", 32), ("all_reduce", 512)], fwd


class _LossThenBreak(nn.Module):
    """The loss in one graph, a graph break, then the (sharded) logits used again."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(32, 16), nn.Linear(16, 32, bias=False)

    def forward(self, idx):
        logits = self.head(self.emb(idx))
        loss = F.cross_entropy(logits.view(-1, 32), idx.view(-1))
        torch._dynamo.graph_break()
        return loss, logits.argmax(-1)


def _sharded_outputs_break(rank, world):
    torch.manual_seed(0)
    plain = tpcompile.tp_compile(_LossThenBreak(), backend="eager")
    idx = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))
    plain(idx)  # sharded_outputs=False: the logits crossing the break are gathered
    torch._dynamo.reset()
    model = tpcompile.tp_compile(_LossThenBreak(), backend="eager", sharded_outputs=True)
    try:
        model(idx)
    except tpcompile.TPShardingError as e:
        return str(e)
    return None


def test_sharded_outputs_across_a_graph_break_is_a_clear_error():
    for msg in _gloo()["sharded_break"]:
        assert msg is not None and "sharded_outputs=True" in msg and "graph break" in msg, msg


def _replicas_drift(rank, world):
    """{case: (the call that raised TPDivergenceError or None, its message)} for 6 AdamW steps of
    the example GPT: a correct loop (clipping included), one whose learning rate differs per rank
    from step 4 on (checked at calls 1-3, then every 4th: caught at call 8), and the same with the
    check off."""
    def run(every, per_rank_lr):
        model, (x, y) = gpt.make_model()
        model = tpcompile.tp_compile(model, backend="aot_eager", check_replicas_every=every)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for call in range(1, 10):
            try:
                loss = model(x, y)
            except tpcompile.TPDivergenceError as e:
                return call, str(e)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            if per_rank_lr and call == 4:
                opt.param_groups[0]["lr"] *= 1 + rank
            opt.step()
            opt.zero_grad()
        return None, ""
    return {"correct": run(4, False), "per_rank_lr": run(4, True), "off": run(0, True)}


def test_replicas_that_drift_apart_raise_tp_divergence_error():
    """A per-rank update of replicated parameters (here a per-rank learning rate) is caught at the
    next check and named; a correct loop with AdamW and clipping stays quiet; 0 turns it off."""
    for res in _gloo()["divergence"]:
        assert res["correct"] == (None, "")
        assert res["off"] == (None, "")
        call, msg = res["per_rank_lr"]
        assert call == 8, msg
        # the first replicated parameter in the model's order (position embeddings) is named
        assert msg.startswith("tp_compile: wpe.weight is replicated over the TP group but TP ranks [1] hold "
                              "other values than TP rank 0"), msg
        assert "check_replicas_every=0" in msg


class _WritesIntoAColumnShard(nn.Module):
    """``y.cumsum_(-1)`` on a column-parallel output that the row linear has already read: cumsum over
    the sharded features needs ``y`` whole (an all-gather), and the write would land in that copy while
    the later ``y.sum()`` reads the shard (written out of place it plans fine)."""

    def __init__(self, in_place: bool = True):
        super().__init__()
        self.in_place = in_place
        self.up, self.down = nn.Linear(32, 64, bias=False), nn.Linear(64, 32, bias=False)

    def forward(self, x):
        y = self.up(x)
        z = self.down(F.relu(y))
        if self.in_place:
            y.cumsum_(-1)
        else:
            y = y.cumsum(-1)
        return z.sum() + y.sum()


def test_inplace_write_into_a_shard_that_must_be_gathered_is_refused_not_dropped():
    """``rewrite._writes_first``: an in-place op whose written operand must change placement first (here
    Shard(1) -> Replicate) is refused under ``explain``'s fake group,, naming the op, its source line and both fixes; the out-of-place
    spelling of the same model plans and stays at its floor."""
    import pytest

    from tpcompile.errors import TPShardingError

    x = torch.randn(4, 32)
    with pytest.raises(TPShardingError) as e:
        tpcompile.explain(_WritesIntoAColumnShard(), x, world_size=2)
    msg = str(e.value)
    assert "`cumsum_`" in msg and "test_behaviour.py" in msg and "y.cumsum_(-1)" in msg, msg
    assert "S(1) -> R" in msg and "the write would land in a copy" in msg, msg
    assert "x = x.cumsum(...)" in msg and "'replicate'" in msg, msg
    rep = tpcompile.explain(_WritesIntoAColumnShard(in_place=False), x, world_size=2)
    assert rep.plan["up.weight"] == "colwise" and rep.plan["down.weight"] == "rowwise", rep.plan
    assert "gather_from_tp(" in rep.graph_code  # the cumsum reads y whole, out of place


@torch._dynamo.disable
def _decay_in_place(m: nn.Module) -> None:
    with torch.no_grad():
        m.scale.mul_(0.5)  # a parameter update inside the forward, in code Dynamo does not trace


class _WritesItsParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x):
        _decay_in_place(self)
        return self.down(F.gelu(self.up(x))) * self.scale


def test_an_in_place_write_into_a_parameter_from_eager_code_is_refused_not_lost():
    """Eager code reads a parameter as its full value, gathered: a copy. Written in place there, the
    write would be lost (the model's parameter unchanged), a silent difference from single device:
    ``TPEagerFallbackError`` names the parameter and the frame."""
    import pytest

    from fakepg import fake_group

    torch._dynamo.reset()
    with fake_group(world_size=2):
        model = tpcompile.tp_compile(_WritesItsParameter(), backend="eager")
        with pytest.raises(tpcompile.TPEagerFallbackError, match=r"_decay_in_place.*wrote into parameter scale"):
            model(torch.randn(4, 8))
