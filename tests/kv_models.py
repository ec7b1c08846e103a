"""Grouped-query attention with fewer kv heads than tp, in the spellings users write (kv-head copies).

Each model: a pre-norm attention block and an MLP over a tiny embedding / LM head, so the plan
has every kind around the copies (vocab-parallel embedding, column / row linears, kvcopy).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

V, D, HEADS = 96, 32, 8


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Hugging Face's ``repeat_kv``: (B, kv, T, hd) -> (B, kv * n_rep, T, hd) by expand + reshape."""
    b, kv, t, hd = x.shape
    return x[:, :, None, :, :].expand(b, kv, n_rep, t, hd).reshape(b, kv * n_rep, t, hd)


def _rope(x: torch.Tensor) -> torch.Tensor:
    """A rotary embedding over the head dim (pointwise with cos / sin, halves swapped by slicing)."""
    t, hd = x.shape[-2], x.shape[-1]
    ang = torch.arange(t, dtype=x.dtype)[:, None] * torch.arange(1, hd // 2 + 1, dtype=x.dtype)[None, :] / t
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    """``spelling``: "repeat_kv" (separate q / k / v with biases, HF's expand + reshape, attention
    written out), "enable_gqa" (separate, SDPA's own GQA), "repeat_interleave" (separate, no biases,
    ``repeat_interleave`` + SDPA), "fused" (one ``[q | k | v]`` projection cut by ``split``)."""

    def __init__(self, kv_heads: int, spelling: str):
        super().__init__()
        self.kv, self.hd, self.spelling = kv_heads, D // HEADS, spelling
        kvd = kv_heads * self.hd
        if spelling == "fused":
            self.qkv = nn.Linear(D, D + 2 * kvd, bias=False)
        else:
            bias = spelling == "repeat_kv"
            self.q, self.k, self.v = nn.Linear(D, D, bias=bias), nn.Linear(D, kvd, bias=bias), nn.Linear(D, kvd, bias=bias)
        self.o = nn.Linear(D, D, bias=False)

    def forward(self, x):
        B, T, _ = x.shape
        if self.spelling == "fused":
            q, k, v = self.qkv(x).split([D, self.kv * self.hd, self.kv * self.hd], dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = _rope(q.view(B, T, HEADS, self.hd).transpose(1, 2))
        k = _rope(k.view(B, T, self.kv, self.hd).transpose(1, 2))
        v = v.view(B, T, self.kv, self.hd).transpose(1, 2)
        n_rep = HEADS // self.kv
        if self.spelling == "repeat_kv":
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
            att = (q @ k.transpose(-2, -1)) / self.hd ** 0.5
            att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
            y = att @ v
        elif self.spelling == "enable_gqa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, T, D))


class TinyGQA(nn.Module):
    def __init__(self, kv_heads: int, spelling: str, layers: int = 2):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "n1": nn.RMSNorm(D), "attn": Attention(kv_heads, spelling), "n2": nn.RMSNorm(D),
            "up": nn.Linear(D, 2 * D, bias=False), "down": nn.Linear(2 * D, D, bias=False)}) for _ in range(layers))
        self.head = nn.Linear(D, V, bias=False)

    def forward(self, idx, targets):
        x = self.emb(idx)
        for b in self.blocks:
            x = x + b["attn"](b["n1"](x))
            x = x + b["down"](F.gelu(b["up"](b["n2"](x))))
        return F.cross_entropy(self.head(x).flatten(0, 1), targets.flatten())


def make(kv_heads: int, spelling: str, layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    model = TinyGQA(kv_heads, spelling, layers)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, V, (2, 8), generator=g), torch.randint(0, V, (2, 8), generator=g)) for _ in range(3)]
    return model, batches


SPELLINGS = ("repeat_kv", "enable_gqa", "repeat_interleave", "fused")


def train(rank: int, world: int, kv_heads: int, spelling: str, layers: int = 2, steps: int = 3) -> dict:
    """``steps`` AdamW steps with ``clip_grad_norm_`` (max norm below the gradients' norm, so it clips)
    of ``tp_compile(model)`` beside its untouched single-device copy, on one gloo rank."""
    import tpcompile
    from models_common import train_beside

    def report(tp, ref, out):
        st = tpcompile.tp_state(tp)
        out["kv_params"] = {f: p.to_local().detach().flatten().tolist() for f, p in st.params.named() if st.plan[f].kv}
        out["rows"] = {fqn: [(s.start, s.length) for s in pp.program_rows(rank)] for fqn, pp in st.plan.items() if pp.kv}
        out["collectives"] = [(phase, kind) for _, phase, kind in out["collectives"]]
        out["floor"] = [r.floor for r in st.records]

    model, batches = make(kv_heads, spelling, layers)
    return train_beside(rank, world, model, batches, lambda m, b: m(*b), steps=steps, lr=1e-2,
                        optimizer=torch.optim.AdamW, clip=0.5, report=report)
