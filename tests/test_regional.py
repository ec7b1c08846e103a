"""Regional compilation: a repeated block captured, planned, rewritten and compiled once for every layer.

Both ways (``regional=True``, opt-in, and the default whole graph, ``regional=False``: one graph
of every layer) must give the same plan, the same collectives (kind, bytes, module, source line, in
order) and the same numbers as single device. The Inductor side of it (torch 2.13's buffer reuse
across a region's calls, ``tpcompile/backend.py``) is checked by ``tests/test_parity.py``, which
trains both example models regionally under Inductor at TP=4 (whole-graph at TP=2).
"""
import functools

import pytest
import torch

import gpt
import hf_models
import llama
import tpcompile
from multirank import per_case, run_cases
from parity import train_beside_reference


def _explain(make, regional, **kw):
    model, args = make()
    return tpcompile.explain(model, *args, world_size=4, rank=1, regional=regional, **kw)


MODELS = {"gpt": lambda: gpt.make_model(n_layer=3), "llama": lambda: llama.make_model(n_layers=2, device="meta")}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_explain_regional_is_the_whole_graph_rewrite(name):
    reg, whole = _explain(MODELS[name], True), _explain(MODELS[name], False)
    assert reg.records[0].regions and not whole.records[0].regions
    assert list(reg.records[0].regions.values()) == [["h.0.", "h.1.", "h.2."] if name == "gpt" else
                                                     ["layers.0.", "layers.1."]]
    assert reg.graph_code.count("invoke_subgraph(") == len(reg.records[0].regions["subgraph_0"]) and "invoke_subgraph" not in whole.graph_code
    assert reg.params == whole.params
    assert reg.collectives == whole.collectives  # kind, phase, bytes, module (the layer's), source line
    assert reg.floor == whole.floor and reg.above_floor() == {"forward": 0, "backward": 0}
    assert str(reg).replace(reg.graph_code, "") == str(whole).replace(whole.graph_code, "")


def test_sequence_parallel_plans_the_whole_graph():
    """The residual stream between blocks is sharded over tokens under SP: a block planned on its
    own would gather and scatter it at its ends, so SP inlines the regions (the whole-graph plan)."""
    rep = _explain(MODELS["gpt"], True, sequence_parallel=True)
    assert not rep.records[0].regions and "invoke_subgraph" not in rep.graph_code
    assert rep.above_floor() == {"forward": 0, "backward": 0}
    assert [c.module for c in rep.collectives if c.kind == "reduce_scatter" and c.phase == "forward"][1:] == [
        f"h.{i}.{m}" for i in range(3) for m in ("attn.o_proj", "mlp.proj")]


def test_an_override_on_one_layer_plans_the_whole_graph():
    """``plan={"h.1.*": "replicate"}``: layers differ, one program cannot serve them all."""
    rep = _explain(MODELS["gpt"], True, plan={"h.1.*": "replicate"})
    assert not rep.records[0].regions and "invoke_subgraph" not in rep.graph_code
    assert rep.plan["h.1.mlp.fc.weight"] == "replicate" and rep.plan["h.2.mlp.fc.weight"] == "colwise"
    # the inlined layers name their own modules (the body was traced from h.0)
    assert [c.module for c in rep.collectives if c.phase == "forward" and c.kind == "all_reduce"] == [
        "wte", "h.0.attn.o_proj", "h.0.mlp.proj", "h.2.attn.o_proj", "h.2.mlp.proj"]


@functools.cache
def _trained() -> list:
    """One 2-rank gloo job: the example GPT both ways, and a Hugging Face Llama regionally (its
    whole-graph training is tests/test_hf_models.py's; the example Llama's, tests/test_parity.py's)."""
    gpt_case = functools.partial(train_beside_reference, backend="aot_eager", n_layer=2)
    return run_cases(2, [(functools.partial(gpt_case, regional=True), ("gpt", 2)),
                         (functools.partial(gpt_case, regional=False), ("gpt", 2)),
                         (hf_models.train_many, ([("llama", {"steps": 2, "regional": True})],))])


def _check(results):
    for rank, r in enumerate(results):
        for step, (a, b) in enumerate(zip(r["loss"], r["ref_loss"])):
            assert abs(a - b) <= 1e-5 * abs(b), f"rank {rank} step {step}: tp {a} vs single {b}"
        assert r["loss"] == results[0]["loss"]
        assert r["grad_err"] <= 1e-5, f"rank {rank}: gradient off by {r['grad_err']}"


def test_regional_and_whole_graph_train_as_single_device():
    """2 gloo ranks, 2 layers, 2 SGD steps: the example GPT both ways equals single device (loss and
    every gradient) and the other way: the same plan, the same collectives, the same losses."""
    reg, whole = _trained()[:2]
    _check(reg)
    _check(whole)
    assert [list(r.values()) for r in reg[0]["regions"]] == [[["h.0.", "h.1."]]] and whole[0]["regions"] == [{}]
    assert reg[0]["plan"] == whole[0]["plan"] and "colwise" in reg[0]["plan"].values()
    assert reg[0]["collectives"] == whole[0]["collectives"]
    for a, b in zip(reg[0]["loss"], whole[0]["loss"]):
        assert abs(a - b) <= 1e-6 * abs(b)


