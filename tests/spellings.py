"""Tiny MLPs (up-projection, GELU, down-projection), one per way of writing a linear layer.

Importable so that spawned gloo ranks can build them (tests/test_spellings.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

D, H = 16, 32


class _MLP(nn.Module):
    """Weights stored ``[out, in]`` (nn.Linear layout) unless ``in_out``: then ``[in, out]`` (HF Conv1D)."""

    in_out = False

    def __init__(self):
        super().__init__()
        shape1, shape2 = ((D, H), (H, D)) if self.in_out else ((H, D), (D, H))
        self.w1 = nn.Parameter(torch.randn(shape1) / D**0.5)
        self.b1 = nn.Parameter(torch.randn(H) * 0.1)
        self.w2 = nn.Parameter(torch.randn(shape2) / H**0.5)
        self.b2 = nn.Parameter(torch.randn(D) * 0.1)

    def forward(self, x):
        return self.down(F.gelu(self.up(x))).pow(2).mean()


class ModuleLinear(_MLP):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(D, H), nn.Linear(H, D)
        del self.w1, self.b1, self.w2, self.b2

    def up(self, x):
        return self.l1(x)

    def down(self, h):
        return self.l2(h)


class FunctionalLinear(_MLP):
    def up(self, x):
        return F.linear(x, self.w1, self.b1)

    def down(self, h):
        return F.linear(h, self.w2, self.b2)


class MatmulTransposed(_MLP):  # x @ W.t() + b
    def up(self, x):
        return x @ self.w1.t() + self.b1

    def down(self, h):
        return torch.matmul(h, self.w2.T) + self.b2


class MatmulInOut(_MLP):  # torch.matmul(x, W) with W [in, out]
    in_out = True

    def up(self, x):
        return torch.matmul(x, self.w1) + self.b1

    def down(self, h):
        return h @ self.w2 + self.b2


class AddmmConv1D(_MLP):  # HF Conv1D: addmm(b, x.view(-1, in), W[in, out]).view(..., out)
    in_out = True

    def up(self, x):
        return torch.addmm(self.b1, x.view(-1, x.size(-1)), self.w1).view(*x.shape[:-1], H)

    def down(self, h):
        return torch.addmm(self.b2, h.view(-1, h.size(-1)), self.w2).view(*h.shape[:-1], D)


class EinsumInOut(_MLP):  # a parameter operand of einsum: no sharding rule, stays replicated
    in_out = True

    def up(self, x):
        return torch.einsum("btd,dh->bth", x, self.w1) + self.b1

    def down(self, h):
        return torch.einsum("bth,hd->btd", h, self.w2) + self.b2


class BaddbmmInOut(_MLP):  # baddbmm with a broadcast parameter: no sharding rule, stays replicated
    in_out = True

    def up(self, x):
        return torch.baddbmm(self.b1, x, self.w1.expand(x.shape[0], D, H))

    def down(self, h):
        return torch.baddbmm(self.b2, h, self.w2.expand(h.shape[0], H, D))


SHARDED = {  # spelling -> (up weight style/dim, down weight style/dim)
    ModuleLinear: (("l1.weight", "colwise", 0), ("l2.weight", "rowwise", 1)),
    FunctionalLinear: (("w1", "colwise", 0), ("w2", "rowwise", 1)),
    MatmulTransposed: (("w1", "colwise", 0), ("w2", "rowwise", 1)),
    MatmulInOut: (("w1", "colwise", 1), ("w2", "rowwise", 0)),
    AddmmConv1D: (("w1", "colwise", 1), ("w2", "rowwise", 0)),
}
REPLICATED = [EinsumInOut, BaddbmmInOut]
ALL = list(SHARDED) + REPLICATED


def make(cls, seed: int = 0):
    torch.manual_seed(seed)
    return cls(), torch.randn(2, 8, D, generator=torch.Generator().manual_seed(1))


def parity_all(rank: int, world: int) -> dict:
    """Loss and gradient error of every spelling against single device, on one gloo rank."""
    import copy

    import tpcompile
    from tpcompile.backend import shard_tensor

    out = {}
    for cls in ALL:
        model, x = make(cls)
        ref = copy.deepcopy(model)
        model = tpcompile.tp_compile(model, backend="aot_eager")
        loss, ref_loss = model(x), ref(x)
        loss.backward()
        ref_loss.backward()
        st = tpcompile.tp_state(model)
        refp = dict(ref.named_parameters())
        err = max((p.grad - shard_tensor(refp[f].grad, st.plan[f], rank, world)).abs().max().item()
                  for f, p in st.params.items())
        out[cls.__name__] = (loss.item(), ref_loss.item(), err, {f: pp.style for f, pp in st.plan.items()})
    return out
