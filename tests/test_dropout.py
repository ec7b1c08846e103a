"""Dropout RNG semantics (Megatron's RNG tracker): the same mask on every rank in replicated
regions, independent masks per rank on sharded activations: there each rank draws the whole
tensor's mask as eager dropout does and keeps its slice, so under the same seed a TP model
draws exactly single device's masks. 2 gloo ranks, same seed on each."""
import functools
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from multirank import run_cases


@functools.cache
def _gloo() -> dict:
    """Every gloo case of this file in one 2-rank job (each case seeds its own draws)."""
    cases = {"mlp": (_run, ()), "probe": (_sdpa_probe, ()), "grads": (_sdpa_grads, ()),
             "tp": (_spellings_beside_single_device, (False,)), "sp": (_spellings_beside_single_device, (True,)),
             "sp_mask": (_sp_torch_dropout_mask, ())}
    return dict(zip(cases, run_cases(2, list(cases.values()))))


class DropMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x):
        h = F.dropout(F.gelu(self.up(x)), 0.5, self.training)  # sharded (column-parallel output)
        y = F.dropout(self.down(h), 0.5, self.training)  # replicated (after the row-parallel all-reduce)
        return y, h


def _run(rank, world):
    import tpcompile

    torch.manual_seed(0)
    model = tpcompile.tp_compile(DropMLP(), backend="aot_eager")
    x = torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(1))
    y, h = model(x)
    (y.sum() + h.sum()).backward()
    st = tpcompile.tp_state(model)
    # numpy: tensors would travel as shared memory that dies with the rank's process
    return y.detach().numpy(), h.detach().numpy(), st.plan["up.weight"].style, st.records[0].graph_code


def test_dropout_masks_same_when_replicated_independent_when_sharded():
    (y0, h0, style, code), (y1, h1, _, _) = _gloo()["mlp"]
    y0, h0, y1, h1 = (torch.from_numpy(a) for a in (y0, h0, y1, h1))
    assert style == "colwise" and "sharded_dropout" in code
    # replicated region: both ranks drew the same mask, so the replicated output agrees exactly
    assert torch.equal(y0, y1)
    assert 0.35 < (y0 == 0).float().mean().item() < 0.65
    # sharded region: rank 0 holds columns [0, 32), rank 1 [32, 64); their masks must differ
    dropped0, dropped1 = h0[..., :32] == 0, h0[..., 32:] == 0
    assert 0.35 < dropped0.float().mean().item() < 0.65 and 0.35 < dropped1.float().mean().item() < 0.65
    agree = (dropped0 == dropped1).float().mean().item()
    assert agree < 0.75, f"the two ranks' masks agree on {agree:.0%} of entries: not independent"
    assert torch.equal(h0, h1)  # gathered: every rank sees the same whole activation


# --------------------------------------------------------------------------- SDPA's own dropout
HEADS, HD = 4, 8


class DropAttn(nn.Module):
    """Head-sharded attention with SDPA's own ``dropout_p``. ``probe``: v is the identity, so the
    attention output is the dropped probabilities themselves (zeros = the mask)."""

    def __init__(self, p=0.5, causal=False, probe=False):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(16, HEADS * HD) for _ in range(3))
        self.o = nn.Linear(HEADS * HD, 16)  # T = HD = 8: the probe's [B, T, H*T] fits too
        self.p, self.causal, self.probe = p, causal, probe
        self.attn = F.scaled_dot_product_attention

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, HEADS, HD).transpose(1, 2)
        k = self.k(x).view(B, T, HEADS, HD).transpose(1, 2)
        v = torch.eye(T).expand(B, HEADS, T, T) if self.probe else self.v(x).view(B, T, HEADS, HD).transpose(1, 2)
        y = self.attn(q, k, v, dropout_p=self.p if self.training else 0.0, is_causal=self.causal)
        return self.o(y.transpose(1, 2).reshape(B, T, -1)), y


def _x():
    return torch.randn(2, HD, 16, generator=torch.Generator().manual_seed(1))


