"""Checkpoints across both dimensions (issue 12, item 5): DCP saved at (dp=2, tp=2), FSDP2 over TP,
loads at (dp=1, tp=2), at (dp=2, tp=1) and into a plain single-device model, bitwise, AdamW state included.

Saved on 4 gloo ranks after a few AdamW steps, each dp rank on its half of the batch, for models whose
FSDP2 shards are more than one box of the full tensor:

- ``gpt``: the example GPT through ``tp_compile(model, mesh=mesh)`` (FSDP2 per block and on the root);
- ``gpt-padded``: vocabulary 255 at tp=2, zero-padded to 256 in the program (stored shards 128 and
  127 rows, FSDP2 cuts those 64 + 64 and 64 + 63): the explicit form, ``fully_shard`` on the root;
- ``fused``: a fused ``qkv`` split in 3 and ``up`` chunked in 2: FSDP2's shard of the TP shard
  ``[q_r | k_r | v_r]`` cuts through a piece (``(_StridedShard(0, sf=2), _StridedShard(0, sf=3))``,
  where DCP's own boxes overlap and its save used to fail);
- ``gqa``: a fused GQA projection with unequal pieces (16, 8, 8), which no DTensor placement describes
  (DCP's boxes from FSDP2's placements silently scrambled its q/k/v rows);
- ``gqa-hsdp``: the same through ``tp_compile(model, mesh=...)`` on a (dp_replicate=1, dp_shard=2, tp=2)
  mesh: HSDP's 3-D DTensors.

The saved full tensors are the ones ``full_state_dict`` / ``full_optim_state_dict`` gather at save time;
at step 0 they equal the single-device state dict bit for bit, after training they match single-device
AdamW on the whole batch (float rounding only).
"""
from __future__ import annotations

import os

import pytest
import torch

import gpt
import spellings
import tpcompile
from multirank import run_ranks_bytes as _ranks, to_bytes as _out
from tpcompile.checkpoint import TPCheckpointError, full_optim_state_dict

STEPS = 2
CASES = ("gpt", "gpt-padded", "fused", "gqa", "gqa-hsdp")


# ----------------------------------------------------------------------------- models (any process)
def _make(name: str, seed: int = 0):
    """(single-device model, batch, loss of (model, *batch)): the same on every process for a seed."""
    if name in ("gpt", "gpt-padded"):
        model, batch = gpt.make_model(vocab_size=255 if name == "gpt-padded" else 256, seed=seed)
        return model, batch, lambda m, x, y: m(x, y)
    if name == "fused":
        from test_checkpoint import FusedLM

        with torch.random.fork_rng():
            torch.manual_seed(5 + seed)
            model = FusedLM()
        x = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
        return model, (x, x), lambda m, x, y: m(x, y)
    with torch.random.fork_rng():  # gqa, gqa-hsdp
        model, x = spellings.make(spellings.FusedQKVGQA, seed=seed)
    return model, (x,), lambda m, x: m(x)


def _half(batch, dp: int, n: int = 2):
    return tuple(t.chunk(n)[dp] for t in batch)


def _train(model, opt, loss_of, batch, steps: int = STEPS) -> None:
    for _ in range(steps):
        loss_of(model, *batch).backward()
        opt.step()
        opt.zero_grad()


def _fully_shard(model, mesh) -> None:
    """FSDP2 the usual way: each transformer block, then the root."""
    from torch.distributed.fsdp import fully_shard

    for b in model.h if isinstance(model, gpt.GPT) else ():
        fully_shard(b, mesh=mesh)
    fully_shard(model, mesh=mesh)