def test_hugging_face_llama_trains_regionally_as_single_device():
    hf = per_case([rank[0] for rank in _trained()[2]])
    _check(hf)
    assert [list(r.values()) for r in hf[0]["regions"]] == [[["model.layers.0.", "model.layers.1."]]]
    assert hf[0]["n_graphs"] == 1 and hf[0]["warnings"] == []
    assert hf[0]["local_numel"] < 0.75 * hf[0]["full_numel"]


class _BreakingBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.up(x))
        if h.sum() > 0:  # data-dependent: a graph break inside the block
            h = h * 2
        return x + self.down(h)


class _BreakingModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.h = torch.nn.ModuleList([_BreakingBlock() for _ in range(3)])

    def forward(self, x):
        for b in self.h:
            x = b(x)
        return x.pow(2).mean()


def test_a_graph_break_inside_the_block_turns_regions_off_with_a_warning():
    """Dynamo cannot capture a region that breaks (UncapturedHigherOrderOpError): tpcompile warns and
    traces the blocks inline, exactly as regional=False does."""
    torch.manual_seed(0)
    model, x = _BreakingModel(), torch.randn(2, 8, 16)
    reg, whole, auto = (tpcompile.explain(model, x, world_size=2, regional=r) for r in (True, False, None))
    assert any("regional compilation is off" in w and "Data-dependent branching" in w for w in reg.warnings)
    assert not any("regional" in w for w in whole.warnings)
    # the default (regional=None) falls back to the whole graph quietly: compile time, not numbers
    assert auto.warnings == whole.warnings and auto.collectives == whole.collectives
    assert len(reg.records) == len(whole.records) > 1 and not any(r.regions for r in reg.records)
    assert reg.params == whole.params and reg.collectives == whole.collectives
    assert reg.plan == whole.plan


def test_inductor_without_buffer_reuse_gives_regions_single_device_gradients():
    """torch 2.13's Inductor, reusing buffers across a region's calls, got the gradients of every block
    but the last wrong (0.15 came out 133 off), silently: graphs with regions compile with
    ``allow_buffer_reuse=False`` (``tpcompile/backend.py``). Both examples, regionally under Inductor at
    TP=4 (``tests/test_parity.py``'s run, shared when both modules run): every gradient at 1e-5."""
    from test_parity import _gloo

    for name, blocks in (("gpt", ["h.0.", "h.1."]), ("llama", ["layers.0.", "layers.1."])):
        results = _gloo(4)[name]
        assert [list(r.values()) for r in results[0]["regions"]] == [[blocks]]
        assert all(r["grad_err"] <= 1e-5 for r in results), [r["grad_err"] for r in results]


def _hf_both(family: str, grad: bool = True, **overrides):
    """A tiny Hugging Face model explained at TP=4 by default (regional) and with ``regional=False``."""
    model = hf_models.make_model(family, **overrides)
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.set_grad_enabled(grad):
        return [tpcompile.explain(model, world_size=4, rank=1, regional=r, input_ids=ids, labels=ids)
                for r in (True, False)]


def _same(reg, whole, warnings: bool = True):
    assert reg.params == whole.params
    assert reg.collectives == whole.collectives  # kind, phase, bytes, module (the layer's), source line
    assert reg.floor == whole.floor
    if warnings:
        assert reg.warnings == whole.warnings


def test_moe_blocks_are_regions_with_the_whole_graph_plan():
    """Mixtral's experts (grouped_mm, expert-colwise / expert-rowwise) inside a region: the same plan
    and collectives (one reduction per MoE layer, named after its layer) as the whole graph."""
    reg, whole = _hf_both("mixtral", _experts_implementation="grouped_mm")
    assert [list(r.regions.values()) for r in reg.records] == [[["model.layers.0.", "model.layers.1."]]]
    assert "expert-colwise" in reg.plan.values()
    _same(reg, whole)


def test_fused_norms_and_hoisted_parameter_views_plan_the_whole_graph():
    """Under no_grad the norms are fused across the blocks' ends (a block's last reduction with the next
    block's norm): the regions are inlined and every norm the whole graph fuses is fused. Falcon's
    ``input @ self.weight.T``: Dynamo hoists ``weight.T`` out of the region, so the body would see an
    activation: inlined, sharded as the whole graph shards it."""
    with torch.no_grad():
        reg, whole = _explain(MODELS["llama"], True), _explain(MODELS["llama"], False)
    assert not reg.records[0].regions and len(reg.records[0].fused_norms) == len(whole.records[0].fused_norms) == 4
    _same(reg, whole)
    reg, whole = _hf_both("falcon")
    assert not reg.records[0].regions and "colwise" in reg.plan.values()
    # the same parameters left replicated; the warning names the first op without a rule, and inlining
    # moved the hoisted views ahead of the blocks, so it may name another one
    _same(reg, whole, warnings=False)


