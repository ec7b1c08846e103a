"""A seeded generator of small transformer LMs built from the constructs tpcompile claims, and the
differential check of one: the tp-compiled model against its untouched single-device copy.

``spec(seed)`` draws one model: sizes (some tp does not divide), each linear spelling, separate or
fused q/k/v (equal split, chunk, per-head interleaved, unequal GQA pieces, per-group interleaved,
``reshape(3, heads, hd)`` + ``unbind``), GQA / MQA, norms (LayerNorm, hand-written RMSNorm,
``F.rms_norm``), qk-norm, activations and gated MLPs (fused gate-up too), biases, pre-norm /
post-norm / parallel blocks, SDPA or hand-written attention, RoPE (full / partial) or learned
positions, checkpointed blocks, graph breaks (inside the block loop or before the head), dropout
(p = 0 or 0.1: every copy seeded the same, so the masks must be single device's), the loss's ``ignore_index`` / label smoothing / reduction, bf16 parameters or autocast,
``plan=`` overrides and sequence parallelism. ``run_case`` trains it for 2 SGD steps both ways
on one gloo rank and ``classify`` sorts the outcome:

    match    loss and every gradient equal single device's (tolerances below), ranks agree
    loud     a tpcompile error (``tpcompile.errors``: the message names the construct and fix), or
             a ``TPWarning`` fallback that still matches
    crash    any other exception: not silent, but not a clear error either (fails the test)
    silent   no error and a wrong number: the bug this exists to find (fails the test)

Tolerances (a silent TP bug is off by O(1): a missing all-reduce doubles or halves a value, a
wrong slice scrambles it): fp32: the loss within 1e-4 relative, each gradient within
1e-5 + 1e-3 * max|its single-device gradient|. bf16 parameters / autocast: the yardstick is an
fp32 copy of the model (the same values), and TP's error against it may be at most 4x single
device's own bf16 error against it, plus one bf16 epsilon (4e-3) of the loss / 2^-4 * max|gradient|
(16 epsilons: a gradient summed from per-rank partial sums that cancel, e.g. a norm weight's under
sequence parallelism, rounds each partial to bf16: seeds 3014 and 3032 were 4-6x single device's
error; the row-parallel partial sums under autocast moved seed 10305's loss 10x single device's
error). bf16 parameters are judged on the first step only: after an update rounded to bf16 the
two models are no longer the same point (seed 10320, step 1). Each of these matches in fp32.
"""
from __future__ import annotations

import copy
import math
import random
import traceback
import warnings
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as ckpt

SPELLINGS = ("module", "functional", "matmul", "einsum", "conv1d")
QKV = ("separate", "fused_split", "fused_chunk", "fused_per_head", "fused_gqa", "fused_per_group", "fused_reshape3")


@dataclass(frozen=True)
class Spec:
    seed: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn_mult: float
    layers: int
    qkv: str
    spellings: tuple  # (qkv / q, k, v, out, mlp in, mlp out) spelling of each projection
    bias: bool
    norm: str  # layernorm | rmsnorm | rms_norm_fn
    qk_norm: bool
    block: str  # pre | post | parallel
    mlp: str  # gelu | relu | swiglu | swiglu_fused
    attention: str  # sdpa | manual
    positions: str  # learned | rope | partial_rope | none
    tied: bool
    checkpoint: bool
    graph_break: str  # none | in_loop | before_head
    loss: tuple  # (ignore_index used, label_smoothing, reduction)
    dtype: str  # fp32 | bf16 | autocast
    plan: tuple  # ((pattern, style), ...)
    sequence_parallel: bool
    batch: int
    seq: int
    dropout: float  # p of the embedding / attention-output dropouts (p > 0: the masks must be single device's)
    moe: tuple = ()  # (experts, top-k, "ids" | "fallback", shared expert): the MLP is a MoE block (fp32 only)


