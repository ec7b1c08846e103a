"""Expert parallelism on request (issue 16 item 2): ``tp_compile(model, expert_parallel=True)`` or
``plan={"...experts": "expert"}`` holds E / tp whole experts per rank (style ``expert``: the 3-D expert
weights split on dim 0). Each rank runs the rows routed to its own experts (``runtime/expert_parallel.py``)
and one all-reduce per MoE layer combines them: every rank already holds every token, so no token moves.

HF Mixtral and Qwen3-MoE from tiny configs (4 experts, hidden 64), in each experts implementation that runs
on CPU: ``"grouped_mm"`` (in fp32 HF's opaque ``transformers::grouped_mm_fallback`` op) and ``"batched_mm"``
(``W[expert_ids]`` + ``bmm``); Mixtral with its router's load-balancing loss in the loss (router statistics
must not change). Loss within 1e-5 relative fp32, logits and every gradient within 1e-5, 3 SGD steps, ranks
agree, at TP=2 and TP=4, in one spawned gloo group per degree.
"""
import functools
import os
from collections import Counter

import pytest
import torch

pytest.importorskip("transformers")

import hf_models  # noqa: E402
from multirank import run_cases  # noqa: E402

# tp -> [(family, experts implementation, tp_compile kwargs)]: both families, both runtime forms (rows sorted
# by expert with cumulative counts; an expert id per row), both ways of asking, one decoder layer each;
# TPCOMPILE_EP_ALL=1 runs every family x implementation at both degrees with two layers, Qwen2-MoE (a shared
# expert beside the routed ones, its row-parallel sum joining their combine) too
CASES = {
    2: [("mixtral", "grouped_mm", {"expert_parallel": True})],
    4: [("qwen3_moe", "batched_mm", {"plan": {"model.layers.*.mlp.experts": "expert"}})],
}
ALL = bool(os.environ.get("TPCOMPILE_EP_ALL"))
if ALL:
    CASES = {tp: [(f, impl, {"expert_parallel": True}) for f in ("mixtral", "qwen3_moe", "qwen2_moe")
                  for impl in ("grouped_mm", "batched_mm")] for tp in (2, 4)}
LAYERS = 2 if ALL else 1
# expert parallelism under sequence parallelism: the all-to-all dispatch / combine (passes/expert_dispatch.py);
# TPCOMPILE_EP_ALL=1: both families x both implementations at both degrees
EP_SP = {"expert_parallel": True, "sequence_parallel": True}
SP_CASES = {2: [("mixtral", "grouped_mm", EP_SP)], 4: []}  # (suite budget: the TP=4 group takes no SP case)
if ALL:
    SP_CASES = {tp: [(f, impl, EP_SP) for f in ("mixtral", "qwen3_moe") for impl in ("grouped_mm", "batched_mm")]
                for tp in (2, 4)}


def train_case(rank: int, world: int, family: str, impl: str, tp_kwargs: dict, layers: int) -> dict:
    """3 SGD steps of the tp-compiled HF model beside its single-device copy (``models_common.train_beside``)."""
    from models_common import train_beside

    import tpcompile

    model = hf_models.make_model(family, _experts_implementation=impl, num_hidden_layers=layers)
    g = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(3):
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=g)
        labels = ids.clone()
        labels[:, :2] = -100
        batches.append((ids, labels))

    def report(tp, ref, out):
        st = tpcompile.tp_state(tp)
        out["plan"] = {f: (pp.style, pp.dim, pp.local_shape) for f, pp in st.plan.items()}
        out["collectives"] = Counter((c.phase, c.kind) for r in st.records for c in r.collectives)
        out["floor_why"] = [r.floor for r in st.records]
        out["experts"] = {f: p.to_local().detach().clone() for f, p in st.params.named() if ".experts." in f}
        out["ref_experts"] = {f: p.detach().clone() for f, p in ref.named_parameters() if ".experts." in f}

    return train_beside(rank, world, model, batches, lambda m, b: m(input_ids=b[0], labels=b[1]), lr=0.1,
                        report=report, **tp_kwargs)


