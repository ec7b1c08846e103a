"""Checkpoints (issue 7): meta-device init, per-rank safetensors slices, DTensor state dicts, DCP reshard.

Multi-rank checks run on gloo ranks; the errors run in this process (plain model or fake group).
"""
from __future__ import annotations

import functools
import json
import math
import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import gpt
import tpcompile
from fakepg import fake_group
from multirank import run_ranks_bytes as _ranks, to_bytes as _out
from parity import local_numel, stored_slice
from tpcompile.checkpoint import TPCheckpointError, optim_state_dict, reset_parameters


V_ODD = 250  # a vocabulary TP=4 does not divide: padded to 252

# ----------------------------------------------------------------------------- helpers (run on ranks)
def _gpt_sweeps(model: gpt.GPT) -> list:
    """GPT's own init as per-module sweeps: construction resets, ``_init_weights``, scaled projections."""
    names = {id(m): n for n, m in model.named_modules()}
    std = 0.02 / math.sqrt(2 * model.config.n_layer)

    def scaled(m):
        if names[id(m)].endswith(("attn.o_proj", "mlp.proj")):
            torch.nn.init.normal_(m.weight, mean=0.0, std=std)

    return [reset_parameters, model._init_weights, scaled]


def _meta_gpt(example, vocab_size: int = 256, **kw) -> gpt.GPT:
    with torch.device("meta"):
        model = gpt.GPT(gpt.GPTConfig(vocab_size=vocab_size))
    init = _gpt_sweeps(model) if kw.pop("init", False) else None
    return tpcompile.tp_compile(model, example_inputs=example, init_weights=init, backend="aot_eager", **kw)


class FusedLM(nn.Module):
    """nanoGPT-style fused projections: ``qkv`` split in 3 and ``up`` chunked in 2 (strided shards)."""

    def __init__(self, C: int = 32, H: int = 4, V: int = 64):
        super().__init__()
        self.emb, self.ln, self.qkv = nn.Embedding(V, C), nn.LayerNorm(C), nn.Linear(C, 3 * C)
        self.o, self.ln2, self.up = nn.Linear(C, C), nn.LayerNorm(C), nn.Linear(C, 4 * C)
        self.down, self.head, self.H, self.V = nn.Linear(2 * C, C), nn.Linear(C, V, bias=False), H, V

    def forward(self, x, y):
        h = self.emb(x)
        B, T, C = h.shape
        q, k, v = self.qkv(self.ln(h)).split(C, dim=2)
        q, k, v = [t.view(B, T, self.H, C // self.H).transpose(1, 2) for t in (q, k, v)]
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.o(a.transpose(1, 2).contiguous().view(B, T, C))
        g, u = self.up(self.ln2(h)).chunk(2, dim=-1)
        h = h + self.down(torch.nn.functional.silu(g) * u)
        return torch.nn.functional.cross_entropy(self.head(h).view(-1, self.V), y.view(-1))


def _fused_ref() -> FusedLM:
    with torch.random.fork_rng():
        torch.manual_seed(5)
        return FusedLM()


def _fused(meta: bool) -> nn.Module:
    """FusedLM tp-compiled and planned (example inputs), built either seeded or on meta."""
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    if meta:
        with torch.device("meta"):
            m = FusedLM()
    else:
        m = _fused_ref()
    return tpcompile.tp_compile(m, example_inputs=(x, x), backend="aot_eager")


def _gathered_optim(model, opt) -> dict:
    out = {}
    for fqn, s in optim_state_dict(model, opt)["state"].items():
        out[fqn] = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in s.items()}
    return out


def _meta_init_worker(rank: int, world: int) -> dict:
    _, (x, y) = gpt.make_model()
    torch.manual_seed(0)
    model = _meta_gpt((x, y), init=True)
    rng_after = torch.get_rng_state()
    st = tpcompile.tp_state(model)
    shapes = {n: (tuple(p.to_local().shape), st.plan[n].stored_shape(rank), p.device.type)
              for n, p in model.named_parameters()}
    loss = model(x, y).item()
    return _out({"full": tpcompile.full_state_dict(model, rank0_only=False), "rng": rng_after, "shapes": shapes,
            "loss": loss})


def _save_worker(rank: int, world: int, path: str) -> dict:
    _, (x, y) = gpt.make_model(vocab_size=V_ODD)
    model = _meta_gpt((x, y), vocab_size=V_ODD)  # 250 rows at TP=4: 63 per rank, the last 2 are padding
    tpcompile.load_checkpoint(model, os.path.join(path, "ref.safetensors"))
    loaded = tpcompile.full_state_dict(model)
    wte = model.wte.weight.to_local().detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)  # the same stream on every rank: replicated grads agree
    for fqn, p in model.named_parameters():
        full = torch.randn(p.shape, generator=g)
        p.grad = torch.distributed.tensor.DTensor.from_local(stored_slice(model, fqn, full, rank), p.device_mesh,
                                                             p.placements, shape=p.shape, stride=p.stride())
    opt.step()  # AdamW state (exp_avg, exp_avg_sq: shards; step: scalar) without compiling anything
    tpcompile.save_checkpoint(model, os.path.join(path, "gpt"), optimizer=opt)
    fused = _fused(meta=False)
    tpcompile.save_checkpoint(fused, os.path.join(path, "fused"))
    sd = model.state_dict()
    placements = {k: [repr(p) for p in v.placements] for k, v in sd.items() if hasattr(v, "placements")}
    fused_dt = fused.state_dict()["qkv.weight"]
    fused_plan = {k: (pp.style, pp.chunks) for k, pp in tpcompile.tp_state(fused).plan.items()}
    return _out({"full": tpcompile.full_state_dict(model), "optim": _gathered_optim(model, opt),
                 "placements": placements, "loaded": loaded, "wte": wte,
                 "wte_plan": tuple(tpcompile.tp_state(model).plan["wte.weight"].__dict__.values()),
                 "fused": tpcompile.full_state_dict(fused), "fused_dtensor_full": fused_dt.full_tensor(),
                 "fused_placement": repr(fused_dt.placements[0]), "fused_plan": fused_plan})


