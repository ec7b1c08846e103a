"""The Hugging Face Trainer on a tp-compiled model, as a user runs it (``tests/launched_trainer.py``
under torchrun on gloo; no tpcompile call besides ``tp_compile``), against the same script on one
process: every logged loss within 1e-5 (relative), training and evaluation (10 rows in batches of 4:
``gather_for_metrics`` cut the TP ranks' copies wrongly, a silently different eval loss), at TP=2 and
at dp=2 x tp=2 (FSDP2 over dp; the reference takes the global batch), with gradient clipping,
gradient accumulation and checkpoints;
a run resumed from step 2's checkpoint logs steps 3-4 as the uninterrupted run did; and
``trainer.save_model`` writes what plain ``from_pretrained`` loads on one process, with the
reference's trained weights (within 1e-4: four AdamW steps). TRL's SFTTrainer, which swaps in a forward
of its own, is refused clearly."""
import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "launched_trainer.py")


def _launch(out: str, *extra: str, ranks: int = 0) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] \
        if ranks else [sys.executable]
    return subprocess.run([*launch, SCRIPT, "--out", out, *extra], capture_output=True, text=True, timeout=600, env=env)


def _run(out: str, *extra: str, ranks: int = 0) -> dict:
    p = _launch(out, *extra, ranks=ranks)
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    (line,) = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    return {int(k): v for k, v in json.loads(line[len("RESULT "):])["losses"].items()}


def _same_losses(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want), (got, want)
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got, want)


def _same_saved_model(got_dir: str, want_dir: str) -> None:
    from transformers import AutoModelForCausalLM

    got, want = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (got_dir, want_dir))
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-4, msg=name)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-device runs: per-device batch 2 (the TP=2 runs' batch) and 4 (dp=2 x tp=2's global batch)."""
    out = {b: str(tmp_path_factory.mktemp(f"single{b}")) for b in (2, 4)}
    return {b: (out[b], _run(out[b], "--batch", str(b), *(("--eval-rows", "0") if b == 4 else ()))) for b in (2, 4)}


def test_trainer_at_tp2_clipping_accumulation_resume_and_save_model(single, tmp_path):
    ref_dir, ref = single[2]
    full = _run(str(tmp_path / "tp"), ranks=2)
    _same_losses(full, ref)
    assert sorted(os.listdir(tmp_path / "tp")) == ["checkpoint-2", "checkpoint-4", "final"]
    resumed = _run(str(tmp_path / "resumed"), "--resume", str(tmp_path / "tp" / "checkpoint-2"), ranks=2)
    _same_losses(resumed, ref)  # steps 1-2 from the checkpoint's log, 3-4 trained after resuming
    _same_saved_model(str(tmp_path / "tp" / "final"), os.path.join(ref_dir, "final"))
    _same_saved_model(str(tmp_path / "resumed" / "final"), os.path.join(ref_dir, "final"))


def test_trainer_at_dp2_tp2_splits_the_data_over_dp_only(single, tmp_path):
    ref_dir, ref = single[4]
    # no evaluation here (it is tested at TP=2): at dp=2 x tp=2 the no_grad forward broke into 8 graphs,
    # and one cold-cache run of this test hung (not yet understood; docs/models.md limits)
    got = _run(str(tmp_path / "dp2tp2"), "--dp", "2", "--eval-rows", "0", ranks=4)
    _same_losses(got, ref)
    _same_saved_model(str(tmp_path / "dp2tp2" / "final"), os.path.join(ref_dir, "final"))


def test_trl_sft_trainer_is_refused_naming_the_forward_it_put_in(tmp_path):
    """TRL's SFTTrainer replaces ``model.forward`` with its fused LM head, which runs the backbone and
    the head's weight itself (eagerly, on DTensor parameters): refused at the start of training with
    where that forward comes from, not a mixed Tensor/DTensor error from inside ``F.embedding``."""
    pytest.importorskip("trl")
    p = _launch(str(tmp_path / "sft"), "--sft", ranks=2)
    assert p.returncode != 0
    assert "tpcompile: model.forward was replaced after tp_compile" in p.stderr, p.stderr[-4000:]
    assert "trl/trainer/utils.py:" in p.stderr and "SFTTrainer" in p.stderr
    assert "got mixed torch.Tensor and DTensor" not in p.stderr