def test_dropout_in_a_block_plans_the_whole_graph():
    """A block that draws random numbers in training (dropout, SDPA's dropout_p) is inlined: whether
    Inductor's RNG draws afresh for every call of a reused region is not checked."""
    reg = _explain(lambda: gpt.make_model(n_layer=2, dropout=0.1), True)
    assert not reg.records[0].regions
    with torch.no_grad():  # eval-time dropout draws nothing: regions (norms unfused: LayerNorm)
        model, args = gpt.make_model(n_layer=2, dropout=0.1)
        assert tpcompile.explain(model.eval(), *args, world_size=4, fuse_norm=False, regional=True).records[0].regions


def test_a_block_region_inside_a_checkpointed_call_is_planned_whole():
    """Found by the fuzzer (seeds 3 and 11 with regions on: loss 4.5335 against single device's 4.5326, no
    error): blocks called through ``torch.utils.checkpoint`` put their region inside the checkpoint's body,
    where it was never planned as a region nor inlined. It is inlined now: the whole-graph plan and
    collectives, no ``invoke_subgraph`` left."""
    import torch.utils.checkpoint as ckpt

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)

        def forward(self, x):
            return x + self.down(torch.nn.functional.gelu(self.up(x)))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(Block() for _ in range(3))

        def forward(self, x):
            for b in self.blocks:
                x = ckpt.checkpoint(b, x, use_reentrant=False)
            return x.square().mean()

    x = torch.randn(2, 4, 32)
    reg, whole = (tpcompile.explain(Net(), x, world_size=2, regional=r) for r in (True, False))
    assert "invoke_subgraph" not in reg.graph_code
    assert reg.plan == whole.plan and reg.plan["blocks.0.up.weight"] == "colwise"
    assert [(c.phase, c.kind) for c in reg.collectives] == [(c.phase, c.kind) for c in whole.collectives]



def _hooked_losses(regional, before: bool) -> tuple:
    """Losses of a 2-layer GPT on the fake group (TP=2) with a forward hook on the *later* block's
    attention (counts its calls, halves its output), registered before ``tp_compile`` (``before``) or
    after the first call; then removed. (loss, loss hooked, loss unhooked, hook calls, first graph's regions)."""
    from fakepg import fake_group

    with fake_group(2, rank=0):
        torch.manual_seed(0)
        model, (x, y) = gpt.make_model(n_layer=2)
        seen, handles = [], []

        def hook(m):
            handles.append(m.h[1].attn.register_forward_hook(lambda mod, args, out: seen.append(1) or out * 0.5))

        if before:
            hook(model)
        model = tpcompile.tp_compile(model, backend="eager", regional=regional)  # the skip is Dynamo's
        plain = model(x, y).item()
        if not before:
            hook(model)
        hooked = model(x, y).item()
        for h in handles:
            h.remove()
        return plain, hooked, model(x, y).item(), len(seen), tpcompile.tp_state(model).records[0].regions


def test_a_hook_on_a_later_block_is_not_skipped_by_its_region():
    """Found with regions the default (test_parameters.py: loss 5e-4 off, no error): Dynamo checks a
    region's reuse for ``h[1]`` against the guards of ``h[0]``'s trace, which have none on hooks, and
    guards a stamped-out region only on the block it was traced from, so a forward hook on
    ``h[1].attn`` was skipped, registered before ``tp_compile`` or after the first call. A block with
    hooks in it is traced inline (guarded in the caller's frame), with a TPWarning under
    ``regional=True``; the numbers are the whole graph's (the fake group's collectives are no-ops: one
    program gives the same numbers; its numbers against single device: test_parameters.py)."""
    with pytest.warns(tpcompile.TPWarning, match=r"blocks \['h.1'\] are compiled inline"):
        reg = _hooked_losses(True, before=True)
    whole = _hooked_losses(False, before=True)
    assert reg[:4] == whole[:4] and reg[3] == 2 and reg[1] != reg[2], (reg, whole)  # hooked twice, then not
    plain, hooked, unhooked, calls, regions = _hooked_losses(None, before=False)
    assert regions and calls == 1 and hooked != plain, (plain, hooked, unhooked, calls)  # before: 0 calls, plain


def test_backend_eager_runs_the_backward_of_regions():
    """With regions the default, ``tp_compile(backend="eager")``'s first backward raised "fake_mode should be
    enabled for HOPs" (test_parameters.py): torch 2.13's eager ``invoke_subgraph`` runs its backward only
    under a fake mode. The eager backend runs the rewritten regions inline."""
    from fakepg import fake_group

    with fake_group(2):
        model, (x, y) = gpt.make_model(n_layer=2)
        model = tpcompile.tp_compile(model, backend="eager")
        model(x, y).backward()
        assert tpcompile.tp_state(model).records[0].regions == {"subgraph_0": ["h.0.", "h.1."]}
        assert model.h[1].mlp.fc.weight.grad is not None
