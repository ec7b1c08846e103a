"""Placements of a value across the TP group (DESIGN.md §3).

Replicate: every rank holds the whole value.
Shard(dim, chunks): every rank holds 1/tp of ``dim``. With ``chunks=k`` the dim is k
    concatenated pieces (a fused QKV or gate-up output), each sharded on its own, so a
    rank holds [piece0_r, piece1_r, ...]: Megatron's ``stride``. ``sizes`` gives the pieces'
    logical sizes when they differ (q, k, v of grouped-query attention).
Shard(dim, pad=True): a vocabulary that tp does not divide; every rank holds ceil(n / tp)
    entries of ``dim``, the ones past n are padding (zero weights, masked out of the loss).
Shard(dim, copies=(m,)): kv-head copies (grouped-query attention with fewer kv heads than tp):
    the dim is split into tp / m blocks, one per group of m ranks, and every rank of a group holds
    its group's block (rank r: block r // m). Gradients of such a value are partial within the
    group (each rank's part comes from its own query heads): ``copy_to_tp`` (all-reduce) makes
    the gradient of the replicated weight it was taken from whole. With pieces, one entry per
    piece (``[q | k | v]``: ``(1, m, m)``).
Partial: every rank holds a summand; the value is their sum.
ExpertRows(route, form, n_local): expert parallelism (``plan`` style ``expert``): a ``[S, ...]`` value whose
    rows are token-expert pairs; each rank holds the right values on the rows routed to its own
    ``n_local`` experts and anything on the others (``runtime/expert_parallel.py``). ``route`` is the
    routing node (cumulative counts per expert, or the expert of each row; ``form`` says which).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Replicate:
    def __repr__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Shard:
    dim: int
    chunks: int = 1
    pad: bool = False  # the dim (a vocabulary) does not divide by tp: ranks hold ceil(n / tp), the last ones padded
    sizes: tuple | None = None  # logical sizes of unequal pieces (fused QKV under GQA: q wider than k, v)
    copies: tuple | None = None  # per piece, ranks sharing one block (kv-head copies); None: all 1

    def __repr__(self) -> str:
        extra = (f",chunks={self.chunks}" if self.chunks != 1 else "") + (",pad" if self.pad else "")
        extra += f",sizes={self.sizes}" if self.sizes else ""
        extra += f",copies={self.copies}" if self.copies else ""
        return f"S({self.dim}{extra})"

    def moved(self, dim: int) -> "Shard":
        """The same shard (pieces, padding, copies) on another dim: for ops that only move dims."""
        return Shard(dim, self.chunks, self.pad, self.sizes, self.copies)

    @property
    def plain(self) -> bool:
        """One block of 1/tp per rank: no pieces, no padding, no copies."""
        return self.chunks == 1 and not self.pad and not self.copies

    def piece_copies(self) -> tuple:
        """Ranks sharing one block, per piece (1 each for an ordinary shard)."""
        return tuple(self.copies) if self.copies else (1,) * self.chunks

    def local(self, full: int, tp: int) -> int:
        """This rank's size of the sharded dim when it is ``full`` long whole (pieces, copies, padding)."""
        if not self.copies:
            return local_size(full, tp)
        if self.sizes:
            return sum(s * c // tp for s, c in zip(self.sizes, self.copies))
        return int(full) * self.copies[0] // tp  # equal pieces share one count (see propagate.linear)

    def start(self, full: int, rank: int, tp: int) -> int:
        """Where this rank's block starts along the dim, for a one-piece shard (copies: ``rank // m``)."""
        if self.chunks != 1 or self.pad:
            raise ValueError(f"{self}: a shard of pieces or padding has no one start")
        return (rank // self.piece_copies()[0]) * self.local(full, tp)

    def split_over(self, tp: int) -> int:
        """How many distinct blocks the dim is split into (tp, or tp / m for copies)."""
        return tp // self.copies[0] if self.copies and len(set(self.copies)) == 1 else tp


def local_size(full: int, tp: int) -> int:
    """Per-rank size of a sharded dim of ``full`` elements (padded up when tp does not divide it)."""
    return -(-int(full) // tp)


@dataclass(frozen=True)
class Partial:
    def __repr__(self) -> str:
        return "P"


@dataclass(frozen=True)
class ExpertRows:
    route: Any  # the fx.Node of the routing that says which rows are whose
    form: str  # grouped_linear's form: "ids" (an expert id per row) or a grouped form (cumulative counts)
    n_local: int  # experts per rank

    def __repr__(self) -> str:
        return f"X({self.n_local})"


Placement = Replicate | Shard | Partial | ExpertRows
R = Replicate()
P = Partial()

STYLES = ("colwise", "rowwise", "vocab", "replicate", "expert-colwise", "expert-rowwise", "expert")
