"""Run a function on N gloo ranks (separate processes) and collect what each returns.

Real collectives on CPU, the ground truth for numerics. The function must be importable
(module level) so the spawn start method can pickle it.
"""
from __future__ import annotations

import atexit
import os
import tempfile
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

from tpcompile.compat import torchvision_without_kernels

# a spawned rank imports this module (``_worker``) before the case's own (which may import timm or
# transformers, and so torchvision): see tests/conftest.py
torchvision_without_kernels()


def _init(rank: int, world_size: int, store_path: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world_size), rank=rank, world_size=world_size)


def _worker(rank: int, world_size: int, store_path: str, jobs, results) -> None:
    """One rank of a pool: joins the gloo group once, then runs job after job (Dynamo reset between)."""
    import torch._dynamo

    try:
        _init(rank, world_size, store_path)
    except BaseException:  # noqa: BLE001
        results.put((rank, False, traceback.format_exc()))
        return
    while (job := jobs.get()) is not None:
        fn, args, kwargs = job
        try:
            results.put((rank, True, fn(rank, world_size, *args, **kwargs)))
        except BaseException:  # noqa: BLE001 - report everything to the parent
            results.put((rank, False, traceback.format_exc()))
        torch._dynamo.reset()


class _Pool:
    """``world_size`` spawned gloo ranks kept for the whole session.

    A process start and the imports (torch, transformers, timm) cost seconds per rank on a 2-core
    machine, and the suite starts dozens of groups: a pool starts each world size once. Any
    failure or timeout kills the pool (the other ranks may hang in a collective); the next call
    starts a fresh one. ``TPCOMPILE_FRESH_RANKS=1`` starts a new pool for every call."""

    def __init__(self, world_size: int):
        ctx = mp.get_context("spawn")
        self.tmp = tempfile.TemporaryDirectory()
        store_path = os.path.join(self.tmp.name, "store")
        self.world_size, self.results = world_size, ctx.Queue()
        self.jobs = [ctx.Queue() for _ in range(world_size)]
        self.procs = [ctx.Process(target=_worker, args=(r, world_size, store_path, self.jobs[r], self.results))
                      for r in range(world_size)]
        for p in self.procs:
            p.start()

    def run(self, fn: Callable, args: tuple, kwargs: dict, timeout: float) -> tuple[dict, list]:
        for q in self.jobs:
            q.put((fn, args, kwargs))
        results: dict[int, Any] = {}
        errors: list[str] = []
        try:
            for _ in range(self.world_size):
                rank, ok, value = self.results.get(timeout=timeout)
                if ok:
                    results[rank] = value
                else:
                    errors.append(f"--- rank {rank} ---\n{value}")
                    break  # the other ranks may now hang in a collective
        except BaseException:
            self.close(kill=True)
            raise
        if errors:
            self.close(kill=True)
        return results, errors

    def close(self, kill: bool = False) -> None:
        _POOLS.pop(self.world_size, None)
        if not kill:
            for q in self.jobs:
                q.put(None)
        for p in self.procs:
            p.join(timeout=0 if kill else 30)
            if p.is_alive():
                p.kill()
                p.join()
        self.tmp.cleanup()


_POOLS: dict[int, _Pool] = {}


@atexit.register
def _close_pools() -> None:
    for pool in list(_POOLS.values()):
        pool.close()


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 600, **kwargs: Any) -> list:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks; return results by rank.

    Raises ``AssertionError`` with the failing rank's traceback if any rank raised.
    """
    fresh = os.environ.get("TPCOMPILE_FRESH_RANKS") == "1"
    pool = _POOLS.get(world_size)
    if pool is None or fresh:
        pool = _POOLS[world_size] = _Pool(world_size)
    results, errors = pool.run(fn, args, kwargs, timeout)
    if fresh and not errors:
        pool.close()
    if errors:
        raise AssertionError("a rank failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]


def to_bytes(obj: Any) -> bytes:
    """Tensors leave a rank as bytes (the mp queue would share their memory with a dying process)."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def run_ranks_bytes(fn: Callable, world_size: int, *args: Any) -> list:
    """``run_ranks`` for a ``fn`` that returns ``to_bytes(...)``: each rank's object, loaded back."""
    import io

    import torch

    return [torch.load(io.BytesIO(b)) for b in run_ranks(fn, world_size, *args)]


def _cases(rank: int, world_size: int, cases: list) -> list:
    import torch._dynamo

    out = []
    for fn, args in cases:
        out.append(isolated(fn, rank, world_size, *args))
        torch._dynamo.reset()
    return out


def run_cases(world_size: int, cases: list, timeout: float = 600) -> list:
    """Several ``(fn, args)`` cases in one spawned gloo group (one process start and one set of
    imports for all of them; Dynamo reset between cases). Returns, per case, the results by rank; a
    case that raised is a ``FailedCase`` that raises its traceback where a test reads it, so one
    broken case fails its own test, not every test sharing the job."""
    by_rank = run_ranks(_cases, world_size, cases, timeout=timeout)
    return [per_case([r[i] for r in by_rank]) for i in range(len(cases))]


class CaseError:
    """What a rank returns for a case that raised (its traceback), instead of ending the shared job."""

    def __init__(self, tb: str):
        self.tb = tb


def isolated(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, or a ``CaseError`` with the traceback if it raised."""
    try:
        return fn(*args, **kwargs)
    except Exception:  # noqa: BLE001 - reported by the test that reads this case
        return CaseError(traceback.format_exc())


class FailedCase:
    """One case of a shared job that raised on some rank: any use of it raises that rank's traceback."""

    def __init__(self, errors: list):
        self.errors = errors

    def _raise(self, *_args, **_kwargs):
        raise AssertionError("this case raised in the shared gloo job:\n" + "\n".join(self.errors))

    __getitem__ = __iter__ = __len__ = __contains__ = _raise

    def __getattr__(self, name):
        self._raise()


def per_case(results: list) -> Any:
    """A case's results by rank, or a ``FailedCase`` if a rank returned a ``CaseError``."""
    errors = [f"--- rank {r} ---\n{x.tb}" for r, x in enumerate(results) if isinstance(x, CaseError)]
    return FailedCase(errors) if errors else results
