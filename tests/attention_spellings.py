"""Tiny attention blocks, one per way of writing what attention does to head-sharded q/k/v:
rotary embeddings through complex numbers (Meta's llama reference, torchtitan), scores and
weighted values with ``einsum`` (heads before or after the sequence), ``einops.rearrange``
for the head split. Each must shard like ``F.scaled_dot_product_attention`` on ``view``-ed
heads: q/k/v column-parallel, the out-projection row-parallel, at the floor.

Importable so that spawned gloo ranks can build them (tests/test_attention_spellings.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

D, H, T = 32, 4, 8  # 4 heads of 8: tp = 2 and 4 both divide them
HD = D // H


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    """Meta's llama reference: complex rotations ``[end, dim // 2]``."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, device=freqs.device)
    freqs = torch.outer(t, freqs).float()
    return torch.polar(torch.ones_like(freqs), freqs)


def reshape_for_broadcast(freqs_cis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    shape = [d if i == 1 or i == x.ndim - 1 else 1 for i, d in enumerate(x.shape)]
    return freqs_cis.view(*shape)


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
    """Meta's llama reference ``apply_rotary_emb``, verbatim."""
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = reshape_for_broadcast(freqs_cis, xq_)
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


class _Block(nn.Module):
    """Separate q/k/v/o projections; ``attend(q, k, v)`` on ``[B, T, H, HD]`` tensors is the spelling."""

    def __init__(self):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):
        B, T_, _ = x.shape
        q, k, v = (f(x).view(B, T_, H, HD) for f in (self.wq, self.wk, self.wv))
        return self.wo(self.attend(q, k, v).reshape(B, T_, D)).pow(2).mean()


class ComplexRoPE(_Block):
    """``view_as_complex`` / complex ``*`` with a ``freqs_cis`` buffer / ``view_as_real``, then SDPA."""

    def __init__(self):
        super().__init__()
        self.register_buffer("freqs_cis", precompute_freqs_cis(HD, 2 * T), persistent=False)

    def attend(self, q, k, v):
        q, k = apply_rotary_emb(q, k, self.freqs_cis[: q.shape[1]])
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return y.transpose(1, 2)


class EinsumHeadsFirst(_Block):
    """``einsum('bhqd,bhkd->bhqk')``, softmax, ``einsum('bhqk,bhkd->bhqd')``."""

    def attend(self, q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        a = (torch.einsum("bhqd,bhkd->bhqk", q, k) / HD**0.5).softmax(-1)
        return torch.einsum("bhqk,bhkd->bhqd", a, v).transpose(1, 2)


class EinsumSeqFirst(_Block):
    """``einsum('bqhd,bkhd->bhqk')`` on un-transposed heads, back with ``'bhqk,bkhd->bqhd'``."""

    def attend(self, q, k, v):
        a = (torch.einsum("bqhd,bkhd->bhqk", q, k) / HD**0.5).softmax(-1)
        return torch.einsum("bhqk,bkhd->bqhd", a, v)


class EinopsEinsum(nn.Module):
    """``rearrange(x, 'b t (h d) -> b h t d', h=H)`` around einsum attention, and back."""

    def __init__(self):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):
        from einops import rearrange

        q, k, v = (rearrange(f(x), "b t (h d) -> b h t d", h=H) for f in (self.wq, self.wk, self.wv))
        a = torch.einsum("b h i d, b h j d -> b h i j", q, k).mul(HD**-0.5).softmax(-1)
        y = torch.einsum("...ij,...jd->...id", a, v)
        return self.wo(rearrange(y, "b h t d -> b t (h d)")).pow(2).mean()


ALL = [ComplexRoPE, EinsumHeadsFirst, EinsumSeqFirst, EinopsEinsum]


def make(cls, seed: int = 0):
    torch.manual_seed(seed)
    return cls(), torch.randn(2, T, D, generator=torch.Generator().manual_seed(1))


def train(rank: int, world: int, name: str) -> dict:
    """3 SGD steps of one block beside its single-device copy (``models_common.train_beside``)."""
    from models_common import train_beside

    model, x = make(globals()[name])
    batches = [x, x * 1.1, x[:, : T // 2] * 1.2]  # the last one another length: a dynamic-shape recompile
    batches = [b.requires_grad_() for b in batches]  # as a block inside a model: the f's backward all-reduce is live
    return train_beside(rank, world, model, batches, lambda m, b: m(b))
