"""The multi-node recipe (docs/multinode.md), run as two torchrun agents on this one machine.

Two ``torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT`` agents
(two "nodes" of two gloo ranks each) train the example GPT with ``examples/train.py --tp 2``: dp=2 x tp=2,
``tp_compile(model, mesh=mesh)`` with FSDP2 over "dp", AdamW and ``clip_grad_norm_``, each dp rank on its
slice of the global batch. Checked from the agents' output: each TP group lies inside one node (the DP
groups are the ones that cross), and the global loss and gradient norm match a single-device copy
trained on the whole batch within 1e-5 relative over 5 steps. Bounded: after ``TIMEOUT`` s both agents
and every worker they started are killed and the test fails with their output.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "examples", "train.py")
TIMEOUT = 180  # s, both agents together; a run takes ~15 s on 2 cores
TOL = 1e-5
ARGS = ["--tp", "2", "--steps", "5", "--batch-size", "8", "--optimizer", "adamw", "--lr", "1e-3",
        "--clip-grad-norm", "1.0", "--compare-single-device", "--tol", str(TOL), "--backend", "aot_eager"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def _kill_tree(pid: int) -> None:
    """SIGKILL an agent, its process group and every descendant: torchrun starts each worker in a
    session of its own, so killing the agent's group alone would leave the workers running."""
    kids, todo, tree = _children(), [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(kids.get(p, []))
    for p in tree:
        for kill in (lambda: os.killpg(p, signal.SIGKILL), lambda: os.kill(p, signal.SIGKILL)):
            try:
                kill()
            except (ProcessLookupError, PermissionError):
                pass


def _run_two_agents(tmp_path, args=ARGS) -> tuple[list[int | None], list[str], float]:
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    agents, logs = [], []
    t0 = time.monotonic()
    try:
        for node in (0, 1):
            log = open(tmp_path / f"node{node}.log", "w+")
            logs.append(log)
            # c10d rendezvous gives out the node ranks itself (--node-rank is ignored); this agent hosts its
            # store when node == 0 (left to itself each would try, the endpoint being local to both)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"tpc-mn-{port}",
                   "--rdzv-conf", f"is_host={'true' if node == 0 else 'false'},join_timeout=60",
                   "--local-addr", "127.0.0.1", "--max-restarts", "0", TRAIN, *args]
            agents.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                           start_new_session=True))
        deadline = t0 + TIMEOUT
        while time.monotonic() < deadline and any(a.poll() is None for a in agents):
            if any(a.poll() not in (None, 0) for a in agents):  # one failed: its peer may hang in a collective
                deadline = min(deadline, time.monotonic() + 15)
            time.sleep(0.2)
    finally:
        for a in agents:
            if a.poll() is None:
                _kill_tree(a.pid)
                a.wait()
    elapsed = time.monotonic() - t0
    outs = []
    for log in logs:
        log.seek(0)
        outs.append(log.read())
        log.close()
    timed_out = elapsed >= TIMEOUT
    return [None if timed_out else a.returncode for a in agents], outs, elapsed


def test_two_torchrun_agents_dp2_tp2_tp_inside_nodes_matches_single_device(tmp_path):
    rcs, outs, elapsed = _run_two_agents(tmp_path)
    shown = "\n".join(f"===== agent {n} (rc {rc}) =====\n{o[-6000:]}" for n, (rc, o) in enumerate(zip(rcs, outs)))
    assert None not in rcs, f"the two agents did not finish within {TIMEOUT} s: killed\n{shown}"
    assert rcs == [0, 0], f"agent exit codes {rcs}\n{shown}"
    out = "\n".join(outs)  # global rank 0 prints; it runs under whichever agent the rendezvous made node 0

    # where each global rank ran: two nodes of two local ranks, consecutive global ranks per node
    where = {int(r): (int(n), int(lr)) for r, n, lr in
             re.findall(r"^  rank (\d+): host \S+, node (\d+), local rank (\d+)$", out, re.M)}
    assert sorted(where) == [0, 1, 2, 3], shown
    assert {n for n, _ in where.values()} == {0, 1}, where
    for node in (0, 1):
        assert sorted(lr for n, lr in where.values() if n == node) == [0, 1], where

    tp_groups = re.findall(r"^TP group \d+: global ranks \[([\d, ]+)\] -> node\(s\) \[([\d, ]+)\]: (.*)$", out, re.M)
    assert len(tp_groups) == 2, shown
    tp_nodes = []
    for ranks, nodes, verdict in tp_groups:
        ranks = [int(r) for r in ranks.split(",")]
        assert len(ranks) == 2 and verdict == "inside one node", tp_groups
        assert len({where[r][0] for r in ranks}) == 1 and nodes.strip() == str(where[ranks[0]][0]), (tp_groups, where)
        tp_nodes.append(where[ranks[0]][0])
    assert sorted(tp_nodes) == [0, 1], tp_groups  # one TP group per node
    dp_groups = re.findall(r"^DP group \d+: global ranks \[[\d, ]+\] -> node\(s\) \[0, 1\]$", out, re.M)
    assert len(dp_groups) == 2, shown  # the DP dim is the one that crosses nodes
    assert "TP groups inside nodes: yes" in out, shown

    # parity: the step table and the verdict
    rows = re.findall(r"^\s+(\d+) \| +([\d.]+) \| +([\d.]+) \| +([\d.e+-]+) \| +([\d.]+) \| +([\d.]+) \|", out, re.M)
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5], shown
    for _, loss, ref, _, norm, ref_norm in rows:
        assert abs(float(loss) - float(ref)) <= TOL * float(ref) + 1e-6, rows  # printed to 6 decimals
        assert abs(float(norm) - float(ref_norm)) <= TOL * float(ref_norm) + 1e-6, rows
    m = re.search(r"^PASS: max relative global loss difference vs single device ([\d.e+-]+) over 5 steps "
                  r"\(tolerance 1e-05\); grad norm ([\d.e+-]+)", out, re.M)
    assert m, shown
    assert float(m.group(1)) <= TOL and float(m.group(2)) <= TOL, m.group(0)
    assert "dp=2 x tp=2" in out, shown
    print(f"two torchrun agents, dp=2 x tp=2: {elapsed:.1f} s; {m.group(0)}")


def test_a_tp_group_across_nodes_is_refused(tmp_path):
    """tp=4 over the two agents would put TP's per-layer all-reduces on the inter-node link: the script
    says so and stops (every rank, before building the model) instead of training."""
    rcs, outs, _ = _run_two_agents(tmp_path, ["--tp", "4", "--steps", "1", "--backend", "aot_eager"])
    out = "\n".join(outs)
    assert None not in rcs and all(rc != 0 for rc in rcs), (rcs, out[-4000:])
    assert re.search(r"^TP group 0: global ranks \[0, 1, 2, 3\] -> node\(s\) \[0, 1\]: SPANS NODES$", out, re.M), out
    assert "TP groups inside nodes: NO" in out and "--allow-tp-across-nodes" in out, out
    assert "parameter elements" not in out, out  # stopped before training