def generate_case(rank: int, world: int, family: str, impl: str) -> dict:
    """Greedy ``generate()`` (KV cache, prefill then one token per step: a rank's experts may get no row)
    of the expert-parallel model beside single device's."""
    import copy

    import tpcompile

    model = hf_models.make_model(family, _experts_implementation=impl, num_hidden_layers=1).eval()
    ref = copy.deepcopy(model)
    tp = tpcompile.tp_compile(model, backend="aot_eager", expert_parallel=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(7))
    kw = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        got, want = tp.generate(ids, **kw), ref.generate(ids, **kw)
    plan = tpcompile.tp_state(tp).plan
    return {"tokens": got.tolist(), "ref_tokens": want.tolist(), "style": plan["model.layers.0.mlp.experts.down_proj"].style}


@functools.cache
def _trained(world: int) -> list:
    gen = [(generate_case, ("mixtral", "grouped_mm"))] if world == 2 else []
    return run_cases(world, [(train_case, (*case, LAYERS)) for case in CASES[world] + SP_CASES[world]] + gen)


@pytest.mark.parametrize("world", [2, 4], ids=["tp2", "tp4"])
def test_expert_parallel_matches_single_device(world):
    """Whole experts per rank: rank r holds experts [r * E / tp, (r + 1) * E / tp) of each expert weight, and
    after 3 SGD steps they are single device's experts; loss, logits, gradients as single device; no warning;
    one all-reduce per MoE layer forward (the combine) and, backward, one for the tokens' gradient and one for
    the routing weights' (the same collectives as expert-TP), at the floor."""
    L = LAYERS
    for (family, impl, kw), results in zip(CASES[world], _trained(world)[:len(CASES[world])]):
        case = (family, impl, world)
        for rank, r in enumerate(results):
            for a, b in zip(r["loss"], r["ref_loss"]):
                assert abs(a - b) <= 1e-5 * abs(b), (case, rank, a, b)
            assert r["loss"] == results[0]["loss"], case
            assert r["grad_err"] <= 1e-5 and r["logits_err"] <= 1e-5, (case, r["grad_err"], r["logits_err"])
            assert r["n_graphs"] == 1 and len(r["loss"]) == 3, case
            assert r["warnings"] == [], (case, r["warnings"])
            E = 4
            for f, local in r["experts"].items():  # after the steps: this rank's whole experts, single device's
                assert r["plan"][f][:2] == ("expert", 0), (case, f, r["plan"][f])
                full = r["ref_experts"][f]
                assert local.shape == (E // world, *full.shape[1:]), (case, f, local.shape)
                assert torch.allclose(local, full[rank * E // world:(rank + 1) * E // world], atol=1e-5), (case, f)
        r = results[0]
        assert r["plan"]["model.layers.0.mlp.gate.weight"][0] == "replicate"
        assert r["plan"]["model.layers.0.self_attn.q_proj.weight"][0] == "colwise"
        (why,) = r["floor_why"]
        # per layer: o_proj and the MoE combine; embedding and loss once
        assert why["forward"] == {"row-parallel linear": L, "vocab-parallel embedding": 1, "vocab-parallel loss": 1,
                                  "expert combine": L}, (case, why)
        # per layer: q/k/v's input, the experts' tokens and the routing weights; the LM head's input once;
        # Mixtral's 2 kv heads at TP=4: kv-head copies, their weights' gradient once per layer
        kv = L if (family, world) == ("mixtral", 4) else 0
        # (Qwen2-MoE: the shared expert's sigmoid gate scales the pending sum too)
        scales = 2 * L if family == "qwen2_moe" else L
        assert why["backward"] == {"column-parallel input": 2 * L + 1, "scale of a pending sum": scales,
                                   **({"kv-copy weight gradient": kv} if kv else {})}, (case, why)
        qk_norm = 2 * L if family == "qwen3_moe" else 0  # q_norm / k_norm weights on head-sharded q, k
        # + one all-gather forward: the [B, T, V] logits returned
        assert r["collectives"] == {("forward", "all_reduce"): 1 + 2 * L, ("forward", "all_gather"): 2,
                                    ("backward", "all_reduce"): 2 * L + 1 + scales + kv + qk_norm}, (case, r["collectives"])


def test_expert_parallel_generate_matches_single_device():
    """HF ``generate()`` of expert-parallel Mixtral at TP=2 (greedy, KV cache): single device's tokens on
    every rank."""
    results = _trained(2)[len(CASES[2]) + len(SP_CASES[2])]
    for r in results:
        assert r["style"] == "expert"
        assert r["tokens"] == r["ref_tokens"], (r["tokens"], r["ref_tokens"])


@pytest.mark.parametrize("world", [w for w in (2, 4) if SP_CASES[w]], ids=[f"tp{w}" for w in (2, 4) if SP_CASES[w]])
def test_expert_parallel_under_sequence_parallelism_dispatches_tokens_with_all_to_all(world):
    """``sequence_parallel=True, expert_parallel=True``: each rank routes its own T / tp tokens, an all-to-all
    sends every (token, expert) row to its expert's rank and another brings the results back; the MoE block
    stays in the SP region (no gather before it, no all-reduce after it). Parity as above (the router's
    gradient included: it is computed on each rank's tokens and all-reduced with the norm weights), and the
    collectives counted exactly: per MoE layer 3 all-to-alls forward (the rows, each row's expert, the
    results), 2 backward (their reverses), and at the SP floor."""
    results_all = _trained(world)[len(CASES[world]):len(CASES[world]) + len(SP_CASES[world])]
    L = LAYERS
    for case, results in zip(SP_CASES[world], results_all):
        family = case[0]
        for rank, r in enumerate(results):
            for a, b in zip(r["loss"], r["ref_loss"]):
                assert abs(a - b) <= 1e-5 * abs(b), (case, rank, a, b)
            assert r["loss"] == results[0]["loss"], case
            assert r["grad_err"] <= 1e-5 and r["logits_err"] <= 1e-5, (case, r["grad_err"], r["logits_err"])
            assert r["n_graphs"] == 1 and r["warnings"] == [], (case, r["warnings"])
            for f, local in r["experts"].items():
                full = r["ref_experts"][f]
                assert r["plan"][f][:2] == ("expert", 0), (case, f, r["plan"][f])
                assert torch.allclose(local, full[rank * 4 // world:(rank + 1) * 4 // world], atol=1e-5), (case, f)
        r = results[0]
        (why,) = r["floor_why"]
        # out of SP: q/k/v's inputs and the LM head's (HF's ``hidden_states[:, 0:, :]`` keeps every token: no
        # longer in the way, the LM head's input is Megatron's SP exit, its backward a reduce-scatter)
        assert why["forward"] == {"reduce-scatter into SP": 1 + L, "all-gather out of SP": L + 1, "vocab-parallel loss": 1,
                                  "expert dispatch / combine all-to-all": 3 * L}, (case, why)
        kv = L if (family, world) == ("mixtral", 4) else 0
        qk_norm = 2 * L if family == "qwen3_moe" else 0  # q_norm / k_norm weights on head-sharded q, k
        # forward: the embedding's and o_proj's reduce-scatters; q/k/v's all-gather; the final hidden states
        # gathered for the LM head, the loss's one collective, the returned logits (as for a dense HF model)
        assert r["collectives"] == {
            ("forward", "reduce_scatter"): 1 + L, ("forward", "all_gather"): L + 3, ("forward", "all_to_all"): 3 * L,
            ("backward", "all_gather"): 1 + L, ("backward", "reduce_scatter"): L + 1, ("backward", "all_to_all"): 2 * L,
            # the one bucket of norm + router weight gradients, kv-copy / qk-norm weights
            ("backward", "all_reduce"): 1 + kv + qk_norm}, (case, r["collectives"])


class SPMoE(torch.nn.Module):
    """A decoder-shaped MoE layer on ``[B, T, C]``: embedding, RMSNorm, a top-2 router, experts as HF's
    ``batched_mm`` spells them, the combine back into the residual stream, a head; ``shared``: a tensor-parallel
    MLP beside the routed experts (Qwen2-MoE's shared expert), its sum joining theirs; ``mix``: the router's
    softmax over the tokens instead of the experts (a router that mixes tokens: not token-wise)."""

    def __init__(self, C: int = 32, E: int = 4, I: int = 32, V: int = 64, shared: bool = False, mix: bool = False,
                 two: bool = False):
        super().__init__()
        self.mix, self.two = mix, two  # two: a second MoE layer after the first (its own router and experts)
        if two:
            self.router2 = torch.nn.Linear(C, E, bias=False)
            self.gate_up2 = torch.nn.Parameter(torch.randn(E, 2 * I, C) * C ** -0.5)
            self.down2 = torch.nn.Parameter(torch.randn(E, C, I) * I ** -0.5)
        self.emb, self.norm = torch.nn.Embedding(V, C), torch.nn.RMSNorm(C)
        self.router, self.head = torch.nn.Linear(C, E, bias=False), torch.nn.Linear(C, V, bias=False)
        self.gate_up = torch.nn.Parameter(torch.randn(E, 2 * I, C) * C ** -0.5)
        self.down = torch.nn.Parameter(torch.randn(E, C, I) * I ** -0.5)
        self.shared = (torch.nn.Linear(C, I, bias=False), torch.nn.Linear(I, C, bias=False)) if shared else None
        if shared:
            self.up_s, self.down_s = self.shared

    def _moe(self, h, router, gate_up, down):
        B, T, C = h.shape
        t = self.norm(h).view(-1, C)
        w, ids = torch.topk(router(t).softmax(0 if self.mix else -1), 2, dim=-1)
        ids = ids.reshape(-1)
        g, u = torch.bmm(gate_up[ids], t.repeat_interleave(2, dim=0).unsqueeze(-1)).squeeze(-1).chunk(2, dim=-1)
        out = torch.bmm(down[ids], (torch.nn.functional.silu(g) * u).unsqueeze(-1)).squeeze(-1)
        moe = (out * w.reshape(-1, 1)).view(B * T, 2, C).sum(1)
        if self.shared is not None:
            moe = moe + self.down_s(torch.relu(self.up_s(t)))
        return h + moe.reshape(B, T, C)

    def forward(self, x, y):
        h = self._moe(self.emb(x), self.router, self.gate_up, self.down)
        if self.two:
            h = self._moe(h, self.router2, self.gate_up2, self.down2)
        return torch.nn.functional.cross_entropy(self.head(self.norm(h)).flatten(0, 1), y.reshape(-1))


def test_explain_shows_the_expert_all_to_alls_and_their_bytes():
    """``explain`` (world size 4, SP + EP, 4 experts: one per rank): the dispatch and combine all-to-alls in the
    collective list with their bytes (the fixed worst-case buffer: every rank sends each rank room for all its
    ``N/tp * k`` rows: ``N * k * C`` floats per rank in all), the block in the SP region (no all-reduce forward),
    at the floor; the report says what moves."""
    import tpcompile

    with torch.device("meta"):
        model = SPMoE(two=True)  # two MoE layers: each block ends at its own combine
    x, y = _tiny_batch()  # [2, 8]: N = 16 tokens
    rep = tpcompile.explain(model, x, y, world_size=4, sequence_parallel=True, expert_parallel=True)
    N, k, C = 16, 2, 32
    rows, ids = ("all_to_all", N * k * C * 4), ("all_to_all", N * k * 4)
    assert [(c.phase, c.kind, c.nbytes) for c in rep.collectives if c.kind == "all_to_all"] == \
        [("forward", *rows), ("forward", *ids), ("forward", *rows)] * 2 + [("backward", *rows)] * 4, \
        rep.collectives_summary()
    assert rep.warnings == [] and rep.plan["gate_up"] == rep.plan["down2"] == "expert", rep.warnings
    assert rep.floor["forward"]["expert dispatch / combine all-to-all"] == 6
    assert rep.floor["backward"]["expert dispatch / combine all-to-all (reversed)"] == 4
    assert rep.above_floor() == {"forward": 0, "backward": 0}, str(rep)
    assert "all_reduce" not in {c.kind for c in rep.collectives if c.phase == "forward"}, rep.collectives_summary()
    assert "dispatch_rows(" in rep.graph_code and "combine_rows(" in rep.graph_code
    assert "gather_from_tp(" not in rep.graph_code and "scatter_to_sp(" not in rep.graph_code, rep.graph_code
    assert "2 MoE layer(s) on this rank's tokens" in str(rep) and "no token moves" not in str(rep), str(rep)


@pytest.mark.parametrize("kw, why", [({"shared": True}, "a tensor-parallel linear in the MoE block (a shared expert)"),
                                     ({"mix": True}, "softmax over the tokens")], ids=["shared_expert", "token_mixing"])
def test_a_moe_block_that_is_not_token_wise_alone_stays_gathered_with_a_warning(kw, why):
    """A shared expert (tensor-parallel linears beside the routed experts, their sums joined), or a router that
    mixes tokens (a softmax over them), cannot run on a rank's tokens alone: that MoE block stays on the
    gathered path (all-gather in, all-reduce out: correct), with a ``TPWarning`` naming the line and why, and
    no all-to-all."""
    import tpcompile

    with torch.device("meta"):
        model = SPMoE(**kw)
    rep = tpcompile.explain(model, *_tiny_batch(), world_size=2, sequence_parallel=True, expert_parallel=True)
    assert len(rep.warnings) == 1 and why in rep.warnings[0] and "gathered path" in rep.warnings[0] \
        and "test_expert_parallel.py" in rep.warnings[0], rep.warnings
    assert rep.plan["gate_up"] == "expert" and (not kw.get("shared") or rep.plan["up_s.weight"] == "colwise"), rep.plan
    assert not any(c.kind == "all_to_all" for c in rep.collectives)
    assert "local_experts_linear(" in rep.graph_code and "gather_from_tp(" in rep.graph_code


# ----------------------------------------------------------------------------- checkpoints across tp
class TinyMoE(torch.nn.Module):
    """An embedding, a top-2 MoE (``W[ids]`` + ``bmm``, as HF's ``batched_mm``) and a head: the expert weights
    are the layouts a checkpoint must carry across tp and across expert-TP / expert parallelism."""

    def __init__(self, C: int = 32, E: int = 4, I: int = 32, V: int = 64, leak: bool = False):
        super().__init__()
        self.leak = leak  # the loss also reads the experts' hidden rows whole (an op with no rule for them)
        self.emb, self.router, self.head = torch.nn.Embedding(V, C), torch.nn.Linear(C, E, bias=False), torch.nn.Linear(C, V)
        self.gate_up = torch.nn.Parameter(torch.randn(E, 2 * I, C) * C ** -0.5)
        self.down = torch.nn.Parameter(torch.randn(E, C, I) * I ** -0.5)

    def forward(self, x, y):
        h = self.emb(x).reshape(-1, self.emb.embedding_dim)
        w, ids = torch.topk(self.router(h).softmax(-1), 2, dim=-1)
        ids = ids.reshape(-1)
        g, u = torch.bmm(self.gate_up[ids], h.repeat_interleave(2, dim=0).unsqueeze(-1)).squeeze(-1).chunk(2, dim=-1)
        act = torch.nn.functional.silu(g) * u
        out = torch.bmm(self.down[ids], act.unsqueeze(-1)).squeeze(-1)
        h = h + (out * w.reshape(-1, 1)).view(-1, 2, h.shape[-1]).sum(1)
        loss = torch.nn.functional.cross_entropy(self.head(h), y.reshape(-1))
        return loss + act.square().mean() if self.leak else loss


def _tiny_batch():
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 64, (2, 8), generator=g), torch.randint(0, 64, (2, 8), generator=g)


def _tiny(meta: bool, **kw):
    import tpcompile

    if meta:
        with torch.device("meta"):
            m = TinyMoE()
    else:
        torch.manual_seed(3)
        m = TinyMoE()
    return tpcompile.tp_compile(m, example_inputs=_tiny_batch(), backend="aot_eager", **kw)


def _save_tp4(rank: int, world: int, path: str) -> bytes:
    """Expert parallel at TP=4 (one expert per rank): an AdamW step, then a DCP checkpoint with its state."""
    import tpcompile
    from multirank import to_bytes

    model = _tiny(meta=False, expert_parallel=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(*_tiny_batch()).backward()
    opt.step()
    tpcompile.save_checkpoint(model, os.path.join(path, "dcp"), optimizer=opt)
    st = tpcompile.tp_state(model)
    return to_bytes({"full": tpcompile.full_state_dict(model, rank0_only=False), "loss": model(*_tiny_batch()).item(),
                     "optim": tpcompile.checkpoint.full_optim_state_dict(model, opt, rank0_only=False),
                     "styles": {f: pp.style for f, pp in st.plan.items()},
                     "local": {f: p.to_local().detach().clone() for f, p in st.params.named()}})


def _load_tp2(rank: int, world: int, path: str) -> bytes:
    """The TP=4 checkpoint into meta-built TP=2 models: expert parallel (two experts per rank) and expert-TP."""
    import tpcompile
    from multirank import to_bytes

    out = {}
    for name, kw in (("expert", {"expert_parallel": True}), ("expert-tp", {})):
        model = _tiny(meta=True, **kw)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        tpcompile.load_checkpoint(model, os.path.join(path, "dcp"), optimizer=opt)
        st = tpcompile.tp_state(model)
        out[name] = {"full": tpcompile.full_state_dict(model, rank0_only=False), "loss": model(*_tiny_batch()).item(),
                     "optim": tpcompile.checkpoint.full_optim_state_dict(model, opt, rank0_only=False),
                     "styles": {f: pp.style for f, pp in st.plan.items()},
                     "local": {f: p.to_local().detach().clone() for f, p in st.params.named()}}
    return to_bytes(out)


def test_expert_parallel_checkpoint_round_trips_across_tp(tmp_path):
    """DCP saved expert-parallel at TP=4 (rank r holds expert r) loads into TP=2 expert-parallel (rank r:
    experts 2r, 2r + 1) and TP=2 expert-TP (every expert split): bitwise the same full tensors and AdamW
    state, each rank holding its slice, and the same loss."""
    from multirank import run_ranks_bytes

    saved = run_ranks_bytes(_save_tp4, 4, str(tmp_path))
    assert saved[0]["styles"]["gate_up"] == saved[0]["styles"]["down"] == "expert"
    for rank, r in enumerate(saved):
        assert torch.equal(r["local"]["gate_up"], saved[0]["full"]["gate_up"][rank:rank + 1])
    loaded = run_ranks_bytes(_load_tp2, 2, str(tmp_path))
    for rank, r in enumerate(loaded):
        for name, want in (("expert", ("expert", "expert")), ("expert-tp", ("expert-colwise", "expert-rowwise"))):
            got = r[name]
            assert (got["styles"]["gate_up"], got["styles"]["down"]) == want, (name, got["styles"])
            for k, v in saved[0]["full"].items():
                assert torch.equal(got["full"][k], v), (name, k)
            for fqn, s in saved[0]["optim"].items():
                for key, v in s.items():
                    assert torch.equal(got["optim"][fqn][key], v), (name, fqn, key)
            assert abs(got["loss"] - saved[0]["loss"]) <= 1e-6 * abs(saved[0]["loss"]), (name, got["loss"])
        full = saved[0]["full"]
        assert torch.equal(r["expert"]["local"]["down"], full["down"][2 * rank:2 * rank + 2])
        assert torch.equal(r["expert-tp"]["local"]["down"], full["down"][:, :, 16 * rank:16 * (rank + 1)])


# ----------------------------------------------------------------------------- refusals (one process)
def test_experts_not_divisible_by_tp_are_refused_with_the_fix():
    """3 experts over tp=2 cannot be held whole in equal numbers: refused at planning, naming the weight,
    the source line and the fixes (a tp that divides E, or expert-TP); expert-TP itself plans fine."""
    from fakepg import fake_group

    import tpcompile
    from tpcompile.errors import TPShardingError

    torch.manual_seed(0)
    with torch.device("meta"):
        model = TinyMoE(E=3)
    with fake_group(2), pytest.raises(TPShardingError) as e:
        tpcompile.tp_compile(model, expert_parallel=True, example_inputs=_tiny_batch(), backend="aot_eager")
    msg = str(e.value)
    assert "gate_up" in msg and "3 experts are not divisible by tp=2" in msg and "test_expert_parallel.py" in msg, msg
    assert "tp in {1, 3}" in msg and "expert_parallel=True" in msg, msg
    with torch.device("meta"):
        model = TinyMoE(E=3)
    report = tpcompile.explain(model, *_tiny_batch(), world_size=2)  # expert-TP: each expert split, any E
    assert report.plan["gate_up"] == "expert-colwise" and report.plan["down"] == "expert-rowwise"


def test_expert_style_on_a_plain_linear_is_refused():
    """``plan={...: "expert"}`` names the weight of something that is not a grouped expert matmul: refused
    (it would otherwise mean nothing and be ignored)."""
    import tpcompile
    from tpcompile.errors import TPShardingError

    with torch.device("meta"):
        model = TinyMoE()
    with pytest.raises(TPShardingError, match=r"head.weight .* style 'expert'.*not a grouped expert matmul"):
        tpcompile.explain(model, *_tiny_batch(), world_size=2, plan={"head.weight": "expert"})


def test_explain_at_world_size_8_shows_whole_experts_and_one_all_reduce_per_moe_layer():
    """``explain(..., expert_parallel=True)`` at world size 8 with 8 experts: one whole expert per rank, the
    MoE combine one all-reduce forward (of ``N x H``), no all-to-all, at the floor it states; and no host
    sync in the program (``W[ids]`` + ``bmm``: nothing but the model's own ops reads a value on the host)."""
    import tpcompile

    with torch.device("meta"):
        model = TinyMoE(E=8)
    report = tpcompile.explain(model, *_tiny_batch(), world_size=8, expert_parallel=True)
    assert report.plan["gate_up"] == report.plan["down"] == "expert"
    assert report.params["gate_up"].local_shape == (1, 64, 32)
    assert report.floor["forward"]["expert combine"] == 1
    combine = [c for c in report.collectives if c.phase == "forward" and c.module == "" and c.kind == "all_reduce"
               and "h + (out" in c.source]
    assert [c.nbytes for c in combine] == [16 * 32 * 4], report.collectives_summary()  # N x H fp32
    assert not any(c.kind == "all_to_all" for c in report.collectives)
    assert report.above_floor() == {"forward": 0, "backward": 0}, str(report)
    assert "1 of 8 whole experts on this rank" in str(report)
    # no host sync: no scalar leaves the device in the forward or backward program (static shapes)
    ops = [str(n.target) for r in report.records for _, gm in r.compiled_graphs for n in gm.graph.nodes
           if n.op == "call_function"]
    assert ops and not [o for o in ops if o.split(".")[:2] in (["aten", "_local_scalar_dense"], ["aten", "nonzero"], ["aten", "item"])], ops


# ----------------------------------------------------------------------------- the runtime op, every rank in one process
@pytest.mark.parametrize("rank_of", [int, torch.tensor], ids=["int", "tensor"])
@pytest.mark.parametrize("form", ["fallback", "ids"])
def test_local_experts_sum_over_ranks_to_the_grouped_linear(form, rank_of):
    """``local_experts_linear`` of each rank (its slice of the experts, rows of other experts filled with
    garbage as the op between two expert matmuls may leave them) sums over the ranks to the whole grouped
    linear, and so do the gradients of the input and of each rank's weights (the whole experts' gradient);
    ``expert_rows_zeroed`` keeps exactly each rank's rows. 8 experts over 4 ranks, one expert hit by no row;
    the rank given as an int or as the 0-d tensor a rank-free program reads at run time."""
    pytest.importorskip("transformers.integrations.moe")  # registers transformers::grouped_mm_fallback
    from tpcompile.passes.normalize import grouped_linear
    from tpcompile.runtime.expert_parallel import expert_rows_zeroed, local_experts_linear

    g = torch.Generator().manual_seed(0)
    E, tp, S, H, O = 8, 4, 24, 16, 12
    ids = torch.randint(0, E, (S,), generator=g)
    ids[ids == 5] = 6  # expert 5 gets no row
    ids = ids.sort().values if form == "fallback" else ids
    route = torch.cumsum(torch.bincount(ids, minlength=E), 0).to(torch.int32) if form == "fallback" else ids
    x = torch.randn(S, H, generator=g, requires_grad=True)
    w = torch.randn(E, O, H, generator=g, requires_grad=True)
    dy = torch.randn(S, O, generator=g)
    (grouped_linear(x, w, route, form, 1) * dy).sum().backward()
    want, want_dx, want_dw = grouped_linear(x, w, route, form, 1).detach(), x.grad.clone(), w.grad.clone()
    total, dx = torch.zeros(S, O), torch.zeros(S, H)
    n = E // tp
    for rank in range(tp):
        xr = x.detach().clone().requires_grad_(True)
        wr = w.detach()[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        mine = (ids // n == rank)[:, None]
        noisy = torch.where(mine, xr, torch.full_like(xr, float("nan")))  # other rows undefined
        y = local_experts_linear(noisy, wr, route, form, 1, rank_of(rank))  # a tensor: the rank read at run time
        assert torch.equal(y[~mine.squeeze(1)], torch.zeros_like(y[~mine.squeeze(1)]))
        assert torch.equal(expert_rows_zeroed(y, route, form, n, rank_of(rank)), y)
        (y * dy).sum().backward()
        total, dx = total + y.detach(), dx + xr.grad
        torch.testing.assert_close(wr.grad, want_dw[rank * n:(rank + 1) * n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, want_dx, rtol=1e-5, atol=1e-5)


def test_expert_rows_read_whole_are_gathered_with_a_warning():
    """The rows between the two expert matmuls read by an op with no rule for them (``act.square().mean()``
    in the loss): correct, not silent: those rows are zeroed off each rank's experts and all-reduced (one
    more forward all-reduce than the floor), with a ``TPWarning`` naming the op; the experts stay whole."""
    import tpcompile

    with torch.device("meta"):
        model = TinyMoE(leak=True)
    report = tpcompile.explain(model, *_tiny_batch(), world_size=2, expert_parallel=True)
    assert report.plan["gate_up"] == report.plan["down"] == "expert"
    assert len(report.warnings) == 1 and "test_expert_parallel.py" in report.warnings[0] \
        and "made whole" in report.warnings[0], report.warnings
    assert report.above_floor()["forward"] == 1, str(report)
