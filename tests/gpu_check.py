"""``make gpu-check``: what to run first on a machine with one NVIDIA GPU (no network needed).

Each check runs in its own process with its own time limit (all together well under 10 minutes),
so one crash does not hide the others; one summary table at the end; exit status 1 if any
check failed, 0 if all passed, 0 with a SKIP line on a machine without CUDA.

  gpu tests        pytest -m gpu: the GPU-marked tests (CE kernels on CUDA, Transformer Engine,
                   golden graphs on CUDA, async TP fused on a 1-rank NCCL group)
  ce kernels       vocab_parallel_cross_entropy (its Triton kernels) vs F.cross_entropy (eager and
                   compiled), forward+backward: time and achieved bandwidth (3 N V bytes moved)
  gpt tp program   examples/gpt.py under tp_compile on a 1-rank NCCL group, the TP rewrite kept
                   (TPCOMPILE_TP1_REWRITE=1): Inductor's CUDA code holds the collectives and the CE
                   kernels; loss and gradients equal the plain model's; without the knob (TP=1 is
                   torch.compile) the code holds no collective
  reduce-overhead  the same under mode="reduce-overhead": CUDA graphs used, 3 steps equal eager's

Uses the python it runs under (a CUDA build of torch 2.11+); tpcompile is imported from this
checkout (an installed one is not needed).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE, BACKEND = "cuda", "nccl"  # what the checks run on (a CPU dry run of the GPT checks sets cpu / gloo)
LIMITS = {"gpu tests": 300, "ce kernels": 70, "gpt tp program": 110, "reduce-overhead": 90}


def _importable_checkout() -> str:
    """A folder whose ``tpcompile`` package is this checkout (its passes/ and runtime/ folders
    mapped to tpcompile.passes / .runtime as pyproject.toml installs them), by symlinks."""
    top = tempfile.mkdtemp(prefix="tpcompile-gpu-check-")
    pkg = os.path.join(top, "tpcompile")
    os.mkdir(pkg)
    for name in os.listdir(os.path.join(ROOT, "tpcompile")):
        if name != "__pycache__":
            os.symlink(os.path.join(ROOT, "tpcompile", name), os.path.join(pkg, name))
    for sub in ("passes", "runtime"):
        os.symlink(os.path.join(ROOT, sub), os.path.join(pkg, sub))
    return top


def _one_rank_nccl():
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(BACKEND, store=dist.HashStore(), rank=0, world_size=1)
    return dist.group.WORLD


# ----------------------------------------------------------------------------- the checks (child side)
def check_ce_kernels() -> dict:
    import torch
    import torch.nn.functional as F

    from tpcompile.runtime import ce_kernels, vocab_parallel_cross_entropy

    name = _one_rank_nccl().group_name
    rows, ok = [], True
    for n, v, dtype in ((4096, 32768, torch.bfloat16), (8192, 131072, torch.bfloat16), (4096, 32768, torch.float32)):
        g = torch.Generator(device="cuda").manual_seed(0)
        x = (2 * torch.randn(n, v, generator=g, device="cuda")).to(dtype).requires_grad_()
        t = torch.randint(0, v, (n,), generator=g, device="cuda")
        methods = {
            "F.cross_entropy": lambda a: F.cross_entropy(a.float(), t),
            "F.cross_entropy, compiled": torch.compile(lambda a: F.cross_entropy(a.float(), t)),
            "tpcompile (triton)": lambda a: vocab_parallel_cross_entropy(a, t, 0, v, name),
        }
        assert ce_kernels.impl_for(x) == "triton", ce_kernels.impl_for(x)
        losses = {}
        for label, f in methods.items():
            for _ in range(3):  # warm-up (and compile)
                f(x).backward()
                x.grad = None
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            reps = 10
            torch.cuda.synchronize()
            start.record()
            for _ in range(reps):
                loss = f(x)
                loss.backward()
                x.grad = None
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / reps
            losses[label] = loss.item()
            gbps = 3 * n * v * x.element_size() / (ms * 1e-3) / 1e9  # read fwd, read + write bwd
            rows.append({"size": f"{n}x{v} {str(dtype)[6:]}", "method": label, "ms": round(ms, 3),
                         "GB/s": round(gbps)})
        ref = losses["F.cross_entropy"]
        ok = ok and abs(losses["tpcompile (triton)"] - ref) <= 1e-3 * abs(ref)
    for r in rows:
        base = next(b for b in rows if b["size"] == r["size"] and b["method"] == "F.cross_entropy")
        r["x F.cross_entropy"] = round(base["ms"] / r["ms"], 2)
    return {"ok": ok, "rows": rows}


def _gpt_step_code(mode: str | None, keep_tp: bool, steps: int = 1) -> dict:
    import torch

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import gpt
    import tpcompile
    from torch._inductor.utils import run_and_get_code

    os.environ["TPCOMPILE_TP1_REWRITE"] = "1" if keep_tp else "0"
    _one_rank_nccl()
    torch._dynamo.reset()
    ref, (x, y) = gpt.make_model(device=DEVICE, n_embd=256, n_head=4, n_layer=2, vocab_size=4096, block_size=128)
    model, _ = gpt.make_model(device=DEVICE, n_embd=256, n_head=4, n_layer=2, vocab_size=4096, block_size=128)
    kw = {"mode": mode} if mode else {}
    model = tpcompile.tp_compile(model, **kw)
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, ref))
    codes, losses, ref_losses = [], [], []

    def step():
        opt.zero_grad()
        loss = model(x, y)
        loss.backward()
        return loss.detach().clone()

    for i in range(steps):
        if i == 0:  # the compiling step: Inductor's code for forward and backward
            loss, codes = run_and_get_code(step)
        else:
            loss = step()
        ref_opt.zero_grad()
        ref_loss = ref(x, y)
        ref_loss.backward()
        pairs = [(p.grad.full_tensor(), q.grad) for p, q in zip(model.parameters(), ref.parameters())]
        # relative to the largest gradient: some are ~0 (a key bias), their own scale is rounding
        grad_err = max(float((a - b).abs().max()) for a, b in pairs) / max(float(b.abs().max()) for _, b in pairs)
        opt.step()
        ref_opt.step()
        losses.append(loss.item())
        ref_losses.append(ref_loss.item())
    code = "\n".join(codes)
    return {"code": code, "losses": losses, "ref_losses": ref_losses, "grad_err": grad_err,
            "graphs": len(tpcompile.tp_state(model).records)}


def check_gpt_tp_program() -> dict:
    tp = _gpt_step_code(None, keep_tp=True)
    plain = _gpt_step_code(None, keep_tp=False)
    want = {"all_reduce": "_c10d_functional.all_reduce", "all_gather": "_c10d_functional.all_gather_into_tensor",
            "wait_tensor": "_c10d_functional.wait_tensor", "CE stats kernel": "_stats_kernel",
            "CE grad kernel": "_grad_kernel"}
    found = {k: s in tp["code"] for k, s in want.items()}
    no_collective = "_c10d_functional" not in plain["code"]
    close = all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(tp["losses"] + plain["losses"],
                                                            tp["ref_losses"] + plain["ref_losses"]))
    ok = all(found.values()) and no_collective and close and max(tp["grad_err"], plain["grad_err"]) <= 1e-4
    return {"ok": ok, "in TP code": found, "TP=1 code without collectives": no_collective,
            "loss (tp, plain, eager)": [tp["losses"][0], plain["losses"][0], tp["ref_losses"][0]],
            "grad rel err": [tp["grad_err"], plain["grad_err"]]}


def check_reduce_overhead() -> dict:
    import torch

    import importlib

    torch._dynamo.utils.counters.clear()
    reasons = []  # why Inductor ran a graph without CUDA graphs (its message, caught where it is raised)
    for mod in ("cudagraph_utils", "cudagraph_trees", "output_code", "compile_fx"):
        mod = importlib.import_module(f"torch._inductor.{mod}")
        bump = getattr(mod, "log_cudagraph_skip_and_bump_counter", None)
        if bump is not None:
            setattr(mod, "log_cudagraph_skip_and_bump_counter",
                    lambda msg, bump=bump: (reasons.append(msg), bump(msg))[1])
    r = _gpt_step_code("reduce-overhead", keep_tp=True, steps=3)
    skipped = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]  # graphs that ran without CUDA graphs
    close = all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(r["losses"], r["ref_losses"]))
    return {"ok": close and not skipped and r["grad_err"] <= 1e-4, "losses": r["losses"],
            "eager": r["ref_losses"], "cudagraph skips": skipped, "why": reasons[:3], "grad rel err": r["grad_err"]}


CHILD = {"ce kernels": check_ce_kernels, "gpt tp program": check_gpt_tp_program,
         "reduce-overhead": check_reduce_overhead}


# ----------------------------------------------------------------------------- the driver
def gpu_test_files() -> list:
    """The test files with GPU-marked tests (collecting only those: the others import optional
    third-party libraries a GPU machine may lack)."""
    tests = os.path.join(ROOT, "tests")
    return sorted(os.path.join("tests", f) for f in os.listdir(tests) if f.startswith("test_") and f.endswith(".py")
                  and "mark.gpu" in open(os.path.join(tests, f)).read())


def _run(cmd: list, env: dict, limit: float) -> tuple:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        return p.returncode, p.stdout, p.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return "timeout", out, f"killed after {limit:.0f} s", time.perf_counter() - t0


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print(f"SKIP gpu-check: no CUDA device here (torch {torch.__version__}, built with CUDA "
              f"{torch.version.cuda or 'none'}). Run `make gpu-check` on a machine with an NVIDIA GPU and a "
              f"CUDA build of torch 2.11+.")
        return 0
    print(f"gpu-check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}",
          flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [_importable_checkout(), os.path.join(ROOT, "examples"), os.environ.get("PYTHONPATH", "")]))
    env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    results = []
    rc, out, err, secs = _run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                               *gpu_test_files()], env, LIMITS["gpu tests"])
    tail = (out.strip().splitlines() or [""])[-1]
    results.append(("gpu tests", rc == 0, secs, tail if rc != "timeout" else err))
    if rc != 0:
        print(out[-4000:], err[-2000:], sep="\n", flush=True)
    for name in CHILD:
        rc, out, err, secs = _run([sys.executable, os.path.abspath(__file__), "--child", name], env, LIMITS[name])
        try:
            res = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            res = {"ok": False, "error": (err.strip().splitlines() or ["no output"])[-1] if rc != "timeout" else err}
            print(f"--- {name} failed (rc {rc}):\n{err[-4000:]}", flush=True)
        if name == "ce kernels" and "rows" in res:
            print("\n| CE size | method | ms (fwd+bwd) | GB/s | x F.cross_entropy |\n|---|---|---:|---:|---:|")
            for r in res.pop("rows"):
                print(f"| {r['size']} | {r['method']} | {r['ms']} | {r['GB/s']} | {r['x F.cross_entropy']} |")
        ok = bool(res.pop("ok", False)) and rc == 0
        results.append((name, ok, secs, json.dumps(res, default=str)[:300]))
    print("\n| check | result | seconds | detail |\n|---|---|---:|---|")
    for name, ok, secs, detail in results:
        print(f"| {name} | {'PASS' if ok else 'FAIL'} | {secs:.0f} | {detail} |")
    failed = [n for n, ok, _, _ in results if not ok]
    print(f"\ngpu-check: {'FAILED: ' + ', '.join(failed) if failed else 'all passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(CHILD[sys.argv[2]](), default=str))
        raise SystemExit(0)
    raise SystemExit(main())
