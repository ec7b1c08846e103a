"""Run a function on N gloo ranks (separate processes) and collect what each returns.

Real collectives on CPU, the ground truth for numerics. The function must be importable
(module level) so the spawn start method can pickle it.
"""
from __future__ import annotations

import os
import tempfile
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

from tpcompile.compat import torchvision_without_kernels

# a spawned rank imports this module (``_entry``) before the case's own (which may import timm or
# transformers, and so torchvision): see tests/conftest.py
torchvision_without_kernels()


def _entry(fn: Callable, rank: int, world_size: int, store_path: str, queue, args, kwargs) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        try:
            result = fn(rank, world_size, *args, **kwargs)
        finally:
            dist.destroy_process_group()
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, False, traceback.format_exc()))


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 600, **kwargs: Any) -> list:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks; return results by rank.

    Raises ``AssertionError`` with the failing rank's traceback if any rank raised.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_entry, args=(fn, r, world_size, store_path, queue, args, kwargs), daemon=False)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        errors: list[str] = []
        try:
            for _ in range(world_size):
                rank, ok, value = queue.get(timeout=timeout)
                if ok:
                    results[rank] = value
                else:
                    errors.append(f"--- rank {rank} ---\n{value}")
                    break  # the other ranks may now hang in a collective
        finally:
            for p in procs:
                p.join(timeout=5 if errors else timeout)
                if p.is_alive():
                    p.kill()
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
        out.append(fn(rank, world_size, *args))
        torch._dynamo.reset()
    return out


def run_cases(world_size: int, cases: list, timeout: float = 600) -> list:
    """Several ``(fn, args)`` cases in one spawned gloo group (one process start and one set of
    imports for all of them; Dynamo reset between cases). Returns, per case, the results by rank."""
    by_rank = run_ranks(_cases, world_size, cases, timeout=timeout)
    return [[r[i] for r in by_rank] for i in range(len(cases))]
