"""Placements of a value across the TP group (DESIGN.md §3).

Replicate: every rank holds the whole value.
Shard(dim, chunks): every rank holds 1/tp of ``dim``. With ``chunks=k`` the dim is k
    concatenated pieces (a fused QKV or gate-up output), each sharded on its own, so a
    rank holds [piece0_r, piece1_r, ...]: Megatron's ``stride``. ``sizes`` gives the pieces'
    logical sizes when they differ (q, k, v of grouped-query attention).
Shard(dim, pad=True): a vocabulary that tp does not divide; every rank holds ceil(n / tp)
    entries of ``dim``, the ones past n are padding (zero weights, masked out of the loss).
Partial: every rank holds a summand; the value is their sum.
"""
from __future__ import annotations

from dataclasses import dataclass


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

    def __repr__(self) -> str:
        extra = (f",chunks={self.chunks}" if self.chunks != 1 else "") + (",pad" if self.pad else "")
        extra += f",sizes={self.sizes}" if self.sizes else ""
        return f"S({self.dim}{extra})"

    def moved(self, dim: int) -> "Shard":
        """The same shard (pieces, padding) on another dim: for ops that only move dims."""
        return Shard(dim, self.chunks, self.pad, self.sizes)


def local_size(full: int, tp: int) -> int:
    """Per-rank size of a sharded dim of ``full`` elements (padded up when tp does not divide it)."""
    return -(-int(full) // tp)


@dataclass(frozen=True)
class Partial:
    def __repr__(self) -> str:
        return "P"


Placement = Replicate | Shard | Partial
R = Replicate()
P = Partial()

STYLES = ("colwise", "rowwise", "vocab", "replicate", "expert-colwise", "expert-rowwise")
