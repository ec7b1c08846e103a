"""Dropout RNG semantics (Megatron's RNG tracker): the same mask on every rank in replicated
regions, independent masks per rank on sharded activations. 2 gloo ranks, same seed on each."""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from multirank import run_cases


@functools.cache
def _gloo() -> dict:
    """Every gloo case of this file in one 2-rank job (each case seeds its own draws)."""
    cases = {"mlp": (_run, ()), "probe": (_sdpa_probe, ()), "grads": (_sdpa_grads, ())}
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
    keep = torch.rand(y0.shape) >= 0.5  # single device's whole-heads mask, same seed, same maths
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
