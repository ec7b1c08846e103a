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


class EinsumInOut(_MLP):  # einsum with named batch dims, W [in, out]
    in_out = True

    def up(self, x):
        return torch.einsum("btd,dh->bth", x, self.w1) + self.b1

    def down(self, h):
        return torch.einsum("bth,hd->btd", h, self.w2) + self.b2


class EinsumOutIn(_MLP):  # einsum with an ellipsis, W [out, in]; then W first, operands as a list
    def up(self, x):
        return torch.einsum("...i,oi->...o", x, self.w1) + self.b1

    def down(self, h):
        return torch.einsum("oi,bti->bto", [self.w2, h]) + self.b2


class BaddbmmInOut(_MLP):  # baddbmm with the weight expanded over the batch
    in_out = True

    def up(self, x):
        return torch.baddbmm(self.b1, x, self.w1.expand(x.shape[0], D, H))

    def down(self, h):
        return torch.baddbmm(self.b2, h, self.w2.expand(h.shape[0], H, D))


class BmmBroadcast(_MLP):  # baddbmm with an expanded bias and W.unsqueeze(0).expand; bmm with W[None]
    in_out = True

    def up(self, x):
        b, t, _ = x.shape
        return torch.baddbmm(self.b1.expand(b, t, H), x, self.w1.unsqueeze(0).expand(b, -1, -1))

    def down(self, h):
        return torch.bmm(h, self.w2[None].expand(h.shape[0], H, D)) + self.b2


class Einsum3D(_MLP):  # per-head 3-D weights [D, heads, head_dim]: no rule, replicated with a warning
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(D, 4, H // 4) / D**0.5)
        self.w2 = nn.Parameter(torch.randn(4, H // 4, D) / H**0.5)

    def up(self, x):
        return torch.einsum("btd,dnk->btnk", x, self.w1) + self.b1.view(4, H // 4)

    def down(self, h):
        return torch.einsum("btnk,nkd->btd", h, self.w2) + self.b2


class FusedQKVGQA(nn.Module):
    """One fused projection for q (4 heads) and k, v (2 heads each): unequal pieces [16, 8, 8];
    kv heads repeated with ``repeat_interleave``; SDPA; output projection."""

    def __init__(self, dim=D, heads=4, kv_heads=2):
        super().__init__()
        self.h, self.kv, self.hd = heads, kv_heads, dim // heads
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.hd)
        self.o = nn.Linear(dim, D)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split([self.h * self.hd, self.kv * self.hd, self.kv * self.hd], dim=-1)
        q = q.view(B, T, self.h, self.hd).transpose(1, 2)
        k = k.view(B, T, self.kv, self.hd).transpose(1, 2).repeat_interleave(self.h // self.kv, dim=1)
        v = v.view(B, T, self.kv, self.hd).transpose(1, 2).repeat_interleave(self.h // self.kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, T, C)).pow(2).mean()


class SDPAEnableGQA(nn.Module):
    """Separate q/k/v projections, 4 q heads and 2 kv heads, SDPA's own ``enable_gqa``."""

    def __init__(self, heads=4, kv_heads=2):
        super().__init__()
        self.h, self.kv, self.hd = heads, kv_heads, D // heads
        self.q, self.k = nn.Linear(D, D), nn.Linear(D, kv_heads * self.hd)
        self.v, self.o = nn.Linear(D, kv_heads * self.hd), nn.Linear(D, D)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.h, self.hd).transpose(1, 2)
        k = self.k(x).view(B, T, self.kv, self.hd).transpose(1, 2)
        v = self.v(x).view(B, T, self.kv, self.hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(B, T, D)).pow(2).mean()


class FusedQKVReshapeUnbind(nn.Module):
    """ViT's attention (timm): one fused qkv projection reshaped pieces-first to (3, heads, head_dim),
    permuted to (3, B, heads, T, head_dim) and taken apart with ``unbind(0)``; SDPA; output projection."""

    def __init__(self, dim=D, heads=4):
        super().__init__()
        self.h = heads
        self.qkv, self.o = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def attend(self, qkv):
        q, k, v = qkv.unbind(0)
        return F.scaled_dot_product_attention(q, k, v)

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4)
        return self.o(self.attend(qkv).transpose(1, 2).reshape(B, T, C)).pow(2).mean()


class FusedQKVReshapeIndex(FusedQKVReshapeUnbind):
    """The same, taken apart by ``qkv[0], qkv[1], qkv[2]`` (older timm), attention written out."""

    def attend(self, qkv):
        q, k, v = qkv[0], qkv[1], qkv[2]
        return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1) @ v


SHARDED = {  # spelling -> (up weight style/dim, down weight style/dim)
    ModuleLinear: (("l1.weight", "colwise", 0), ("l2.weight", "rowwise", 1)),
    FunctionalLinear: (("w1", "colwise", 0), ("w2", "rowwise", 1)),
    MatmulTransposed: (("w1", "colwise", 0), ("w2", "rowwise", 1)),
    MatmulInOut: (("w1", "colwise", 1), ("w2", "rowwise", 0)),
    AddmmConv1D: (("w1", "colwise", 1), ("w2", "rowwise", 0)),
    EinsumInOut: (("w1", "colwise", 1), ("w2", "rowwise", 0)),
    EinsumOutIn: (("w1", "colwise", 0), ("w2", "rowwise", 1)),
    BaddbmmInOut: (("w1", "colwise", 1), ("w2", "rowwise", 0)),
    BmmBroadcast: (("w1", "colwise", 1), ("w2", "rowwise", 0)),
}
REPLICATED = [Einsum3D]
FUSED = [FusedQKVGQA, SDPAEnableGQA, FusedQKVReshapeUnbind, FusedQKVReshapeIndex]
ALL = list(SHARDED) + REPLICATED + FUSED


def make(cls, seed: int = 0):
    torch.manual_seed(seed)
    return cls(), torch.randn(2, 8, D, generator=torch.Generator().manual_seed(1))


def parity_all(rank: int, world: int, names: list | None = None) -> dict:
    """Loss and gradient error of every spelling against single device, on one gloo rank."""
    import copy

    import tpcompile
    from parity import grad_errors

    out = {}
    for cls in ALL:
        if names is not None and cls.__name__ not in names:
            continue
        torch._dynamo.reset()  # the MLPs share one forward: more than Dynamo's recompile limit of them
        model, x = make(cls)
        ref = copy.deepcopy(model)
        model = tpcompile.tp_compile(model, backend="aot_eager")
        loss, ref_loss = model(x), ref(x)
        loss.backward()
        ref_loss.backward()
        st = tpcompile.tp_state(model)
        err = max(grad_errors(model, ref, rank).values())
        out[cls.__name__] = (loss.item(), ref_loss.item(), err, {f: pp.style for f, pp in st.plan.items()})
    return out
