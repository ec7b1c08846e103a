"""explain(): one process, any TP degree, the caller's model untouched; the CLI; dumps."""
import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
import torch.distributed as dist

import gpt
import llama
import tpcompile
from fakepg import fake_group
from test_behaviour import BreakingMLP, CumsumMLP, Net

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_three_layers_at_world_size_8_hits_the_floor_and_leaves_the_model_alone():
    L = 3
    model, args = gpt.make_model(n_layer=L, n_head=8, n_embd=128)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = tpcompile.explain(model, *args, world_size=8, rank=5)

    assert rep.counts() == {
        ("forward", "all_reduce"): 2 * L + 1,  # 2 per layer + the vocab-parallel embedding
        ("forward", "all_gather"): 1,  # the loss: one gather of per-row statistics
        ("backward", "all_reduce"): 2 * L + 1,  # 2 per layer + the LM head's input
    }
    assert rep.floor == {
        "forward": {"row-parallel linear": 2 * L, "vocab-parallel embedding": 1, "vocab-parallel loss": 1},
        "backward": {"column-parallel input": 2 * L + 1},
    }
    assert rep.above_floor() == {"forward": 0, "backward": 0}
    # each collective names the module it serves and the user's source line
    fwd_ar = [c for c in rep.collectives if c.phase == "forward" and c.kind == "all_reduce"]
    assert [c.module for c in fwd_ar] == ["wte"] + [f"h.{i}.{m}" for i in range(L) for m in ("attn.o_proj", "mlp.proj")]
    assert all(c.source.startswith("examples/gpt.py:") for c in rep.collectives)
    assert all(c.nbytes == 4 * 32 * 128 * 4 for c in fwd_ar)  # B*T*C fp32
    bwd = [c.module for c in rep.collectives if c.phase == "backward"]
    assert Counter(bwd) == Counter(["lm_head"] + [f"h.{i}.{m}" for i in range(L) for m in ("attn.q_proj", "mlp.fc")])
    # plan, local shapes of rank 5, bytes
    assert rep.plan["h.2.attn.q_proj.weight"] == "colwise" and rep.plan["h.2.mlp.proj.weight"] == "rowwise"
    assert rep.plan["wte.weight"] == "vocab" and rep.plan["h.0.ln_1.weight"] == "replicate"
    assert rep.params["h.0.mlp.fc.weight"].local_shape == (64, 128)
    # the vocab start (5 * 32) is read when the program runs: no rank's number in the graph (test_rank_free.py)
    assert "160" not in rep.graph_code and "(idx, wte_weight, None, '0')" in rep.graph_code
    assert rep.param_bytes_local < rep.param_bytes_full / 4
    text = str(rep)
    assert "rank 5 of 8" in text and text.count("at the floor") == 2 and "warnings: none" in text
    # the caller's model: bitwise unchanged, still a plain module
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not hasattr(model, "_tp_state") and not dist.is_initialized()


def test_symbolic_batch_and_sequence_same_plan_and_floor_bytes_dynamic():
    """Inputs marked dynamic: one graph with symbolic batch / sequence, the plan and the counts of the
    static trace; a collective's size depends on them, so its bytes read "dynamic" (not 0, not a guess)."""
    model, (x, y) = gpt.make_model(n_layer=1)
    static = tpcompile.explain(model, x, y, world_size=2)
    x, y = x.clone(), y.clone()
    for t in (x, y):
        torch._dynamo.mark_dynamic(t, 0)
        torch._dynamo.mark_dynamic(t, 1)
    rep = tpcompile.explain(model, x, y, world_size=2)
    assert len(rep.records) == 1 and rep.plan == static.plan and rep.counts() == static.counts()
    assert rep.above_floor() == {"forward": 0, "backward": 0}
    assert all(c.nbytes == -1 for c in rep.collectives) and all(c.nbytes > 0 for c in static.collectives)
    assert "; dynamic" in str(rep) and " 0 B" not in str(rep)