def spec(seed: int) -> Spec:
    """One random model description; everything follows from ``seed``."""
    r = random.Random(seed)
    heads = r.choice((2, 4, 4, 8, 8, 6))  # 6: tp=4 does not divide it
    kv = r.choice([d for d in range(1, heads + 1) if heads % d == 0])
    if r.random() < 0.4:
        kv = heads
    head_dim = r.choice((4, 8))
    qkv = r.choice(("separate", "fused_gqa", "fused_per_group") if kv < heads else
                   tuple(q for q in QKV if q != "fused_gqa"))
    layers = r.choice((1, 2))
    plan = ()
    tied = r.random() < 0.3
    if r.random() < 0.15:
        plan = ((r.choice(("blocks.0.mlp.*", "blocks.0.attn.*", "blocks.*.mlp.up") + (() if tied else ("head",))),
                 "replicate"),)
    mlp = r.choice(("gelu", "relu", "swiglu", "swiglu_fused"))
    dtype = r.choices(("fp32", "bf16", "autocast"), (0.8, 0.1, 0.1))[0]
    if dtype != "fp32" and mlp == "relu":  # a rounding difference flips relu's derivative: O(1), not a TP bug
        mlp = "gelu"
    spec_ = Spec(
        seed=seed, vocab=r.randint(40, 130), heads=heads, kv_heads=kv, head_dim=head_dim,
        ffn_mult=r.choice((2, 4, 4, 1.5)), layers=layers, qkv=qkv,
        spellings=tuple(r.choice(SPELLINGS) for _ in range(6)), bias=r.random() < 0.5,
        norm=r.choice(("layernorm", "rmsnorm", "rms_norm_fn")), qk_norm=r.random() < 0.25,
        block=r.choice(("pre", "pre", "post", "parallel")), mlp=mlp,
        attention=r.choice(("sdpa", "manual")), positions=r.choice(("learned", "rope", "partial_rope", "none")),
        tied=tied, checkpoint=r.random() < 0.2,
        graph_break=r.choices(("none", "in_loop", "before_head"), (0.7, 0.15, 0.15))[0],
        loss=(r.random() < 0.5, r.choice((0.0, 0.0, 0.1)), r.choice(("mean", "mean", "sum"))),
        dtype=dtype, plan=plan,
        sequence_parallel=r.random() < 0.25, batch=r.choice((1, 2, 3)), seq=r.choice((8, 8, 12, 6)),
        dropout=r.choice((0.0, 0.0, 0.1)),  # drawn last: the other fields of a seed stay as they were
        # then the MoE block (fp32: a bf16 router's near-ties may route a token elsewhere, O(1), not a TP bug)
        moe=(r.choice((2, 4)), r.choice((1, 2)), r.choice(("ids", "fallback")), r.random() < 0.5)
        if r.random() < 0.3 and dtype == "fp32" else (),
    )
    if spec_.moe and plan == (("blocks.*.mlp.up", "replicate"),):  # a MoE block has no `up`: its experts instead
        spec_ = replace(spec_, plan=(("blocks.*.mlp.*", "replicate"),))
    return spec_


# ---------------------------------------------------------------------------------------- the model
class Proj(nn.Module):
    """A linear ``in -> out`` in one of the spellings users write."""

    def __init__(self, d_in: int, d_out: int, bias: bool, spelling: str):
        super().__init__()
        self.spelling = spelling
        shape = (d_in, d_out) if spelling == "conv1d" else (d_out, d_in)  # GPT-2's Conv1D is [in, out]
        self.weight = nn.Parameter(torch.randn(shape) / math.sqrt(d_in))
        self.bias = nn.Parameter(0.1 * torch.randn(d_out)) if bias else None

    def forward(self, x):
        w, b, s = self.weight, self.bias, self.spelling
        if s in ("module", "functional"):
            return F.linear(x, w, b)
        if s == "conv1d":
            out = x.reshape(-1, x.shape[-1])
            out = torch.addmm(b, out, w) if b is not None else out @ w
            return out.view(*x.shape[:-1], w.shape[1])
        y = x @ w.t() if s == "matmul" else torch.einsum("...i,oi->...o", x, w)
        return y + b if b is not None else y


def linear(d_in: int, d_out: int, bias: bool, spelling: str) -> nn.Module:
    return nn.Linear(d_in, d_out, bias=bias) if spelling == "module" else Proj(d_in, d_out, bias, spelling)


class RMSNorm(nn.Module):
    def __init__(self, d: int, fn: bool):
        super().__init__()
        self.fn, self.weight = fn, nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x):
        if self.fn:
            return F.rms_norm(x, (x.shape[-1],), self.weight, 1e-6)
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def norm(s: Spec, d: int) -> nn.Module:
    if s.norm == "layernorm":
        n = nn.LayerNorm(d)
        with torch.no_grad():
            n.weight.add_(0.1 * torch.randn(d))
            n.bias.add_(0.1 * torch.randn(d))
        return n
    return RMSNorm(d, s.norm == "rms_norm_fn")


