"""Under torchrun, as a Trainer script runs: ``tp_compile`` initialises the default process group itself
(said once with a ``TPWarning``) and its first-call input check accepts the Trainer's keyword arguments
(a 0-dim tensor, a dict, a list with ``None``, a dataclass), which crashed it (``self.dim() cannot be 0
to view Float as Byte``). Two SGD steps at TP=2 on gloo: the losses equal single device's within 1e-5, every gradient within 1e-5."""
import json
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launched_trainer_inputs.py")


def test_torchrun_without_init_process_group_and_trainer_style_inputs():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", SCRIPT]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    (line,) = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    r = json.loads(line[len("RESULT "):])
    assert r["world"] == 2 and r["backend"] == "gloo", r
    assert sum("initialised the default process group" in m for m in r["said"]) == 1, r["said"]
    assert len(r["losses"]) == 2 and r["grad_err"] <= 1e-5, r
    for tp_loss, ref_loss in r["losses"]:
        assert abs(tp_loss - ref_loss) <= 1e-5 * abs(ref_loss), r["losses"]