def test_a_model_on_meta_stays_on_meta():
    model, args = llama.make_model(n_layers=2, device="meta")
    rep = tpcompile.explain(model, *args, world_size=4, rank=3)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert rep.plan["layers.1.feed_forward.down.weight"] == "rowwise"
    assert rep.above_floor() == {"forward": 0, "backward": 0}
    assert "(tokens, tok_embeddings_weight, None, '0')" in rep.graph_code  # rank 3's rows (at 3*64): read at run time


def test_fallbacks_and_graph_breaks_are_listed():
    _, (x, y) = gpt.make_model()
    model, _ = gpt.make_model()
    model.h[0].mlp = CumsumMLP(model.h[0].mlp)
    rep = tpcompile.explain(model, x, y, world_size=2)
    assert any("cumsum" in w and "h.0.mlp.fc" in w for w in rep.warnings)
    assert rep.plan["h.0.mlp.fc.weight"] == "replicate" and rep.plan["h.1.mlp.fc.weight"] == "colwise"

    rep = tpcompile.explain(Net(BreakingMLP), x, y, world_size=2)
    assert len(rep.records) == 2 and "# graph 1" in rep.graph_code
    assert any(w.startswith("graph break") for w in rep.warnings)

    # sizes marked dynamic: the graph before the break returns symbolic shapes, which the stand-in
    # outputs (trace mode computes nothing) take from each call's inputs (this raised "SymIntArrayRef
    # expected to contain only concrete integers")
    x = x.clone()
    torch._dynamo.mark_dynamic(x, 0)
    dyn = tpcompile.explain(Net(BreakingMLP), x, y, world_size=2)
    assert len(dyn.records) == 2 and dyn.plan == rep.plan and dyn.counts() == rep.counts()


def test_clear_errors():
    model, args = gpt.make_model(n_head=6, n_embd=96)
    with pytest.raises(tpcompile.TPShardingError, match=r"6 heads.*tp=4"):
        tpcompile.explain(model, *args, world_size=4, plan={"h.*.attn.*_proj": "colwise"})
    assert not dist.is_initialized()  # the fake group is torn down on errors too
    with fake_group(2):
        with pytest.raises(RuntimeError, match="already initialised"):
            tpcompile.explain(model, *args, world_size=2)
    with pytest.raises(ValueError, match=r"rank=4"):
        tpcompile.explain(model, *args, world_size=4, rank=4)


