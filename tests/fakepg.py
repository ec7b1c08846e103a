"""Run code as rank ``rank`` of ``world_size`` in this process: the fake process group.

Collectives are no-ops, so values are meaningless, but the rewrite and Inductor run
exactly as on that rank. For graphs, plans and errors at any TP degree.
"""
import contextlib

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore


@contextlib.contextmanager
def fake_group(world_size: int, rank: int = 0):
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()
