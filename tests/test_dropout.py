"""Dropout RNG semantics (Megatron's RNG tracker): the same mask on every rank in replicated
regions, independent masks per rank on sharded activations. 2 gloo ranks, same seed on each."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from multirank import run_ranks


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
    (y0, h0, style, code), (y1, h1, _, _) = run_ranks(_run, 2)
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