def test_a_classifier_head_tp_does_not_divide_is_not_an_error():
    """10 classes at tp=4: the head's column-parallel try goes back to replicated (its logits are the
    output), so its size must not stop the plan; it used to raise 'not divisible by tp=4'."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16), torch.nn.Linear(16, 10))
    rep = tpcompile.explain(model, torch.randn(2, 16, requires_grad=True), world_size=4)
    assert rep.plan == {"0.weight": "colwise", "0.bias": "colwise", "2.weight": "rowwise", "2.bias": "replicate",
                        "3.weight": "replicate", "3.bias": "replicate"}
    assert rep.above_floor() == {"forward": 0, "backward": 0}


def test_dump_dir_under_tp_compile_records_forward_and_backward(tmp_path, monkeypatch):
    monkeypatch.setenv("TPCOMPILE_DUMP_DIR", str(tmp_path))
    with fake_group(world_size=2, rank=1):
        model, args = gpt.make_model(n_layer=1)
        model = tpcompile.tp_compile(model, backend="aot_eager")
        model(*args).backward()
    folder = tmp_path / "rank1"
    names = sorted(os.listdir(folder))
    assert {"graph0.captured.py", "graph0.rewritten.py", "graph0.plan.json", "graph0.collectives.json",
            "graph0.rewritten.dot"} <= set(names)
    coll = json.loads((folder / "graph0.collectives.json").read_text())
    phases = Counter((c["phase"], c["kind"]) for c in coll["collectives"])
    assert phases == {("forward", "all_reduce"): 3, ("forward", "all_gather"): 1, ("backward", "all_reduce"): 3}
    plan = {p["fqn"]: p["style"] for p in json.loads((folder / "graph0.plan.json").read_text())}
    assert plan["h.0.attn.o_proj.weight"] == "rowwise"
    assert "copy_to_tp" in (folder / "graph0.rewritten.py").read_text()
    assert "copy_to_tp" not in (folder / "graph0.captured.py").read_text()


def _cli(*argv, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), os.path.join(ROOT, "examples")]))
    return subprocess.run([sys.executable, "-m", "tpcompile", "explain", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_on_the_example_factory_and_a_meta_factory(tmp_path):
    r = _cli("examples/gpt.py:make_model", "--world-size", "4", "--rank", "1", "--graph", "--dump", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "rank 1 of 4" in r.stdout and r.stdout.count("at the floor") == 2
    assert "h.0.attn.o_proj.weight  rowwise" in r.stdout and "rewritten graph:" in r.stdout
    assert (tmp_path / "rank1" / "graph0.collectives.json").exists()
    r = _cli("factories:meta_llama", "--world-size", "2", "--replicate", "layers.*.feed_forward.*")
    assert r.returncode == 0, r.stderr
    assert "layers.0.feed_forward.down.weight  replicate" in r.stdout
    assert "layers.0.attention.o_proj.weight   rowwise" in r.stdout
    r = _cli("examples/gpt.py:nope", "--world-size", "2")
    assert r.returncode != 0 and "has no function 'nope'" in r.stderr


def test_tp_compile_and_explain_work_under_a_torch_compile_wrapper_that_deep_copies_kwargs(monkeypatch):
    """Lightning (imported by litgpt) replaces ``torch.compile`` with a wrapper that deep-copies its keyword
    arguments; tpcompile's backend holds a ProcessGroup, so both died with ``cannot pickle ... ProcessGroup``.
    A copy (or a pickle round trip) of the backend is the backend itself, as with torch's own backends."""
    import copy
    import pickle

    copied = []
    compile_ = torch.compile

    def deep_copying_compile(model, **kwargs):  # what lightning.fabric.wrappers._capture_compile_kwargs does
        out = compile_(model, **kwargs)
        copied.append((kwargs, copy.deepcopy(kwargs)))
        return out

    monkeypatch.setattr(torch, "compile", deep_copying_compile)
    model, args = gpt.make_model()
    rep = tpcompile.explain(model, *args, world_size=2)
    assert rep.above_floor() == {"forward": 0, "backward": 0}
    with fake_group(2):
        tp = tpcompile.tp_compile(gpt.make_model()[0], backend="aot_eager")
        assert tp(*args).shape == ()
    assert copied and all(c["backend"] is k["backend"] for k, c in copied)
    backend = copied[-1][0]["backend"]
    assert pickle.loads(pickle.dumps(backend)) is backend and copy.copy(backend) is backend


def test_explain_with_litgpt_imported(monkeypatch):
    """The real thing: ``import litgpt`` swaps in Lightning's ``torch.compile`` (restored after this test)."""
    monkeypatch.setattr(torch, "compile", torch.compile)  # restored at teardown, after Lightning replaced it
    pytest.importorskip("litgpt")
    from lightning.fabric.wrappers import _capture_compile_kwargs  # noqa: F401 - the wrapper exists

    if not hasattr(torch.compile, "__wrapped__"):  # litgpt imported earlier in this session: wrap again, as its import does
        monkeypatch.setattr(torch, "compile", _capture_compile_kwargs(torch.compile))
    model, args = gpt.make_model()
    rep = tpcompile.explain(model, *args, world_size=4)
    assert rep.above_floor() == {"forward": 0, "backward": 0}