# ----------------------------------------------------------------------------- rank workers
def _build_2d(name: str, mesh, seed: int = 0):
    """``name`` at (dp=2, tp=2): the GPT through ``tp_compile(mesh=...)``, the others in the explicit
    form with ``fully_shard`` on the root (per-block FSDP2 makes Dynamo compile the LM head apart
    from its loss, where tp_compile refuses a padded vocabulary: see the report of this change);
    ``gqa-hsdp`` through ``tp_compile(mesh=...)`` on a 3-D HSDP mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, batch, loss_of = _make(name, seed)
    misplaced = None
    if name == "gqa-hsdp":
        mesh = init_device_mesh("cpu", (1, 2, 2), mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
        half = _half(batch, mesh["dp_shard"].get_local_rank())
        model = tpcompile.tp_compile(model, mesh=mesh, example_inputs=half, backend="aot_eager")
        return model, half, loss_of, misplaced
    half = _half(batch, mesh["dp"].get_local_rank())
    if name == "gpt":
        model = tpcompile.tp_compile(model, mesh=mesh, example_inputs=half, backend="aot_eager")
    else:
        model = tpcompile.tp_compile(model, group=mesh["tp"], example_inputs=half, backend="aot_eager")
        if name == "fused":
            misplaced = _misplaced(model, mesh)
        fully_shard(model, mesh=mesh["dp"])
    return model, half, loss_of, misplaced


def _save_worker(rank: int, world: int, path: str) -> bytes:
    """Train at (dp=2, tp=2), save; then load into a fresh (dp=2, tp=2) model with other weights (first
    the single-device safetensors file, then the DCP checkpoint) and take one more step on both: the
    resumed run is the uninterrupted one, bit for bit."""
    import torch._dynamo
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    out = {}
    for name in CASES:
        model, half, loss_of, misplaced = _build_2d(name, mesh)
        init = tpcompile.full_state_dict(model)
        placements = {k: tuple(repr(p) for p in v.placements) for k, v in model.state_dict().items()}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        _train(model, opt, loss_of, half)
        tpcompile.save_checkpoint(model, os.path.join(path, name), optimizer=opt)
        out[name] = {"init": init, "placements": placements, "full": tpcompile.full_state_dict(model),
                     "optim": full_optim_state_dict(model, opt), "misplaced": misplaced}
        again, _, _, _ = _build_2d(name, mesh, seed=7)
        # first a single-device safetensors file (as published) into the FSDP2-sharded model, and back out
        tpcompile.load_checkpoint(again, os.path.join(path, f"{name}.safetensors"))
        out[name]["from_safetensors"] = tpcompile.full_state_dict(again)
        tpcompile.save_checkpoint(again, os.path.join(path, f"{name}-resaved.safetensors"), format="safetensors")
        opt2 = torch.optim.AdamW(again.parameters(), lr=1e-3)
        tpcompile.load_checkpoint(again, os.path.join(path, name), optimizer=opt2)
        out[name]["resumed"] = {"full": tpcompile.full_state_dict(again), "optim": full_optim_state_dict(again, opt2),
                                "lr": opt2.param_groups[0]["lr"]}
        _train(model, opt, loss_of, half, steps=1)
        _train(again, opt2, loss_of, half, steps=1)
        out[name]["next"] = (tpcompile.full_state_dict(model), tpcompile.full_state_dict(again))
        torch._dynamo.reset()
    return _out(out)


def _misplaced(model, mesh) -> str:
    """part_of on a 2-D DTensor over the TP mesh whose TP placement is not the layout's."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from tpcompile.checkpoint.state_dict import layout_of, part_of

    bad = DTensor.from_local(model.qkv.weight.to_local(), mesh, [Replicate(), Shard(0)], run_check=False)
    try:
        part_of(model, bad, layout_of(model, "qkv.weight"))
    except TPCheckpointError as e:
        return str(e)
    return "no error"


def _load_tp_worker(rank: int, world: int, path: str) -> bytes:
    """(dp=1, tp=2): a TP-only model with other weights, loaded with its optimizer."""
    import torch._dynamo

    out = {}
    for name in CASES:
        model, batch, _ = _make(name, seed=7)
        model = tpcompile.tp_compile(model, example_inputs=batch, backend="aot_eager")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # lr comes back from the checkpoint
        tpcompile.load_checkpoint(model, os.path.join(path, name), optimizer=opt)
        out[name] = {"full": tpcompile.full_state_dict(model), "optim": full_optim_state_dict(model, opt),
                     "lr": opt.param_groups[0]["lr"]}
        torch._dynamo.reset()
    return _out(out)


def _load_dp_worker(rank: int, world: int, path: str) -> bytes:
    """(dp=2, tp=1): FSDP2 over the plain model (per block and root), as a user without TP writes it;
    and the example GPT through ``tp_compile(model, mesh=...)`` on a (dp=2, tp=1) mesh."""
    import torch._dynamo
    from torch.distributed.device_mesh import init_device_mesh

    out = {}
    dp_mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    for name in CASES:
        model, _, _ = _make(name, seed=7)
        _fully_shard(model, dp_mesh)
        tpcompile.load_checkpoint(model, os.path.join(path, f"{name}.safetensors"))  # DTensor's own boxes
        from_safetensors = tpcompile.full_state_dict(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        tpcompile.load_checkpoint(model, os.path.join(path, name), optimizer=opt)
        out[name] = {"full": tpcompile.full_state_dict(model), "optim": full_optim_state_dict(model, opt),
                     "lr": opt.param_groups[0]["lr"], "placement": repr(model.h[0].mlp.fc.weight.placements)
                     if name == "gpt" else None, "from_safetensors": from_safetensors}
    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "tp"))
    model, batch, _ = _make("gpt", seed=7)
    model = tpcompile.tp_compile(model, mesh=mesh, example_inputs=_half(batch, rank), backend="aot_eager")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tpcompile.load_checkpoint(model, os.path.join(path, "gpt"), optimizer=opt)
    out["gpt@tp1"] = {"full": tpcompile.full_state_dict(model), "optim": full_optim_state_dict(model, opt),
                      "lr": opt.param_groups[0]["lr"]}
    torch._dynamo.reset()
    return _out(out)