def _load_worker(rank: int, world: int, path: str) -> dict:
    _, (x, y) = gpt.make_model(vocab_size=V_ODD)
    model = _meta_gpt((x, y), vocab_size=V_ODD)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # lr is restored from the checkpoint
    tpcompile.load_checkpoint(model, os.path.join(path, "gpt"), optimizer=opt)
    fused = _fused(meta=True)
    tpcompile.load_checkpoint(fused, os.path.join(path, "fused"))
    return _out({"full": tpcompile.full_state_dict(model), "optim": _gathered_optim(model, opt),
            "lr": opt.param_groups[0]["lr"], "fused": tpcompile.full_state_dict(fused),
            "fused_local": fused.qkv.weight.to_local().detach().clone()})


def _safetensors_worker(rank: int, world: int, path: str) -> dict:
    _, (x, y) = gpt.make_model()
    model = _meta_gpt((x[:1, :8].clone(), y[:1, :8].clone()))  # plan on a small batch, run on (4, 32)
    try:
        model(x, y)
        unloaded = "no error"
    except RuntimeError as e:
        unloaded = str(e)
    tpcompile.checkpoint.safetensors_io._BLOCK_BYTES = 300  # read in blocks of one or two rows: the blocking must be exact
    tpcompile.load_checkpoint(model, os.path.join(path, "model.safetensors"))
    numel = local_numel(model)
    loss = model(x, y).item()
    out = os.path.join(path, "resaved")
    tpcompile.save_checkpoint(model, out, format="safetensors")
    fused = _fused(meta=True)
    tpcompile.load_checkpoint(fused, os.path.join(path, "fused.safetensors"))
    return _out({"loss": loss, "full": tpcompile.full_state_dict(model), "unloaded": unloaded, "numel": numel,
            "fused": tpcompile.full_state_dict(fused)})