def _sdpa_probe(rank, world):
    import tpcompile

    torch.manual_seed(0)
    model = tpcompile.tp_compile(DropAttn(probe=True), backend="aot_eager")
    torch.manual_seed(7)
    _, y = model(_x())
    st = tpcompile.tp_state(model)
    return y.detach().numpy(), st.plan["q.weight"].style, st.records[0].graph_code


def test_sdpa_dropout_masks_are_slices_of_one_whole_heads_mask():
    """Each rank draws the mask of all heads (the draw single device makes with the same seed)
    and keeps its own heads: the ranks' masks differ, and together they are that one mask."""
    (y0, style, code), (y1, _, _) = _gloo()["probe"]
    y0, y1 = torch.from_numpy(y0), torch.from_numpy(y1)
    assert style == "colwise" and "sharded_sdpa" in code and "scaled_dot_product_attention" not in code
    assert torch.equal(y0, y1)  # gathered at the output: the whole [B, H, T, S] on every rank
    torch.manual_seed(7)
    keep = torch.empty(y0.shape).bernoulli_(0.5) == 1  # single device's whole-heads mask, same seed, same maths
    assert torch.equal(y0 != 0, keep)
    rank0, rank1 = keep[:, : HEADS // 2], keep[:, HEADS // 2:]  # heads [0, 2) on rank 0, [2, 4) on rank 1
    agree = (rank0 == rank1).float().mean().item()
    assert agree < 0.75, f"the two ranks' masks agree on {agree:.0%} of entries: not independent"


def _sdpa_grads(rank, world):
    import copy
    import functools

    import tpcompile
    from parity import grad_errors
    from tpcompile.runtime.random import sharded_sdpa

    torch.manual_seed(0)
    model = DropAttn(causal=True)
    ref = copy.deepcopy(model)  # single device, SDPA in the same explicit maths over all heads
    ref.attn = functools.partial(sharded_sdpa, dim=1, full=HEADS, rank=0)
    with torch._inductor.config.patch(fallback_random=True):  # Inductor draws as eager: comparable masks
        model = tpcompile.tp_compile(model)
        torch.manual_seed(7)
        out, y = model(_x())
        (out.pow(2).sum() + y.sum()).backward()
    torch.manual_seed(7)
    ref_out, ref_y = ref(_x())
    (ref_out.pow(2).sum() + ref_y.sum()).backward()
    st = tpcompile.tp_state(model)
    grad_err = max(grad_errors(model, ref, rank).values())
    with torch.no_grad():
        moved = (ref_y - ref.eval()(_x())[1]).abs().max().item()  # dropout did act
    return (out - ref_out).abs().max().item(), (y - ref_y).abs().max().item(), grad_err, moved, st.plan["q.weight"].style


def test_sdpa_dropout_forward_and_gradients_match_single_device():
    """Inductor, causal, p=0.5: output and every gradient equal single device running the same
    maths with the same seed."""
    for rank, (out_err, y_err, grad_err, moved, style) in enumerate(_gloo()["grads"]):
        assert style == "colwise" and moved > 0.1, (rank, style, moved)
        assert out_err < 1e-5 and y_err < 1e-5 and grad_err < 1e-5, (rank, out_err, y_err, grad_err)


def test_sdpa_without_dropout_stays_fused():
    """dropout_p == 0 (eval, or p=0 in training) and replicated heads keep the fused SDPA."""
    import tpcompile
    from fakepg import fake_group

    def code(model, **kw):
        with fake_group(world_size=2):
            model = tpcompile.tp_compile(model, backend="eager", **kw)
            model(_x())
            return tpcompile.tp_state(model).records[0].graph_code

    for model, kw in ((DropAttn().eval(), {}), (DropAttn(p=0.0), {}), (DropAttn(), {"plan": {"*": "replicate"}})):
        c = code(model, **kw)
        assert "scaled_dot_product_attention" in c and "sharded_sdpa" not in c, c
    assert "sharded_sdpa" in code(DropAttn())


# --------------------------------------------------------------------------- every spelling, SP on and off
P = 0.3
SPELLINGS = {  # name -> dropout of a [B, T, C] activation as the user writes it
    "F.dropout": lambda x: F.dropout(x, P, True),
    "nn.Dropout": nn.Dropout(P),
    "torch.dropout": lambda x: torch.dropout(x, P, True),
    "F.dropout(inplace=True)": lambda x: F.dropout(x * 1.0, P, True, inplace=True),
    "torch.dropout_": lambda x: torch.dropout_(x * 1.0, P, True),
    "F.dropout1d": lambda x: F.dropout1d(x, P, True),  # [N, C, L]: the mask is [B, T, 1]
    "F.dropout2d": lambda x: F.dropout2d(x, P, True),  # 3-D input: dropout1d's behaviour (with a warning)
    "F.dropout3d": lambda x: F.dropout3d(x[..., None, None], P, True)[..., 0, 0],
    "torch.feature_dropout": lambda x: torch.feature_dropout(x, P, True),
    "F.alpha_dropout": lambda x: F.alpha_dropout(x, P, True),
    "torch.alpha_dropout_": lambda x: torch.alpha_dropout_(x * 1.0, P, True),
    "F.feature_alpha_dropout": lambda x: F.feature_alpha_dropout(x, P, True),
}
VOCAB, T = 32, 8


class _Block(nn.Module):
    """A dropout on the column-parallel hidden (hidden-sharded) and one on the residual stream
    (replicated without SP, token-sharded with it)."""

    def __init__(self, drop):
        super().__init__()
        self.norm, self.up, self.down, self.drop = nn.RMSNorm(16), nn.Linear(16, 32), nn.Linear(32, 16), drop

    def forward(self, x):
        return x + self.drop(self.down(self.drop(F.gelu(self.up(self.norm(x))))))


class DropSpellings(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.ln_f, self.head = nn.Embedding(VOCAB, 16), nn.LayerNorm(16), nn.Linear(16, VOCAB, bias=False)
        self.blocks = nn.ModuleList(_Block(d) for d in SPELLINGS.values())

    def forward(self, idx, targets):
        x = self.wte(idx)
        for b in self.blocks:
            x = b(x)
        return F.cross_entropy(self.head(self.ln_f(x)).flatten(0, 1), targets.flatten())


def _spellings_beside_single_device(rank, world, sequence_parallel):
    """3 SGD steps of the TP model (aot_eager: eager RNG) and of an untouched copy, each step's
    forward under the same seed."""
    import copy

    import tpcompile
    from parity import grad_errors

    warnings.filterwarnings("ignore", message="dropout2d")
    torch.manual_seed(0)
    model = DropSpellings()
    ref = copy.deepcopy(model)
    tp = tpcompile.tp_compile(model, backend="aot_eager", sequence_parallel=sequence_parallel)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (tp, ref)]
    g = torch.Generator().manual_seed(1)
    out = {"loss": [], "ref_loss": [], "grad_err": 0.0}
    for step in range(3):
        idx, targets = (torch.randint(0, VOCAB, (2, T), generator=g) for _ in range(2))
        for m, key in ((tp, "loss"), (ref, "ref_loss")):
            torch.manual_seed(100 + step)
            loss = m(idx, targets)
            loss.backward()
            out[key].append(loss.item())
        out["grad_err"] = max(out["grad_err"], max(grad_errors(tp, ref, rank).values()))
        for o in opts:
            o.step()
            o.zero_grad()
    with torch.no_grad():
        torch.manual_seed(100)
        out["eval_gap"] = abs(ref(idx, targets).item() - ref.eval()(idx, targets).item())  # dropout did act
    st = tpcompile.tp_state(tp)
    out["styles"] = {st.plan[f"blocks.0.{n}.weight"].style for n in ("up", "down")}
    out["sharded_dropouts"] = sum(r.graph_code.count("sharded_dropout(") for r in st.records)
    return out


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
def test_every_dropout_spelling_draws_single_device_masks(sequence_parallel):
    """Loss and every gradient of 3 steps equal single device's under the same seed, for each
    dropout spelling on a sharded hidden and on the residual stream, SP on and off."""
    results = _gloo()["sp" if sequence_parallel else "tp"]
    for rank, r in enumerate(results):
        assert r["styles"] == {"colwise", "rowwise"}
        for step, (a, b) in enumerate(zip(r["loss"], r["ref_loss"])):
            assert abs(a - b) <= 1e-5 * abs(b), f"rank {rank} step {step}: tp {a} vs single device {b}"
        assert r["loss"] == results[0]["loss"]
        assert r["grad_err"] <= 1e-5, f"rank {rank}: a gradient is off by {r['grad_err']}"
        assert r["eval_gap"] > 0.01
        # the hidden of every block; with SP also each residual dropout but dropout3d's (behind a view)
        assert r["sharded_dropouts"] == len(SPELLINGS) + (len(SPELLINGS) - 1 if sequence_parallel else 0)


class _SPProbe(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x):
        z = self.down(F.gelu(self.up(x)))  # row-parallel: reduce-scattered over tokens under SP
        return torch.dropout(z, 0.5, True), z


def _sp_torch_dropout_mask(rank, world):
    import copy

    import tpcompile

    torch.manual_seed(0)
    model = _SPProbe()
    ref = copy.deepcopy(model)
    tp = tpcompile.tp_compile(model, backend="aot_eager", sequence_parallel=True)
    x = torch.randn(2, T, 16, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    y, z = tp(x)
    torch.manual_seed(7)
    ref_y, _ = ref(x)
    code = tpcompile.tp_state(tp).records[0].graph_code
    return (y == 0).numpy(), (z == 0).any().item(), (ref_y == 0).numpy(), code


def test_torch_dropout_under_sequence_parallel_draws_the_whole_mask():
    """``torch.dropout`` on the token-sharded stream: each rank keeps its tokens of one whole
    mask (single device's under the same seed), so the ranks' masks differ. Before, it ran as a
    plain op on each rank's tokens: both ranks drew the same mask for different tokens."""
    (m0, zero0, ref, code), (m1, _, _, _) = _gloo()["sp_mask"]
    assert "sharded_dropout(" in code and "reduce_scatter_to_sp(" in code and not zero0
    m0, m1, ref = (torch.from_numpy(a) for a in (m0, m1, ref))
    assert torch.equal(m0, m1) and torch.equal(m0, ref)  # gathered: single device's whole mask
    first, second = m0[:, : T // 2], m0[:, T // 2:]  # rank 0's tokens, rank 1's tokens
    agree = (first == second).float().mean().item()
    assert agree < 0.75, f"the two ranks' masks agree on {agree:.0%} of entries: not independent"


def _ranks_seeded_apart(rank, world):
    """Each rank seeded with its own seed (or unseeded: torch seeds each process differently), the
    example GPT with dropout trained 3 SGD steps: the first call gives every rank TP rank 0's RNG
    state, with a TPWarning; the ranks then agree and match single device run from rank 0's seed."""
    import copy

    import gpt
    import tpcompile

    model, (x, y) = gpt.make_model(n_layer=1, dropout=0.1)
    ref = copy.deepcopy(model)
    torch.manual_seed(1234)
    ref_rng = torch.get_rng_state()  # TP rank 0's stream: what single device draws from
    torch.manual_seed(1234 + rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tp = tpcompile.tp_compile(model, backend="aot_eager")
        opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (tp, ref)]
        losses = []
        for _ in range(3):
            loss = tp(x, y)
            loss.backward()
            mine = torch.get_rng_state()
            torch.set_rng_state(ref_rng)
            ref_loss = ref(x, y)
            ref_loss.backward()
            ref_rng = torch.get_rng_state()
            torch.set_rng_state(mine)
            for o in opts:
                o.step()
                o.zero_grad()
            losses.append((loss.item(), ref_loss.item()))
    return losses, [str(w.message) for w in caught if issubclass(w.category, tpcompile.TPWarning)]


def test_ranks_seeded_apart_get_rank_0s_random_numbers_with_a_warning():
    results = run_cases(2, [(_ranks_seeded_apart, ())])[0]
    (losses, msgs), (losses1, _) = results
    assert [a for a, _ in losses] == [a for a, _ in losses1]  # the ranks agree (no TPDivergenceError)
    for got, want in losses:
        assert abs(got - want) <= 1e-5 * abs(want), losses
    assert len(msgs) == 1 and "TP ranks [1] started with another random-number state" in msgs[0], msgs
    assert "torch.manual_seed(seed)" in msgs[0]