# ----------------------------------------------------------------------------- checks
def _assert_equal(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), (what, sorted(set(got) ^ set(want)))
    for k, v in want.items():
        if isinstance(v, dict):
            _assert_equal(got[k], v, f"{what} {k}")
        elif isinstance(v, torch.Tensor):
            assert torch.equal(got[k], v), (what, k)
        else:
            assert got[k] == v, (what, k, got[k], v)


def _max_err(got: dict, want: dict) -> float:
    return max((got[k] - v).abs().max().item() for k, v in want.items() if isinstance(v, torch.Tensor) and v.numel())


def _published(model) -> dict:
    """The state dict as a published safetensors file holds it: each tied weight once."""
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            out[k] = v.contiguous()
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("dcp2d")
    for name in CASES:
        save_file(_published(_make(name)[0]), str(path / f"{name}.safetensors"))
    return path, _ranks(_save_worker, 4, str(path))[0]


def test_full_state_dict_under_fsdp2_equals_single_device(saved):
    """Under FSDP2 over TP, ``full_state_dict`` is the single-device state dict bit for bit (step 0).
    After the AdamW steps the gathered parameters and AdamW moments are single-device AdamW's on the
    whole batch up to float rounding: moments to 1e-3 of each tensor's
    largest, parameters to 5e-3 (AdamW's first steps are about lr * sign(grad), so an element whose
    gradient is rounding noise, k_proj's bias, may move by up to 2e-2 either way; a row put in the
    wrong place by a gather is off by the weights' own size, 2e-2 and more, in many elements)."""
    _, res = saved
    for name in CASES:
        ref, batch, loss_of = _make(name)
        _assert_equal(res[name]["init"], ref.state_dict(), f"{name} step 0")
        opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
        _train(ref, opt, loss_of, batch)
        assert _max_err(res[name]["full"], ref.state_dict()) < 5e-3, name
        ref_optim = full_optim_state_dict(ref, opt)
        assert res[name]["optim"].keys() == ref_optim.keys()
        for fqn, s in ref_optim.items():
            got = res[name]["optim"][fqn]
            assert got.keys() == s.keys() and torch.equal(got["step"], s["step"]), (name, fqn)
            for k in ("exp_avg", "exp_avg_sq"):
                assert (got[k] - s[k]).abs().max() <= 1e-3 * s[k].abs().max() + 1e-9, (name, fqn, k)
    # the layouts that make this more than DTensor's own boxes
    pl = {name: res[name]["placements"] for name in CASES}
    assert pl["fused"]["qkv.weight"] == ("_StridedShard(dim=0, sf=2)", "_StridedShard(dim=0, sf=3)")
    assert pl["fused"]["up.weight"] == ("_StridedShard(dim=0, sf=2)", "_StridedShard(dim=0, sf=2)")
    assert pl["gpt-padded"]["wte.weight"] == ("_StridedShard(dim=0, sf=2)", "Shard(dim=0)")
    assert pl["gpt"]["h.0.attn.o_proj.weight"] == ("Shard(dim=0)", "Shard(dim=1)")
    assert pl["gqa"]["qkv.weight"] == ("_StridedShard(dim=0, sf=2)", "Shard(dim=0)")  # FSDP2's; the layout is ours
    assert pl["gqa-hsdp"]["qkv.weight"] == ("Replicate()", "_StridedShard(dim=0, sf=2)", "Shard(dim=0)")


def test_safetensors_load_and_save_under_fsdp2(saved):
    """A single-device safetensors file loads into the (dp=2, tp=2) FSDP2-sharded models (each rank
    reading only its boxes), bitwise; ``save_checkpoint(format="safetensors")`` writes it back whole."""
    from safetensors.torch import load_file

    path, res = saved
    for name in CASES:
        ref = _make(name)[0]
        _assert_equal(res[name]["from_safetensors"], ref.state_dict(), f"{name} from safetensors")
        _assert_equal(load_file(str(path / f"{name}-resaved.safetensors")), _published(ref), f"{name} resaved")


def _assert_loaded(got: dict, saved: dict, where: str) -> None:
    _assert_equal(got["full"], saved["full"], f"{where} params")
    _assert_equal(got["optim"], saved["optim"], f"{where} AdamW state")
    assert got["lr"] == 1e-2, where


def test_dcp_2d_loads_at_dp2_tp2_and_resumes(saved):
    """(dp=2, tp=2) -> (dp=2, tp=2), a fresh model with other weights: every full tensor and AdamW
    state tensor back bit for bit, and the next step equals the uninterrupted run's bit for bit."""
    _, res = saved
    for name in CASES:
        _assert_loaded(res[name]["resumed"], res[name], f"{name} at (2, 2)")
        _assert_equal(*res[name]["next"], f"{name} next step")


