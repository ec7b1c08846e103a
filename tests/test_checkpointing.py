"""Activation checkpointing (``torch.utils.checkpoint``, non-reentrant): not rewritten inside its
subgraph yet. The block's parameters stay replicated, a TPWarning says so, and the result is
single device's (2 gloo ranks)."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from multirank import run_ranks


class CkptMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)
        self.up2, self.down2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def block(self, x):
        return self.down(F.gelu(self.up(x)))

    def forward(self, x):
        x = x + checkpoint(self.block, x, use_reentrant=False)
        return (x + self.down2(F.gelu(self.up2(x)))).pow(2).mean()


def _run(rank, world):
    import copy
    import warnings

    import tpcompile

    torch.manual_seed(0)
    model = CkptMLP()
    ref = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = tpcompile.tp_compile(model, backend="aot_eager")
        x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
        loss = model(x)
        loss.backward()
    ref_loss = ref(x)
    ref_loss.backward()
    st = tpcompile.tp_state(model)
    err = max((p.grad - dict(ref.named_parameters())[f].grad).abs().max().item()
              for f, p in st.params.items() if st.plan[f].style == "replicate")
    msgs = [str(w.message) for w in caught if issubclass(w.category, tpcompile.TPWarning)]
    return loss.item(), ref_loss.item(), err, {f: pp.style for f, pp in st.plan.items()}, msgs


def test_checkpointed_block_stays_replicated_with_a_warning():
    for loss, ref, err, plan, msgs in run_ranks(_run, 2):
        assert abs(loss - ref) <= 1e-5 * abs(ref)
        assert err <= 1e-5
        assert plan["up.weight"] == plan["down.weight"] == "replicate"
        assert plan["up2.weight"] == "colwise" and plan["down2.weight"] == "rowwise"  # outside: sharded
        assert len(msgs) == 1 and "not rewritten" in msgs[0] and "up.weight" in msgs[0], msgs