def test_cli_on_timm_create_model_at_world_size_8():
    """README's command on 2 blocks: a library's own factory with its arguments (``device=meta``: no
    memory), inputs from ``--input``; ViT's fused qkv in 3 pieces, heads sharded, at the floor."""
    r = _cli("timm:create_model", "vit_large_patch16_224", "depth=2", "device=meta", "--input", "2x3x224x224",
             "--world-size", "8")
    assert r.returncode == 0, r.stderr
    for line in ("blocks.1.attn.qkv.weight    colwise   dim 0 x3 fused  [3072, 1024] -> [384, 1024]",
                 "blocks.1.attn.proj.weight   rowwise   dim 1           [1024, 1024] -> [1024, 128]",
                 "blocks.1.mlp.fc1.weight     colwise   dim 0           [4096, 1024] -> [512, 1024]",
                 "blocks.1.mlp.fc2.weight     rowwise   dim 1           [1024, 4096] -> [1024, 512]",
                 "head.weight                 replicate                 [1000, 1024]",
                 "floor 4 (4 row-parallel linear): at the floor", "floor 4 (4 column-parallel input): at the floor"):
        assert " ".join(line.split()) in " ".join(r.stdout.split()), line


def test_cli_factory_arguments_and_inputs():
    from tpcompile.__main__ import factory_call, main

    assert factory_call(["vit_base_patch16_224", "depth=2", "device=meta", "qk_norm=True", "img_size=(64, 32)"]) == (
        ["vit_base_patch16_224"], {"depth": 2, "device": "meta", "qk_norm": True, "img_size": (64, 32)})
    with pytest.raises(SystemExit, match="returned a model without inputs: give their shapes with --input"):
        main(["explain", "torch.nn:Linear", "4", "8", "--world-size", "2"])
    with pytest.raises(SystemExit, match="--input is for a factory that returns just a model"):
        main(["explain", "factories:meta_llama", "--input", "2x8", "--world-size", "2"])
    with pytest.raises(SystemExit, match="a shape like 2x3x224x224, got '2,8'"):
        main(["explain", "torch.nn:Linear", "4", "8", "--input", "2,8", "--world-size", "2"])


def test_cli_explains_regional_by_default_and_the_whole_graph_with_a_flag(capsys):
    """``explain`` both ways: the default compiles the repeated block once (one ``invoke_subgraph`` call per
    layer in the rewritten graph); ``--whole-graph`` is ``regional=False``. Same plan and collectives."""
    from tpcompile.__main__ import main

    outs = []
    for flag in ([], ["--whole-graph"]):
        main(["explain", "gpt:make_model", "n_layer=2", "--world-size", "2", "--graph", *flag])
        outs.append(capsys.readouterr().out)
    reg, whole = outs
    assert reg.count("invoke_subgraph(") == 2 and "invoke_subgraph" not in whole
    assert reg.split("rewritten graph:")[0] == whole.split("rewritten graph:")[0]
    assert reg.count("at the floor") == 2


def test_explain_says_when_the_lm_head_stays_whole_because_its_logits_leave_the_model():
    """Loss outside the model (no labels): ``explain`` lists the head as replicated and carries the
    warning with its cost; with labels (loss inside), or with ``sharded_outputs=True``, the head is
    column-parallel and nothing is said."""
    pytest.importorskip("transformers")
    import hf_models

    model = hf_models.make_model("llama", vocab_size=255)
    ids = torch.randint(0, 255, (2, 16), generator=torch.Generator().manual_seed(0))
    outside = tpcompile.explain(model, input_ids=ids, world_size=2)
    assert outside.plan["lm_head.weight"] == "replicate"
    (w,) = [w for w in outside.warnings if "LM head" in w]
    assert "lm_head ([255, 64]: 63.8 KiB held whole instead of 1/2, 31.9 KiB more per rank" in w, w
    assert "32,640 FLOPs per token forward and 65,280 backward" in w, w
    for kw in ({"labels": ids}, {"sharded_outputs": True}):
        r = tpcompile.explain(model, input_ids=ids, world_size=2, **kw)
        assert r.plan["lm_head.weight"] == "colwise", kw
        assert not [w for w in r.warnings if "LM head" in w], (kw, r.warnings)