class EveryLayout(nn.Module):
    """One parameter of every layout kind at TP=2: a GQA fused qkv of unequal pieces (q 64 | k 32 | v 32),
    a gate-up of equal pieces, a padded vocabulary (63 rows), plain column / row, replicated norms and biases,
    kv-head copies (a second attention with one kv head: k2 / v2 stored whole, each rank's program takes it);
    and MoE experts as 3-D tensors (``[E, 2I, C]`` gate|up split on dim 1 in two pieces, ``[E, C, I]`` on dim 2),
    and a second MoE's experts held whole (``plan`` style ``expert``: each rank E / tp experts, dim 0)."""

    def __init__(self, C: int = 64, H: int = 8, KV: int = 4, V: int = 63, E: int = 4, I: int = 32):
        super().__init__()
        self.router = nn.Linear(C, E, bias=False)
        self.experts_gate_up = nn.Parameter(torch.randn(E, 2 * I, C) * C ** -0.5)
        self.experts_down = nn.Parameter(torch.randn(E, C, I) * I ** -0.5)
        self.router2 = nn.Linear(C, E, bias=False)
        self.ep_gate_up = nn.Parameter(torch.randn(E, 2 * I, C) * C ** -0.5)
        self.ep_down = nn.Parameter(torch.randn(E, C, I) * I ** -0.5)
        self.H, self.KV, self.hd, self.V = H, KV, C // H, V
        self.emb, self.ln = nn.Embedding(V, C), nn.LayerNorm(C)
        self.qkv, self.o = nn.Linear(C, C + 2 * KV * (C // H)), nn.Linear(C, C)
        self.up, self.down = nn.Linear(C, 4 * C), nn.Linear(2 * C, C)
        self.q2, self.k2, self.v2, self.o2 = nn.Linear(C, C), nn.Linear(C, C // H, bias=False), nn.Linear(C, C // H), nn.Linear(C, C)
        self.head = nn.Linear(C, V, bias=False)

    def forward(self, x, y):
        h = self.emb(x)
        B, T, C = h.shape
        q, k, v = self.qkv(self.ln(h)).split([C, self.KV * self.hd, self.KV * self.hd], dim=-1)
        q = q.view(B, T, self.H, self.hd).transpose(1, 2)
        k, v = [t.view(B, T, self.KV, self.hd).transpose(1, 2) for t in (k, v)]
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        h = h + self.o(a.transpose(1, 2).reshape(B, T, C))
        q = self.q2(h).view(B, T, self.H, self.hd).transpose(1, 2)
        k, v = [t.view(B, T, 1, self.hd).transpose(1, 2) for t in (self.k2(h), self.v2(h))]
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        h = h + self.o2(a.transpose(1, 2).reshape(B, T, C))
        g, u = self.up(h).chunk(2, dim=-1)
        h = h + self.down(torch.nn.functional.silu(g) * u)
        h = h + self._moe(h, self.router, self.experts_gate_up, self.experts_down)
        h = h + self._moe(h, self.router2, self.ep_gate_up, self.ep_down)
        return torch.nn.functional.cross_entropy(self.head(h).view(-1, self.V), y.view(-1))

    def _moe(self, h, router, gate_up, down):
        """Top-2 routing, every token's experts gathered and applied by ``bmm``, the weighted sum."""
        x = h.reshape(-1, h.shape[-1])
        w, ids = torch.topk(router(x).softmax(-1), 2, dim=-1)
        ids = ids.reshape(-1)
        gu = torch.bmm(gate_up[ids], x.repeat_interleave(2, dim=0).unsqueeze(-1)).squeeze(-1)
        g, u = gu.chunk(2, dim=-1)
        out = torch.bmm(down[ids], (torch.nn.functional.silu(g) * u).unsqueeze(-1)).squeeze(-1)
        return (out * w.reshape(-1, 1)).view(-1, 2, h.shape[-1]).sum(1).reshape(h.shape)


def _every_layout(meta: bool) -> nn.Module:
    x = torch.randint(0, 63, (2, 8), generator=torch.Generator().manual_seed(0))
    if meta:
        with torch.device("meta"):
            m = EveryLayout()
    else:
        with torch.random.fork_rng():
            torch.manual_seed(11)
            m = EveryLayout()
    return tpcompile.tp_compile(m, example_inputs=(x, x), backend="aot_eager", plan={"ep_*": "expert"})


def _every_layout_worker(rank: int, world: int, path: str) -> bytes:
    model = _every_layout(meta=False)
    st = tpcompile.tp_state(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # per-element state, linear in the grads
    x = torch.randint(0, 63, (2, 8), generator=torch.Generator().manual_seed(1))
    model(x, x).backward()
    grads = {fqn: p.grad.full_tensor() for fqn, p in st.params.named()}
    opt.step()
    sd = model.state_dict()
    optim_sd = optim_state_dict(model, opt)["state"]
    tpcompile.save_checkpoint(model, os.path.join(path, "dcp"), optimizer=opt)
    tpcompile.save_checkpoint(model, os.path.join(path, "st"), format="safetensors")
    out = {"kinds": {k: (pp.style, pp.chunks, pp.pieces, pp.padded_shape) for k, pp in st.plan.items()},
           "full": tpcompile.full_state_dict(model, rank0_only=False),
           "state_dict_full": {k: v.full_tensor() for k, v in sd.items()},
           "param_full": {fqn: p.full_tensor() for fqn, p in st.params.named()},
           "grads": grads, "local": {fqn: p.to_local().detach().clone() for fqn, p in st.params.named()},
           "optim_full": tpcompile.checkpoint.full_optim_state_dict(model, opt, rank0_only=False),
           "optim_dtensor_full": {f: {k: v.full_tensor() for k, v in s.items() if hasattr(v, "full_tensor")}
                                  for f, s in optim_sd.items()}}
    torch.distributed.barrier()
    for fmt in ("dcp", "st"):
        loaded = _every_layout(meta=True)
        lopt = torch.optim.SGD(loaded.parameters(), lr=0.1, momentum=0.9)
        tpcompile.load_checkpoint(loaded, os.path.join(path, fmt), optimizer=lopt if fmt == "dcp" else None)
        out[f"loaded_{fmt}"] = tpcompile.full_state_dict(loaded, rank0_only=False)
        out[f"loaded_{fmt}_local"] = {f: p.to_local().detach().clone() for f, p in tpcompile.tp_state(loaded).params.named()}
        if fmt == "dcp":
            out["loaded_optim"] = tpcompile.checkpoint.full_optim_state_dict(loaded, lopt, rank0_only=False)
    return _out(out)


@functools.cache
def _every_layout_results() -> list:
    """One gloo job at TP=2 for the layout round trips (its checkpoints in a scratch folder)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return _ranks(_every_layout_worker, 2, d)


def _every_layout_reference() -> tuple[dict, dict]:
    """The single-device model after the same SGD step: its state dict and the step's gradients."""
    with torch.random.fork_rng():
        torch.manual_seed(11)
        ref = EveryLayout()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    x = torch.randint(0, 63, (2, 8), generator=torch.Generator().manual_seed(1))
    ref(x, x).backward()
    grads = {k: p.grad.clone() for k, p in ref.named_parameters()}
    opt.step()
    return ref.state_dict(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_unequal_fused_pieces_state_dict_gathers_the_true_tensor():
    """Regression: a fused qkv of unequal pieces (q 64 | k 32 | v 32) is a layout no DTensor placement
    describes; ``state_dict()`` entries (detached parameters) and optimizer state lost the layout the
    parameter carries, so their ``full_tensor()`` silently came back with rows in rank order."""
    r = _every_layout_results()[0]
    assert r["kinds"]["qkv.weight"][2] == (64, 32, 32)
    ref_sd, ref_grads = _every_layout_reference()
    for k in ("qkv.weight", "qkv.bias"):
        assert torch.equal(r["state_dict_full"][k], r["full"][k]) and torch.equal(r["param_full"][k], r["full"][k]), k
        assert _rel(r["full"][k], ref_sd[k]) < 1e-6, k
        assert _rel(r["grads"][k], ref_grads[k]) < 1e-5, k
        for name, v in r["optim_dtensor_full"][k].items():
            assert torch.equal(v, r["optim_full"][k][name]), (k, name)


def test_every_layout_round_trips_through_state_dicts_and_checkpoints():
    """Every ParamPlan kind at TP=2 (unequal and equal fused pieces, padded vocabulary, column, row,
    replicate, kv-head copies, expert-TP, whole experts): ``full_state_dict``, ``state_dict()`` and both
    checkpoint formats give the single-device tensors, and loading restores each rank's stored shard exactly (optimizer state too, from DCP)."""
    results = _every_layout_results()
    kinds = results[0]["kinds"]
    assert kinds["qkv.weight"][:3] == ("colwise", 3, (64, 32, 32))
    assert kinds["up.weight"][:3] == ("colwise", 2, None)
    assert kinds["emb.weight"] == ("vocab", 1, None, (64, 64))
    assert kinds["head.weight"][0] == "colwise" and kinds["head.weight"][3] == (64, 64)
    assert kinds["o.weight"][0] == kinds["down.weight"][0] == "rowwise"
    assert kinds["ln.weight"][0] == kinds["o.bias"][0] == kinds["router.weight"][0] == "replicate"
    assert kinds["experts_gate_up"][:2] == ("expert-colwise", 2) and kinds["experts_down"][0] == "expert-rowwise"
    assert results[1]["local"]["experts_gate_up"].shape == (4, 32, 64) and results[1]["local"]["experts_down"].shape == (4, 64, 16)
    assert kinds["ep_gate_up"][0] == kinds["ep_down"][0] == "expert"  # whole experts: rank 1 holds experts 2 and 3
    assert results[1]["local"]["ep_gate_up"].shape == (2, 64, 64) and results[1]["local"]["ep_down"].shape == (2, 64, 32)
    # one kv head < tp=2 (k2 has no bias: a key bias's gradient is zero, softmax does not see it)
    assert kinds["k2.weight"][0] == kinds["v2.weight"][0] == kinds["v2.bias"][0] == "kvcopy"
    assert kinds["q2.weight"][0] == "colwise" and kinds["o2.weight"][0] == "rowwise"
    ref_sd, ref_grads = _every_layout_reference()
    # rank 1 holds each expert's second half of gate and of up, and the matching half of down's in-features
    w = ref_sd["experts_gate_up"]
    assert _rel(results[1]["loaded_st_local"]["experts_gate_up"], torch.cat([w[:, 16:32], w[:, 48:64]], 1)) < 1e-6
    assert _rel(results[1]["loaded_st_local"]["experts_down"], ref_sd["experts_down"][:, :, 16:32]) < 1e-6
    for k in ("ep_gate_up", "ep_down"):
        assert torch.equal(results[1]["loaded_st_local"][k], results[1]["local"][k])
        assert _rel(results[1]["loaded_st_local"][k], ref_sd[k][2:]) < 1e-6, k
    for rank, r in enumerate(results):
        for k, v in ref_sd.items():
            for src in ("full", "state_dict_full", "loaded_dcp", "loaded_st"):
                assert _rel(r[src][k], v) < 1e-6, (rank, src, k)
            assert torch.equal(r["loaded_dcp"][k], r["full"][k]) and torch.equal(r["loaded_st"][k], r["full"][k])
            assert _rel(r["grads"][k], ref_grads[k]) < 1e-5, (rank, k)
        for fqn, local in r["local"].items():
            assert torch.equal(r["loaded_dcp_local"][fqn], local), (rank, fqn)
            assert torch.equal(r["loaded_st_local"][fqn], local), (rank, fqn)
        for fqn, s in r["optim_full"].items():
            for name, v in s.items():
                assert torch.equal(r["loaded_optim"][fqn][name], v), (rank, fqn, name)


# ----------------------------------------------------------------------------- multi-rank tests
def test_meta_init_equals_single_device_init():
    """Meta-built GPT, GPT's own init replayed per module at TP=2: the *full* tensors equal
    ``torch.manual_seed(0); GPT(config)`` bit for bit; each rank allocated only its shards."""
    results = _ranks(_meta_init_worker, 2)
    torch.manual_seed(0)
    ref = gpt.GPT(gpt.GPTConfig())
    ref_rng = torch.get_rng_state()
    _, (x, y) = gpt.make_model()
    ref_loss = ref(x, y).item()
    for r in results:
        assert r["full"].keys() == ref.state_dict().keys()
        for k, v in ref.state_dict().items():
            assert torch.equal(r["full"][k], v), k
        assert torch.equal(r["rng"], ref_rng)  # the RNG continues where single-device init left it
        assert all(shape == local and dev == "cpu" for shape, local, dev in r["shapes"].values()), r["shapes"]
        assert abs(r["loss"] - ref_loss) <= 1e-5 * abs(ref_loss)
    assert results[0]["shapes"]["wte.weight"][0] == (128, 64)


def test_dcp_save_tp4_load_tp2_and_tp1(tmp_path):
    """Single-device safetensors -> meta TP=4 with a padded vocabulary (250 rows) -> DCP save
    (model + AdamW state, a fused strided weight) -> TP=2 meta load -> plain TP=1 load:
    bitwise-equal full tensors and optimizer state at every step."""
    ref, _ = gpt.make_model(vocab_size=V_ODD)
    save_file({k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}, str(tmp_path / "ref.safetensors"))
    ranks = _ranks(_save_worker, 4, str(tmp_path))
    saved = ranks[0]
    assert saved["wte_plan"][:7] == ("wte.weight", "vocab", 0, 1, (250, 64), (63, 64), (252, 64))
    for k, v in ref.state_dict().items():
        assert torch.equal(saved["loaded"][k], v), k
    last = ranks[3]["wte"]  # rank 3: rows 189..249 (the program's two rows of padding are not the parameter's)
    assert last.shape == (61, 64) and torch.equal(last, ref.wte.weight[189:])
    assert saved["placements"]["h.0.attn.q_proj.weight"] == ["Shard(dim=0)"]
    assert saved["placements"]["h.0.attn.o_proj.weight"] == ["Shard(dim=1)"]
    assert saved["placements"]["wte.weight"] == saved["placements"]["lm_head.weight"] == ["Shard(dim=0)"]
    assert saved["placements"]["ln_f.weight"] == ["Replicate()"]  # replicated: a DTensor too
    assert saved["fused_plan"]["qkv.weight"] == ("colwise", 3) and saved["fused_plan"]["up.weight"] == ("colwise", 2)
    assert "_StridedShard" in saved["fused_placement"]
    fused_ref = _fused_ref().state_dict()
    assert all(torch.equal(saved["fused"][k], v) for k, v in fused_ref.items())
    assert torch.equal(saved["fused_dtensor_full"], fused_ref["qkv.weight"])

    loaded = _ranks(_load_worker, 2, str(tmp_path))
    for k, v in saved["full"].items():
        assert torch.equal(loaded[0]["full"][k], v), k
    for fqn, s in saved["optim"].items():
        for name, v in s.items():
            assert torch.equal(loaded[0]["optim"][fqn][name], v), (fqn, name)
    assert loaded[0]["lr"] == 1e-2
    assert all(torch.equal(loaded[0]["fused"][k], v) for k, v in fused_ref.items())
    # rank 1 of 2 holds rows 16:32, 48:64, 80:96 of qkv (its half of each of q, k, v)
    w = fused_ref["qkv.weight"]
    assert torch.equal(loaded[1]["fused_local"], torch.cat([w[16:32], w[48:64], w[80:96]]))

    plain, _ = gpt.make_model(seed=7, vocab_size=V_ODD)
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    tpcompile.load_checkpoint(plain, tmp_path / "gpt", optimizer=opt)
    for k, v in saved["full"].items():
        assert torch.equal(plain.state_dict()[k], v), k
    names = {id(p): n for n, p in plain.named_parameters()}
    for p, s in opt.state.items():
        for name, v in s.items():
            assert torch.equal(v, saved["optim"][names[id(p)]][name]), (names[id(p)], name)
    assert len(opt.state) == len(saved["optim"])
    plain_fused = FusedLM()
    tpcompile.load_checkpoint(plain_fused, tmp_path / "fused")
    assert all(torch.equal(plain_fused.state_dict()[k], v) for k, v in fused_ref.items())


def test_single_device_safetensors_to_tp2(tmp_path):
    """A single-device GPT saved as safetensors loads into a meta-built TP=2 model: same loss,
    bitwise full state dict; forward before loading is refused; save_checkpoint(safetensors) round-trips."""
    ref, (x, y) = gpt.make_model()
    sd = {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}  # tied: saved once
    save_file(sd, str(tmp_path / "model.safetensors"))
    fused_ref = _fused_ref().state_dict()
    save_file(fused_ref, str(tmp_path / "fused.safetensors"))
    results = _ranks(_safetensors_worker, 2, str(tmp_path))
    ref_loss = ref(x, y).item()
    full_numel = sum(p.numel() for p in ref.parameters())
    for r in results:
        assert abs(r["loss"] - ref_loss) <= 1e-5 * abs(ref_loss), (r["loss"], ref_loss)
        assert "never loaded" in r["unloaded"] and "load_checkpoint" in r["unloaded"]
        assert r["numel"] < 0.6 * full_numel
    for k, v in ref.state_dict().items():
        assert torch.equal(results[0]["full"][k], v), k
    assert all(torch.equal(results[0]["fused"][k], v) for k, v in fused_ref.items())
    from safetensors.torch import load_file

    resaved = load_file(str(tmp_path / "resaved" / "model.safetensors"))
    assert resaved.keys() == sd.keys()
    assert all(torch.equal(resaved[k], v) for k, v in sd.items())


def _hf_worker(rank: int, world: int, path: str) -> bytes:
    import transformers as tf

    cfg = tf.AutoConfig.from_pretrained(path)  # config.json, as published
    with torch.device("meta"):
        model = getattr(tf, cfg.architectures[0])(cfg)
    ids, labels = torch.load(os.path.join(path, "batch.pt"))
    # HF's own per-module init (it also sets rotary inv_freq buffers, which no checkpoint holds)
    model = tpcompile.tp_compile(model, example_inputs={"input_ids": ids, "labels": labels},
                                 init_weights=model._init_weights, backend="aot_eager")
    tpcompile.load_checkpoint(model, path)
    loss = model(input_ids=ids, labels=labels).loss.item()
    plan = {k: (pp.style, pp.chunks) for k, pp in tpcompile.tp_state(model).plan.items()}
    return _out({"loss": loss, "full": tpcompile.full_state_dict(model), "plan": plan,
                 "numel": local_numel(model)})


HF_CASES = {
    # MHA Llama: every projection shards at TP=2 (q/k/v/gate/up colwise, o/down rowwise, vocab)
    "llama": (dict(num_key_value_heads=8), {"model.layers.0.self_attn.k_proj.weight": ("colwise", 1),
                                             "model.layers.1.mlp.down_proj.weight": ("rowwise", 1),
                                             "model.embed_tokens.weight": ("vocab", 1)}),
    # GPT-2: Conv1D [in, out] weights, fused c_attn (a strided shard on dim 1), tied LM head
    "gpt2": ({}, {"transformer.h.0.attn.c_attn.weight": ("colwise", 3),
                  "transformer.h.1.mlp.c_proj.weight": ("rowwise", 1),
                  "transformer.wte.weight": ("vocab", 1)}),
}


@pytest.mark.parametrize("family", list(HF_CASES))
def test_hf_save_pretrained_sharded_loads_into_meta_tp2(tmp_path, family):
    """Acceptance: ``save_pretrained`` (several files + index) -> the same architecture built on
    meta, tp_compiled at TP=2, load_checkpoint: same loss as the original, full state dict bitwise."""
    from hf_models import make_model as make_hf

    overrides, expect_plan = HF_CASES[family]
    ref = make_hf(family, **overrides)
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) >= 3 and (tmp_path / "model.safetensors.index.json").exists(), files
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, ref.config.vocab_size, (2, 16), generator=g)
    labels = torch.randint(0, ref.config.vocab_size, (2, 16), generator=g)
    torch.save((ids, labels), tmp_path / "batch.pt")
    ref_loss = ref(input_ids=ids, labels=labels).loss.item()
    results = _ranks(_hf_worker, 2, str(tmp_path))
    ref_sd = ref.state_dict()
    full_numel = sum(p.numel() for p in ref.parameters())
    for r in results:
        assert abs(r["loss"] - ref_loss) <= 1e-5 * abs(ref_loss), (r["loss"], ref_loss)
        assert r["numel"] < 0.6 * full_numel
    assert results[0]["full"].keys() == ref_sd.keys()
    for k, v in ref_sd.items():
        assert torch.equal(results[0]["full"][k], v), k
    for k, want in expect_plan.items():
        assert results[0]["plan"][k] == want, (k, results[0]["plan"][k])


# ----------------------------------------------------------------------------- bad input (one process)
def _plain_gpt_files() -> tuple[gpt.GPT, dict]:
    model, _ = gpt.make_model()
    sd = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    return model, sd


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_checkpoints_name_the_tensor_and_load_nothing(tmp_path):
    model, sd = _plain_gpt_files()
    other, _ = gpt.make_model(seed=3)
    cases = {
        "missing": ({k: v for k, v in sd.items() if k != "h.1.mlp.fc.bias"}, "missing key: h.1.mlp.fc.bias"),
        "unexpected": ({**sd, "h.9.extra": torch.zeros(3)}, "unexpected keys"),
        "shape": ({**sd, "h.0.attn.q_proj.weight": torch.zeros(64, 32)},
                  "size mismatch for h.0.attn.q_proj.weight"),
    }
    for name, (tensors, msg) in cases.items():
        fn = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(fn))
        before = _snapshot(other)
        with pytest.raises(TPCheckpointError, match=msg.replace("(", r"\(")):
            tpcompile.load_checkpoint(other, fn)
        assert _unchanged(other, before), name  # every check runs before the first copy

    fn = tmp_path / "unexpected.safetensors"
    tpcompile.load_checkpoint(other, fn, strict=False)  # extra keys are allowed when asked
    assert all(torch.equal(other.state_dict()[k], v) for k, v in sd.items())

    good = tmp_path / "good.safetensors"
    save_file(sd, str(good))
    data = good.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) - 1000])
    before = _snapshot(other)
    with pytest.raises(TPCheckpointError, match="truncated.safetensors: corrupt or truncated"):
        tpcompile.load_checkpoint(other, bad)
    assert _unchanged(other, before)

    shards = tmp_path / "sharded"
    shards.mkdir()
    (shards / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"wte.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(TPCheckpointError, match="model-00001-of-00002.safetensors.*wte.weight"):
        tpcompile.load_checkpoint(other, shards)


def test_meta_model_errors_on_a_fake_group(tmp_path):
    import llama

    _, (x, y) = gpt.make_model()
    with fake_group(2, rank=1):
        with torch.device("meta"):
            m = gpt.GPT(gpt.GPTConfig())
        with pytest.raises(ValueError, match="meta device; pass example_inputs"):
            tpcompile.tp_compile(m, backend="aot_eager")
    with fake_group(2, rank=1):
        with torch.device("meta"):
            m = llama.Llama(llama.LlamaConfig())
        with pytest.raises(ValueError, match=r"non-persistent buffers \['rope_cos', 'rope_sin'\]"):
            tpcompile.tp_compile(m, example_inputs=(x, y), backend="aot_eager")
    with fake_group(2, rank=1):
        m = _meta_gpt((x, y))
        ref = gpt.make_model(seed=4)[0]
        st = tpcompile.tp_state(m)
        assert "h.0.mlp.fc.weight" in st._uninitialised  # built on meta, not loaded yet
        m.load_state_dict(ref.state_dict())  # plain full tensors in: each rank keeps its slice
        assert st._uninitialised == set()
        for fqn, p in st.params.named():
            assert torch.equal(p.to_local(), stored_slice(m, fqn, ref.state_dict()[fqn], 1)), fqn
        sd = m.state_dict()
        assert tuple(sd["h.0.attn.o_proj.weight"].shape) == (64, 64)  # logical shape outside
        assert torch.equal(sd["h.0.attn.o_proj.weight"].to_local(), m.h[0].attn.o_proj.weight.to_local())
        m.load_state_dict(sd)  # its own DTensors back in
        bad = {"h.0.mlp.fc.weight": torch.zeros(128, 64)}
        with pytest.raises(RuntimeError, match=r"h.0.mlp.fc.weight: .*\(128, 64\).*logical.*\(256, 64\)"):
            m.load_state_dict(bad, strict=False)
        sd = {k: v for k, v in gpt.make_model()[0].state_dict().items() if k != "lm_head.weight"}
        sd["h.1.attn.o_proj.weight"] = torch.zeros(64, 32)  # a rank's shard is not a checkpoint
        save_file(sd, str(tmp_path / "m.safetensors"))
        with pytest.raises(TPCheckpointError, match=r"h.1.attn.o_proj.weight.*\(64, 32\).*\(64, 64\)"):
            tpcompile.load_checkpoint(m, tmp_path / "m.safetensors")


def test_bad_dcp_checkpoints_load_nothing(tmp_path):
    model, _ = gpt.make_model()
    tpcompile.save_checkpoint(model, tmp_path / "no_optim")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tpcompile.save_checkpoint(model, tmp_path / "ckpt", optimizer=opt)

    deeper, _ = gpt.make_model(seed=3, n_layer=3)
    before = _snapshot(deeper)
    with pytest.raises(TPCheckpointError, match=r"missing key: h\.2\."):
        tpcompile.load_checkpoint(deeper, tmp_path / "ckpt")
    assert _unchanged(deeper, before)

    other, _ = gpt.make_model(seed=3)
    before = _snapshot(other)
    partial = torch.optim.SGD(other.h.parameters(), lr=0.1)
    with pytest.raises(TPCheckpointError, match="parameter groups .* differ"):
        tpcompile.load_checkpoint(other, tmp_path / "ckpt", optimizer=partial)
    with pytest.raises(TPCheckpointError, match="holds no optimizer state"):
        tpcompile.load_checkpoint(other, tmp_path / "no_optim", optimizer=torch.optim.SGD(other.parameters(), lr=1))
    assert _unchanged(other, before)



def _resume_before_planning_worker(rank: int, world: int, path: str) -> bytes:
    _, (x, y) = gpt.make_model(vocab_size=V_ODD)

    def fresh():
        model = tpcompile.tp_compile(gpt.make_model(vocab_size=V_ODD)[0])  # planned at its first call
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)  # the HF Trainer's default

    def step(model, opt):
        model(x, y).backward()
        opt.step()
        opt.zero_grad()

    a, opt_a = fresh()
    step(a, opt_a), step(a, opt_a)
    tpcompile.save_checkpoint(a, path, optimizer=opt_a)
    b, opt_b = fresh()  # as a resumed Trainer does: load into a model not called yet, then train
    tpcompile.load_checkpoint(b, path, optimizer=opt_b)
    step(a, opt_a), step(a, opt_a), step(b, opt_b), step(b, opt_b)
    return _out({"params": [tpcompile.full_state_dict(m, rank0_only=False) for m in (a, b)],
                 "optim": [_gathered_optim(m, o) for m, o in ((a, opt_a), (b, opt_b))]})


def test_optimizer_state_loaded_before_the_model_is_planned_keeps_updating(tmp_path):
    """Regression: AdamW state loaded into a model that had not been called yet (so not planned) was
    made replicated; planning then sharded the parameters in place but not that state, and every
    later fused AdamW update (the HF Trainer's default optimizer) ran on redistributed copies: the
    moments froze at their loaded values and training after a resume silently went its own way
    (the losses still matched for a few steps). Two more AdamW steps after the load equal two more steps of the saved run, bitwise."""
    got = _ranks(_resume_before_planning_worker, 2, str(tmp_path / "ck"))
    for r in got:
        (pa, pb), (oa, ob) = r["params"], r["optim"]
        for k, v in pa.items():
            assert torch.equal(pb[k], v), k
        for fqn, s in oa.items():
            for name, v in s.items():
                assert torch.equal(ob[fqn][name], v), (fqn, name)