def rotate(x, cos, sin, rot: int):
    """Rotate-half RoPE on the first ``rot`` features of the last dim (partial rotary when < hd)."""
    xr, xp = x[..., :rot], x[..., rot:]
    half = rot // 2
    x1, x2 = xr[..., :half], xr[..., half:]
    out = xr * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((out, xp), dim=-1) if rot < x.shape[-1] else out


class Attention(nn.Module):
    def __init__(self, s: Spec):
        super().__init__()
        self.s = s
        H, KV, hd = s.heads, s.kv_heads, s.head_dim
        C = H * hd
        sp = s.spellings
        if s.qkv == "separate":
            self.q, self.k, self.v = (linear(C, H * hd, s.bias, sp[0]), linear(C, KV * hd, s.bias, sp[1]),
                                      linear(C, KV * hd, s.bias, sp[2]))
        else:
            self.qkv = linear(C, (H + 2 * KV) * hd, s.bias, sp[0])
        self.o = linear(C, C, s.bias, sp[3])
        if s.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(hd, False), RMSNorm(hd, False)
        self.rot = {"rope": hd, "partial_rope": hd // 2}.get(s.positions, 0)
        if self.rot:
            inv = 1.0 / (10000 ** (torch.arange(0, self.rot, 2).float() / self.rot))
            f = torch.outer(torch.arange(64).float(), inv)
            emb = torch.cat((f, f), dim=-1)
            self.register_buffer("cos", emb.cos(), persistent=False)
            self.register_buffer("sin", emb.sin(), persistent=False)

    def qkv_heads(self, x):
        """q [B, T, H, hd], k and v [B, T, KV, hd], in the layout the spec names."""
        s, (B, T, _) = self.s, x.shape
        H, KV, hd = s.heads, s.kv_heads, s.head_dim
        if s.qkv == "separate":
            return self.q(x).view(B, T, H, hd), self.k(x).view(B, T, KV, hd), self.v(x).view(B, T, KV, hd)
        y = self.qkv(x)
        if s.qkv == "fused_split":
            q, k, v = y.split(H * hd, dim=2)
        elif s.qkv == "fused_chunk":
            q, k, v = y.chunk(3, dim=-1)
        elif s.qkv == "fused_gqa":
            q, k, v = y.split([H * hd, KV * hd, KV * hd], dim=-1)
        elif s.qkv == "fused_per_head":  # GPT-NeoX: [heads, 3 * hd]
            q, k, v = y.view(B, T, H, 3 * hd).split(hd, dim=-1)
            return q, k, v
        elif s.qkv == "fused_per_group":  # litgpt: [groups, (q per group + 2) * hd]
            rep = H // KV
            g = y.view(B, T, KV, rep + 2, hd)
            q, k, v = g.split((rep, 1, 1), dim=3)
            return q.reshape(B, T, H, hd), k.reshape(B, T, KV, hd), v.reshape(B, T, KV, hd)
        else:  # fused_reshape3, timm: reshape(B, T, 3, H, hd) + permute + unbind
            q, k, v = y.reshape(B, T, 3, H, hd).permute(2, 0, 1, 3, 4).unbind(0)
            return q, k, v
        return q.view(B, T, H, hd), k.view(B, T, KV, hd), v.view(B, T, KV, hd)

    def forward(self, x):
        s, (B, T, C) = self.s, x.shape
        q, k, v = self.qkv_heads(x)
        if s.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.rot:
            cos, sin = self.cos[:T], self.sin[:T]
            q, k = rotate(q, cos, sin, self.rot), rotate(k, cos, sin, self.rot)
        rep = s.heads // s.kv_heads
        if rep > 1:  # repeat_kv as HF writes it
            k = k[:, :, None].expand(B, s.kv_heads, rep, T, s.head_dim).reshape(B, s.heads, T, s.head_dim)
            v = v[:, :, None].expand(B, s.kv_heads, rep, T, s.head_dim).reshape(B, s.heads, T, s.head_dim)
        if s.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(s.head_dim))
            mask = torch.triu(torch.ones(T, T, dtype=torch.bool, device=x.device), 1)
            y = att.masked_fill(mask, float("-inf")).softmax(dim=-1) @ v
        y = y.transpose(1, 2).reshape(B, T, C)
        return F.dropout(self.o(y), s.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, s: Spec):
        super().__init__()
        C = s.heads * s.head_dim
        self.s, F_ = s, int(C * s.ffn_mult)
        gated = s.mlp.startswith("swiglu")
        if s.mlp == "swiglu_fused":
            self.up = linear(C, 2 * F_, s.bias, s.spellings[4])
        else:
            self.up = linear(C, F_, s.bias, s.spellings[4])
            if gated:
                self.gate = linear(C, F_, s.bias, s.spellings[4])
        self.down = linear(F_, C, s.bias, s.spellings[5])

    def forward(self, x):
        m = self.s.mlp
        if m == "swiglu_fused":
            g, u = self.up(x).chunk(2, dim=-1)
            h = F.silu(g) * u
        elif m == "swiglu":
            h = F.silu(self.gate(x)) * self.up(x)
        else:
            h = F.gelu(self.up(x)) if m == "gelu" else torch.relu(self.up(x))
        return self.down(h)


