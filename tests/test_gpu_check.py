"""``make gpu-check`` (tests/gpu_check.py) on a machine without CUDA: a clear SKIP, exit 0; and
the parts that must work first time on the GPU machine without installing anything: the
checkout importable as ``tpcompile`` (passes/ and runtime/ mapped), the GPU-marked files found."""
import os
import subprocess
import sys

import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_skips_without_cuda():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "gpu_check.py")], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("SKIP gpu-check: no CUDA device here"), p.stdout


def test_gpu_check_imports_this_checkout_and_finds_the_gpu_tests():
    """Where Python's path finder resolves ``tpcompile`` and its subpackages under the folder the
    check puts first on PYTHONPATH (no import: this process has tpcompile already)."""
    from importlib.machinery import PathFinder

    top = gpu_check._importable_checkout()
    pkg = PathFinder.find_spec("tpcompile", [top])
    assert os.path.realpath(pkg.origin) == os.path.join(ROOT, "tpcompile", "__init__.py")
    for sub in ("passes", "runtime", "checkpoint"):
        spec = PathFinder.find_spec(sub, pkg.submodule_search_locations)
        where = sub if sub != "checkpoint" else os.path.join("tpcompile", sub)
        assert os.path.realpath(spec.origin) == os.path.join(ROOT, where, "__init__.py"), sub
    files = gpu_check.gpu_test_files()
    assert {"tests/test_ce_kernels.py", "tests/test_async_tp.py", "tests/test_te.py"} <= set(files)
    assert set(gpu_check.LIMITS) == {"gpu tests", *gpu_check.CHILD} and sum(gpu_check.LIMITS.values()) < 600