def test_dcp_2d_loads_at_dp1_tp2(saved):
    """(dp=2, tp=2) -> (dp=1, tp=2): TP-only models with other weights get every saved full tensor and
    every AdamW state tensor back bit for bit (and the saved lr)."""
    path, res = saved
    loaded = _ranks(_load_tp_worker, 2, str(path))[0]
    for name in CASES:
        _assert_loaded(loaded[name], res[name], f"{name} at tp=2")


def test_dcp_2d_loads_at_dp2_tp1(saved):
    """(dp=2, tp=2) -> (dp=2, tp=1): FSDP2 over the plain model (per block + root), and the GPT through
    ``tp_compile(model, mesh=...)`` on a (dp=2, tp=1) mesh: bitwise params and AdamW state. (FSDP2 over
    the plain model also loads the single-device safetensors file first, bitwise.)"""
    path, res = saved
    loaded = _ranks(_load_dp_worker, 2, str(path))[0]
    for name in CASES:
        _assert_loaded(loaded[name], res[name], f"{name} at dp=2")
        _assert_equal(loaded[name]["from_safetensors"], _make(name)[0].state_dict(), f"{name} safetensors at dp=2")
    assert loaded["gpt"]["placement"] == "(Shard(dim=0),)"
    _assert_loaded(loaded["gpt@tp1"], res["gpt"], "gpt at dp=2 through tp_compile(mesh=(2, 1))")


def test_dcp_2d_loads_into_a_plain_model(saved):
    """(dp=2, tp=2) -> one device, no process group: the plain model and AdamW hold the saved full
    tensors bit for bit, and one more step runs."""
    path, res = saved
    for name in CASES:
        model, batch, loss_of = _make(name, seed=7)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        tpcompile.load_checkpoint(model, path / name, optimizer=opt)
        _assert_loaded({"full": model.state_dict(), "optim": full_optim_state_dict(model, opt),
                        "lr": opt.param_groups[0]["lr"]}, res[name], f"{name} plain")
        _train(model, opt, loss_of, batch, steps=1)


# ----------------------------------------------------------------------------- one process
def test_boxes_of_an_fsdp2_slice():
    """The layout's DCP boxes of FSDP2's slice of a stored shard: pieces cut where the slice cuts them."""
    from tpcompile.passes.layout import ParamPlan

    qkv = ParamPlan("qkv.weight", "colwise", 0, 3, (96, 32), (48, 32))  # tp=2: [q_r | k_r | v_r], 16 rows each
    assert qkv.boxes(1) == [((16, 0), (16, 32), (0, 0)), ((48, 0), (16, 32), (16, 0)), ((80, 0), (16, 32), (32, 0))]
    # dp rank 1 of 2 holds rows 24:48 of TP rank 1's shard: the second half of k_1, all of v_1
    assert qkv.boxes(1, (0, 24, 24)) == [((56, 0), (8, 32), (0, 0)), ((80, 0), (16, 32), (8, 0))]
    gqa = ParamPlan("qkv.weight", "colwise", 0, 3, (32, 16), (16, 16), pieces=(16, 8, 8))
    assert gqa.boxes(0, (0, 8, 8)) == [((16, 0), (4, 16), (0, 0)), ((24, 0), (4, 16), (4, 0))]
    wte = ParamPlan("wte.weight", "vocab", 0, 1, (255, 64), (128, 64), (256, 64))
    assert wte.boxes(1, (0, 64, 63)) == [((192, 0), (63, 64), (0, 0))]  # 127 stored rows: 64 + 63
    assert wte.boxes(1, (0, 127, 0)) == []  # an empty FSDP2 chunk holds nothing
    row = ParamPlan("o.weight", "rowwise", 1, 1, (32, 32), (32, 16))
    assert row.boxes(1, (0, 16, 16)) == [((16, 16), (16, 16), (0, 0))]  # FSDP2 on dim 0, TP on dim 1


def test_a_2d_layout_that_is_not_fsdp2_over_tp_is_a_clear_error(saved):
    """A 2-D DTensor over the TP mesh whose TP placement is not the layout's (made on the save ranks)
    cannot be checkpointed correctly: ``TPCheckpointError`` naming the parameter, never a silently
    wrong checkpoint."""
    msg = saved[1]["fused"]["misplaced"]
    assert msg.startswith("qkv.weight: cannot save, load or gather its 2-D DTensor (Replicate(), Shard(dim=0))"), msg
    assert "not the layout's _StridedShard(dim=0, sf=3)" in msg and "nothing was saved or loaded" in msg
