"""One Inductor compile per host for a TP group: one rank compiles each graph, the others then
find it in the Inductor cache they share.

Every TP rank's program is the same graph (the rank is read when the program runs:
``runtime.mappings.tp_rank``), so tp ranks on one host with one Inductor cache directory would
otherwise lower and compile the same graph side by side: tp times the CPU for one result, and on
a host with fewer cores than ranks, tp times the wall time too. Here the first rank of the group
on the host (its *leader*) compiles each graph first; the others wait for it, then compile the
same graph, which the FX-graph cache answers.

Only the order changes, never what is compiled: a rank whose graph is not in the cache (its
program differs, or Inductor bypasses its cache for that graph) compiles it itself. The leader
posts each graph's turn whether its compile succeeded or raised; a rank that waits longer than
``TIMEOUT`` compiles on its own, with a ``TPWarning``. Set ``TPCOMPILE_COMPILE_ONCE=0`` to compile
on every rank at once (the whole order then is torch's).
"""
from __future__ import annotations

import hashlib
import itertools
import os
import socket
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

from tpcompile.errors import TPWarning

TIMEOUT = timedelta(minutes=30)


def host_digest() -> list[int]:
    """8 bytes naming this process's host and Inductor cache: ranks with equal digests share compiled graphs."""
    import torch._inductor.config as ic
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    on = ic.fx_graph_cache and os.environ.get("TPCOMPILE_COMPILE_ONCE", "1") != "0"
    key = repr((socket.gethostname(), os.path.realpath(cache_dir()), bool(on)))
    return list(hashlib.sha256(key.encode()).digest()[:8]) if on else [0] * 8


@dataclass
class Turns:
    """The compile order of one TP group on one host: ``leader`` compiles first, the others wait."""

    store: object
    prefix: str  # names the group's leader on this host: keys never clash between groups
    leader: bool
    seq: itertools.count = field(default_factory=itertools.count)

    def around(self, compile_one: Callable) -> Callable:
        def compile_in_turn(*args, **kwargs):
            key = f"{self.prefix}/{next(self.seq)}"
            if self.leader:
                try:
                    return compile_one(*args, **kwargs)
                finally:
                    self.store.set(key, "1")
            try:
                self.store.wait([key], TIMEOUT)
            except Exception:  # noqa: BLE001 - the leader never got there: compile on our own
                warnings.warn(f"tpcompile: waited {TIMEOUT} for this host's first TP rank to compile a graph; "
                              f"compiling it here instead (TPCOMPILE_COMPILE_ONCE=0 turns the wait off).", TPWarning)
            return compile_one(*args, **kwargs)

        return compile_in_turn


_TURNS: dict[str, Turns] = {}


def arrange(group, digests: list[list[int]]) -> None:
    """Record this group's compile order from every rank's ``host_digest()`` (gathered in group order)."""
    import torch.distributed as dist

    if dist.get_backend(group) not in ("gloo", "nccl"):
        return  # a fake group (explain, tests of graphs): one process, nothing to share
    rank = dist.get_rank(group)
    mine = digests[rank]
    same = [r for r, d in enumerate(digests) if d == mine]
    if not any(mine) or len(same) < 2:
        return
    prefix = f"tpcompile/compile/{group.group_name}/{dist.get_global_rank(group, same[0])}"
    old = _TURNS.get(group.group_name)
    if old is None or old.prefix != prefix:  # another model on the same group keeps counting: keys stay new
        _TURNS[group.group_name] = Turns(dist.distributed_c10d._get_default_store(), prefix, rank == same[0])


def in_turn(group_name: str, compile_one: Callable) -> Callable:
    """``compile_one`` (Inductor's compile of one forward or backward graph) in this host's order."""
    turns = _TURNS.get(group_name)
    return compile_one if turns is None else turns.around(compile_one)
