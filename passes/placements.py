"""Placements of a value across the TP group (DESIGN.md §3).

Replicate: every rank holds the whole value.
Shard(dim, chunks): every rank holds 1/tp of ``dim``. With ``chunks=k`` the dim is k
    concatenated pieces (a fused QKV or gate-up output), each sharded on its own, so a
    rank holds [piece0_r, piece1_r, ...]: Megatron's ``stride``.
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

    def __repr__(self) -> str:
        return f"S({self.dim})" if self.chunks == 1 else f"S({self.dim},chunks={self.chunks})"


@dataclass(frozen=True)
class Partial:
    def __repr__(self) -> str:
        return "P"


Placement = Replicate | Shard | Partial
R = Replicate()
P = Partial()

STYLES = ("colwise", "rowwise", "vocab", "replicate")