class MoE(nn.Module):
    """Experts as 3-D parameters (gate|up ``[E, 2F, C]``, down ``[E, C, F]``), a top-k router, spelled as HF's
    ``"batched_mm"`` (``bmm(W[ids], x[..., None])``) or its ``"grouped_mm"`` (tokens sorted by expert, ``histc`` /
    ``cumsum`` offsets, ``transformers::grouped_mm_fallback``, un-permuted), an optional shared expert."""

    def __init__(self, s: Spec):
        super().__init__()
        C = s.heads * s.head_dim
        self.s, F_ = s, int(C * s.ffn_mult)
        E = s.moe[0]
        self.router = nn.Linear(C, E, bias=False)
        self.gate_up = nn.Parameter(torch.randn(E, 2 * F_, C) / math.sqrt(C))
        self.down = nn.Parameter(torch.randn(E, C, F_) / math.sqrt(F_))
        self.shared = MLP(s) if s.moe[3] else None
        if s.moe[2] == "fallback":
            import transformers.integrations.moe  # noqa: F401 - registers transformers::grouped_mm_fallback

    def forward(self, x):
        E, k, how, _ = self.s.moe
        B, T, C = x.shape
        h = x.reshape(-1, C)
        w, ids = torch.topk(self.router(h).softmax(-1), k, dim=-1)
        flat, wf = ids.reshape(-1), w.reshape(-1)
        if how == "ids":
            xs = h.repeat_interleave(k, dim=0)
            g, u = torch.bmm(self.gate_up[flat], xs.unsqueeze(-1)).squeeze(-1).chunk(2, dim=-1)
            o = torch.bmm(self.down[flat], (F.silu(g) * u).unsqueeze(-1)).squeeze(-1) * wf.unsqueeze(-1)
        else:
            mm = torch.ops.transformers.grouped_mm_fallback
            sorted_ids, perm = torch.sort(flat)
            offs = torch.cumsum(torch.histc(sorted_ids.float(), bins=E, min=0, max=E - 1), dim=0, dtype=torch.int32)
            g, u = mm(h[perm // k], self.gate_up.transpose(-2, -1), offs).chunk(2, dim=-1)
            o = mm(F.silu(g) * u, self.down.transpose(-2, -1), offs) * wf[perm].unsqueeze(-1)
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(perm.size(0), device=perm.device)
            o = o[inv]
        o = o.view(-1, k, C).sum(dim=1)
        if self.shared is not None:
            o = o + self.shared(h)
        return o.view(B, T, C)


class Block(nn.Module):
    def __init__(self, s: Spec):
        super().__init__()
        C = s.heads * s.head_dim
        self.s, self.attn, self.mlp = s, Attention(s), (MoE(s) if s.moe else MLP(s))
        self.n1, self.n2 = norm(s, C), norm(s, C)

    def forward(self, x):
        if self.s.block == "pre":
            x = x + self.attn(self.n1(x))
            return x + self.mlp(self.n2(x))
        if self.s.block == "post":
            x = self.n1(x + self.attn(x))
            return self.n2(x + self.mlp(x))
        h = self.n1(x)  # parallel residual (GPT-J / Falcon)
        return x + self.attn(h) + self.mlp(h)


class FuzzLM(nn.Module):
    def __init__(self, s: Spec):
        super().__init__()
        C = s.heads * s.head_dim
        self.s = s
        self.wte = nn.Embedding(s.vocab, C)
        if s.positions == "learned":
            self.wpe = nn.Embedding(64, C)
        self.blocks = nn.ModuleList(Block(s) for _ in range(s.layers))
        self.ln_f = norm(s, C)
        if not s.tied:
            self.head = nn.Linear(C, s.vocab, bias=False)

    def forward(self, idx, labels):
        s, T = self.s, idx.shape[1]
        x = self.wte(idx)
        if s.positions == "learned":
            x = x + self.wpe(torch.arange(T, device=idx.device))
        x = F.dropout(x, s.dropout, self.training)
        for b in self.blocks:
            x = ckpt.checkpoint(b, x, use_reentrant=False) if s.checkpoint else b(x)
            if s.graph_break == "in_loop":
                torch._dynamo.graph_break()
        if s.graph_break == "before_head":
            torch._dynamo.graph_break()
        x = self.ln_f(x)
        logits = F.linear(x, self.wte.weight) if s.tied else self.head(x)
        _, smoothing, reduction = s.loss
        return F.cross_entropy(logits.float().view(-1, s.vocab), labels.view(-1), ignore_index=-100,
                               label_smoothing=smoothing, reduction=reduction)


def build(s: Spec) -> FuzzLM:
    torch.manual_seed(s.seed)
    model = FuzzLM(s)
    return model.to(torch.bfloat16) if s.dtype == "bf16" else model


def batches(s: Spec, n: int = 2) -> list:
    g = torch.Generator().manual_seed(s.seed + 1)
    out = []
    for _ in range(n):
        idx = torch.randint(0, s.vocab, (s.batch, s.seq), generator=g)
        labels = torch.randint(0, s.vocab, (s.batch, s.seq), generator=g)
        if s.loss[0]:
            labels[:, :2] = -100
        out.append((idx, labels))
    return out


# ---------------------------------------------------------------------------------------- one case
def run_case(rank: int, world: int, seed: int, backend: str = "aot_eager", s: Spec | None = None) -> dict:
    """Train the seed's model (or the model ``s`` describes) tp-compiled and on one device for 2 SGD
    steps on this gloo rank."""
    import torch._dynamo

    import tpcompile
    from parity import stored_slice

    s = s or spec(seed)
    out = {"seed": seed, "world": world, "dtype": s.dtype, "loss": [], "ref_loss": [], "grad_err": [], "warnings": [],
           "error": None, "error_type": None, "loud": False, "plan": {}}
    try:
        model = build(s)
        ref = copy.deepcopy(model)
        # bf16 / autocast: the yardstick is an fp32 copy (same values); TP's error against it is
        # compared with single device's own bf16 error, not with a fixed tolerance
        ref32 = copy.deepcopy(model).float() if s.dtype != "fp32" else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tp = tpcompile.tp_compile(model, backend=backend, plan=dict(s.plan) or None,
                                      sequence_parallel=s.sequence_parallel)
            models = [m for m in (tp, ref, ref32) if m is not None]
            opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
            ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if s.dtype == "autocast" else \
                (lambda: torch.autocast("cpu", enabled=False))
            for idx, labels in batches(s):
                losses = []
                for m in models:
                    torch.manual_seed(1000 * seed + len(out["loss"]))  # the same dropout masks for each copy
                    with ctx() if m is not ref32 else torch.autocast("cpu", enabled=False):
                        losses.append(m(idx, labels))
                    losses[-1].backward()
                refps = [dict(m.named_parameters()) for m in models[1:]]
                errs = {}
                for fqn, p in tpcompile.tp_state(tp).params.named():
                    full = [rp[fqn].grad for rp in refps]
                    if p.grad is None and all(g is None for g in full):
                        continue
                    full = [torch.zeros_like(rp[fqn]) if g is None else g for g, rp in zip(full, refps)]
                    mine = p.grad.to_local().float() if p.grad is not None else torch.zeros_like(p.to_local()).float()
                    cut = [stored_slice(tp, fqn, g, rank).float() for g in full]
                    # (tp vs the yardstick, single device vs it (bf16 only), the yardstick's max |grad|)
                    errs[fqn] = ((mine - cut[-1]).abs().max().item(),
                                 (cut[0] - cut[-1]).abs().max().item() if len(cut) > 1 else 0.0,
                                 full[-1].abs().max().item())
                out["grad_err"].append(errs)
                out["loss"].append(losses[0].item())
                out["ref_loss"].append([l.item() for l in losses[1:]])
                for o in opts:
                    o.step()
                    o.zero_grad()
        out["warnings"] = [str(w.message)[:1000] for w in caught if issubclass(w.category, tpcompile.TPWarning)]
        out["plan"] = {fqn: pp.style for fqn, pp in tpcompile.tp_state(tp).plan.items()}
    except Exception as e:  # noqa: BLE001 - classified below
        from tpcompile import errors

        loud = tuple(getattr(errors, n) for n in errors.__all__ if n != "TPWarning")
        inner = getattr(e, "inner_exception", None) or e
        out["error_type"] = type(inner).__name__
        out["loud"] = isinstance(inner, loud)
        out["error"] = str(inner)[:600] if out["loud"] else traceback.format_exc()[-2000:]
    finally:
        torch._dynamo.reset()
    return out


def run_many(rank: int, world: int, seeds: list, backend: str = "aot_eager") -> list:
    return [run_case(rank, world, seed, backend) for seed in seeds]


def classify(by_rank: list) -> tuple[str, str]:
    """(outcome, why) of one case from every rank's ``run_case`` result."""
    r0 = by_rank[0]
    if any(r["error"] for r in by_rank):
        r = next(r for r in by_rank if r["error"])
        return ("loud" if all(x["loud"] for x in by_rank if x["error"]) else "crash"), f"{r['error_type']}: {r['error']}"
    dtype = r0.get("dtype") or spec(r0["seed"]).dtype
    low = dtype != "fp32"
    for rank, r in enumerate(by_rank):
        if r["loss"] != r0["loss"]:
            return "silent", f"rank {rank} loss {r['loss']} != rank 0's {r0['loss']}"
        steps = 1 if dtype == "bf16" else len(r["loss"])  # bf16 updates round differently: judge step 0
        for step, (a, refs) in enumerate(zip(r["loss"][:steps], r["ref_loss"])):
            b = refs[-1]
            ok = abs(a - b) <= (4 * abs(refs[0] - b) + 4e-3 * abs(b) if low else 1e-4 * max(abs(b), 1e-6))
            if not ok:
                return "silent", f"rank {rank} step {step}: loss {a} vs single device {refs}"
        for step, errs in enumerate(r["grad_err"][:steps]):
            for fqn, (err, ref_err, scale) in errs.items():
                if not err <= (4 * ref_err + 2 ** -4 * scale if low else 1e-5 + 1e-3 * scale):
                    return "silent", (f"rank {rank} step {step}: grad of {fqn} off by {err:.3g} (max |grad| {scale:.3g}"
                                      + (f"; single device's bf16 error {ref_err:.3g})" if low else ")"))
    return ("loud" if r0["warnings"] else "match"), "; ".join(r0["warnings"])[:300]


REPRO = '''"""Repro of fuzz case seed={seed} at TP={world}: {outcome}: {why}

    python {path}
"""
import os
import sys

sys.path[:0] = [{tests!r}, {examples!r}]
from fuzz_models import classify, run_many, spec
from multirank import run_ranks

if __name__ == "__main__":
    print(spec({seed}))
    by_rank = run_ranks(run_many, {world}, [{seed}])
    print(classify([r[0] for r in by_rank]))
'''


def write_repro(directory: str, seed: int, world: int, outcome: str, why: str) -> str:
    """A standalone script that rebuilds and reruns one case; returns its path."""
    import os

    tests = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(directory, f"fuzz_repro_seed{seed}_tp{world}.py")
    with open(path, "w") as f:
        f.write(REPRO.format(seed=seed, world=world, outcome=outcome, why=why.replace('"""', "'''")[:500],
                             path=path, tests=tests, examples=os.path.join(os.path.dirname(tests), "examples")))
    return path


def describe(seed: int) -> dict:
    return asdict(spec(seed))
