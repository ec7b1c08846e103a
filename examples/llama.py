"""A small Llama-style language model, written the way a user writes one.

Hand-written RMSNorm, rotary position embeddings (rotate-half form, precomputed cos/sin
buffers), hand-written causal attention, SwiGLU MLP, untied LM head. Nothing in this file
knows about tensor parallelism.

    from llama import make_model
    model, (tokens, labels) = make_model()
    loss = model(tokens, labels)    # scalar cross-entropy
    logits = model(tokens)          # (B, T, vocab_size)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LlamaConfig:
    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    hidden_dim: int = 128  # SwiGLU inner size
    max_seq_len: int = 32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self._norm(x.float()).type_as(x)
        return output * self.weight


def precompute_rope(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    t = torch.arange(max_seq_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (max_seq_len, head_dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (max_seq_len, head_dim)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    # q, k: (B, n_heads, T, head_dim); cos, sin: (T, head_dim), broadcast over batch and heads
    q_out = (q * cos) + (rotate_half(q) * sin)
    k_out = (k * cos) + (rotate_half(k) * sin)
    return q_out.type_as(q), k_out.type_as(k)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        assert config.dim % config.n_heads == 0
        self.n_heads = config.n_heads
        self.head_dim = config.dim // config.n_heads
        self.q_proj = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.q_proj(x).view(bsz, seqlen, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, seqlen, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seqlen, self.n_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_emb(q, k, cos, sin)

        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, H, T, T)
        mask = torch.triu(torch.ones(seqlen, seqlen, dtype=torch.bool, device=x.device), diagonal=1)
        scores = scores.masked_fill(mask, float("-inf"))
        scores = F.softmax(scores.float(), dim=-1).type_as(q)
        out = scores @ v  # (B, H, T, head_dim)
        out = out.transpose(1, 2).contiguous().view(bsz, seqlen, -1)
        return self.o_proj(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden_dim, bias=False)
        self.up = nn.Linear(dim, hidden_dim, bias=False)
        self.down = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.hidden_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList([TransformerBlock(config) for _ in range(config.n_layers)])
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)

        cos, sin = precompute_rope(config.dim // config.n_heads, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        _bsz, seqlen = tokens.shape
        h = self.tok_embeddings(tokens)
        cos = self.rope_cos[:seqlen]
        sin = self.rope_sin[:seqlen]
        for layer in self.layers:
            h = layer(h, cos, sin)
        h = self.norm(h)
        logits = self.output(h).float()

        if labels is None:
            return logits
        loss_fn = nn.CrossEntropyLoss()
        return loss_fn(logits.view(-1, self.config.vocab_size), labels.view(-1))


def make_model(
    config: LlamaConfig | None = None,
    *,
    batch_size: int = 4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    **overrides,
) -> tuple[Llama, tuple[torch.Tensor, torch.Tensor]]:
    """Build a (tiny by default) Llama and example ``(tokens, labels)`` arguments.

    Weights and inputs depend only on ``seed`` (the global RNG is left as it was), so every
    process that calls this with the same arguments gets the same model and the same batch.
    ``device="meta"`` builds the model without memory (inputs stay on CPU). ``overrides`` replace
    fields of the config, e.g. ``make_model(n_layers=4)``.
    """
    config = replace(config or LlamaConfig(), **overrides)
    meta = torch.device(device).type == "meta"  # no memory: for explain / checkpoint loading
    with torch.random.fork_rng(devices=[]), torch.device("meta" if meta else "cpu"):
        torch.manual_seed(seed)
        model = Llama(config)
    model.to(device)
    device = "cpu" if meta else device
    g = torch.Generator().manual_seed(seed + 1)
    shape = (batch_size, config.max_seq_len)
    tokens = torch.randint(0, config.vocab_size, shape, generator=g).to(device)
    labels = torch.randint(0, config.vocab_size, shape, generator=g).to(device)
    return model, (tokens, labels)


if __name__ == "__main__":
    model, (tokens, labels) = make_model()
    loss = model(tokens, labels)
    loss.backward()
    n = sum(p.numel() for p in model.parameters())
    print(f"Llama {n} params, loss {loss.item():.4f} (ln V = {math.log(model.config.vocab_size):.4f})")
