"""How one parameter is laid out over the TP group: the one place that knows pieces and padding.

A ``ParamPlan`` is what the plan pass decides for a parameter (column / row / vocab / replicate,
the shard dim, fused pieces). Everything that moves a parameter between its full (single-device)
form and a rank's part of it derives from the plan's methods here, so sharding, gathering,
DTensor placements, DCP boxes and safetensors slice reads cannot disagree:

- the *program shard* (``shard``, ``local_shape``) is what the rank's compiled graph takes: a
  vocabulary that tp does not divide is zero-padded to ``ceil(V / tp)`` rows on every rank;
- the *stored shard* (``stored``, ``stored_shape``) is what the parameter's ``DTensor`` holds:
  the same rows without the padding (DTensor's uneven ``Shard``), so ``full_tensor()``,
  clipping norms and checkpoints see exactly the logical tensor;
- ``spans`` says which rows of the full tensor each part is: one span for a plain shard, one per
  fused piece (``[q_r | k_r | v_r]``), each piece split over tp on its own.

kv-head copies (``style="kvcopy"``: grouped-query attention with fewer kv heads than tp) are
*stored* replicated, so every user view (``full_tensor``, clipping norms, DCP / FSDP2 boxes,
safetensors reads) is the plain ``Replicate`` one and exact; the *program* takes the rows its
query heads need (``program_rows``, ``piece_rows``) from that replicated weight inside the graph
(``take_rows``: Megatron's f, then a narrow), so the selection, and a KV cache built from it,
are this rank's kv heads only. Their gradient is all-reduced in the backward: one collective for the
k / v weights and biases of one attention (``rewrite.take_rows_of``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class Span:
    """``length`` rows along the shard dim, from row ``start`` of the full tensor, at row ``at`` of the shard."""

    start: int
    length: int
    at: int


@dataclass(frozen=True)
class KVCopies:
    """A kv-copy weight's program rows: along ``dim``, pieces of ``sizes``, piece i split into
    ``tp / copies[i]`` blocks (``copies[i]`` ranks share one: a kv head's copies; 1: a plain shard)."""

    dim: int
    sizes: tuple
    copies: tuple
    tp: int


@dataclass(frozen=True)
class ParamPlan:
    """How one parameter is stored: ``style`` in TP vocabulary, shard ``dim`` and ``chunks``."""

    fqn: str
    # colwise | rowwise | vocab | replicate | kvcopy (stored replicated, see the module docstring) |
    # expert-colwise | expert-rowwise (3-D expert weights, every expert split) | expert (whole experts, dim 0)
    style: str
    dim: int | None
    chunks: int
    full_shape: tuple
    local_shape: tuple  # the program shard (padded, for a vocabulary tp does not divide)
    padded_shape: tuple | None = None  # a vocabulary tp does not divide: the zero-padded shape that is split
    pieces: tuple | None = None  # logical sizes of unequal fused pieces along ``dim`` (each split on its own)
    kv: "KVCopies | None" = None  # kvcopy: which rows each rank's program takes

    # ------------------------------------------------------------------ geometry
    @property
    def sharded(self) -> bool:
        return self.style != "replicate" and self.dim is not None

    @property
    def tp(self) -> int:
        if not self.sharded:
            return 1
        whole = (self.padded_shape or self.full_shape)[self.dim]
        return whole // self.local_shape[self.dim]

    def piece_sizes(self) -> tuple[int, ...]:
        """Logical sizes along ``dim`` of the pieces that are sharded one by one."""
        if self.pieces:
            return tuple(self.pieces)
        n = self.full_shape[self.dim]
        return (n // self.chunks,) * self.chunks

    def spans(self, rank: int) -> list[Span]:
        """The rows (along ``dim``) of the full tensor this rank holds, padding excluded."""
        if not self.sharded:
            return [Span(0, self.full_shape[0] if self.full_shape else 1, 0)]
        if self.padded_shape is not None:
            n, size = self.local_shape[self.dim], self.full_shape[self.dim]
            return [Span(rank * n, max(0, min(n, size - rank * n)), 0)]
        out, start, at, tp = [], 0, 0, self.tp
        for size in self.piece_sizes():
            part = size // tp
            out.append(Span(start + rank * part, part, at))
            start, at = start + size, at + part
        return out

    def program_rows(self, rank: int) -> list[Span]:
        """kvcopy: the rows (along ``kv.dim``) of the replicated weight that this rank's program takes."""
        return piece_rows(self.kv.sizes, self.kv.copies, self.kv.tp, rank)

    def stored_shape(self, rank: int) -> tuple:
        if not self.sharded:
            return tuple(self.full_shape)
        shape = list(self.local_shape)
        shape[self.dim] = sum(s.length for s in self.spans(rank))
        return tuple(shape)

    @property
    def exact(self) -> bool:
        """True when ``placement()`` describes the layout exactly (not for unequal fused pieces,
        which no DTensor placement can express: see ``assemble`` for the true full tensor)."""
        return not self.pieces

    def mark(self, t):
        """Tag the DTensor ``t`` (holding this layout's stored shard) with the layout when no
        placement describes it (unequal pieces): ``full_tensor()`` / ``redistribute()`` read the tag
        (``tpcompile.params._patch_dtensor_for_pieces``), and ``detach()`` passes it on, so the
        parameter, its gradient, its ``state_dict()`` entry and its optimizer state all gather to the
        true full tensor. Returns ``t``."""
        if not self.exact and t is not None:
            t._tp_pieces = self
        return t

    # ------------------------------------------------------------------ full <-> shard
    def stored(self, full: torch.Tensor, rank: int) -> torch.Tensor:
        """This rank's stored shard of ``full``, as a fresh tensor (``full`` can be freed)."""
        if not self.sharded:
            return full
        parts = [full.narrow(self.dim, s.start, s.length) for s in self.spans(rank)]
        return (torch.cat(parts, self.dim) if len(parts) > 1 else parts[0]).clone()

    def pad(self, stored: torch.Tensor) -> torch.Tensor:
        """The program shard from the stored one: zero rows for the vocabulary padding."""
        if self.padded_shape is None or tuple(stored.shape) == tuple(self.local_shape):
            return stored
        out = stored.new_zeros(self.local_shape)
        out.narrow(self.dim, 0, stored.shape[self.dim]).copy_(stored)
        return out

    def unpad(self, local: torch.Tensor, rank: int) -> torch.Tensor:
        """The stored shard (a view) from the program shard: drops the vocabulary padding."""
        if self.padded_shape is None:
            return local
        return local.narrow(self.dim, 0, self.spans(rank)[0].length)

    def shard(self, full: torch.Tensor, rank: int) -> torch.Tensor:
        """This rank's program shard of ``full`` (what its compiled graph takes)."""
        return self.pad(self.stored(full, rank))

    def assemble(self, stored_parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's stored shard (rank order): pieces back in place."""
        if not self.sharded:
            return stored_parts[0]
        spans = [self.spans(r) for r in range(len(stored_parts))]
        blocks = []
        for c in range(len(spans[0])):
            for r, part in enumerate(stored_parts):
                s = spans[r][c]
                if s.length:
                    blocks.append(part.narrow(self.dim, s.at, s.length))
        return torch.cat(blocks, self.dim)

    # ------------------------------------------------------------------ DTensor / DCP
    def placement(self):
        """The DTensor placement of the stored shard on the TP mesh."""
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.placement_types import _StridedShard

        if not self.sharded:
            return Replicate()
        if self.chunks > 1 and not self.pieces:
            return _StridedShard(self.dim, split_factor=self.chunks)
        return Shard(self.dim)

    def boxes(self, rank: int, part: tuple[int, int, int] | None = None) -> list[tuple[tuple, tuple, tuple]]:
        """DCP boxes ``(offsets, sizes, local)`` of this rank's stored shard in the full tensor: one per
        piece (DCP's own one-box-per-shard is wrong for pieces), ``local`` the box's offsets in the shard.

        ``part = (dim, start, length)``: only that slice of the stored shard, as FSDP2 holds it (it
        chunks the stored shard along ``dim`` over the data-parallel ranks); ``local`` is then the
        box's offsets in the slice. A piece the slice cuts gives the part of it inside."""
        full = tuple(self.full_shape)
        if not full:
            return [((), (), ())]
        d = self.dim if self.sharded else 0
        runs = [(s.start, s.length, s.at) for s in self.spans(rank)] if self.sharded else [(0, full[0], 0)]
        out = []
        for start, length, at in runs:
            offsets, sizes, local = [0] * len(full), list(full), [0] * len(full)
            offsets[d], sizes[d], local[d] = start, length, at
            if part is not None:
                pdim, pstart, plen = part
                if pdim == d:  # the slice cuts the pieces' dim: keep what of this piece lies inside it
                    lo, hi = max(at, pstart), min(at + length, pstart + plen)
                    offsets[d], sizes[d], local[d] = start + lo - at, max(0, hi - lo), lo - pstart
                else:  # another dim, stored whole by TP: the slice's rows are the full tensor's
                    offsets[pdim], sizes[pdim], local[pdim] = pstart, plen, 0
            if all(sizes):
                out.append((tuple(offsets), tuple(sizes), tuple(local)))
        return out


def piece_blocks(sizes: Sequence[int], copies: Sequence[int], tp: int) -> list[tuple[int, int, int]]:
    """``piece_rows`` for every rank at once: per piece ``(start, length, div)``, rank r holding rows
    ``[start + (r // div) * length, + length)``. The form a program takes (the rank read at run time)."""
    out, start = [], 0
    for size, c in zip(sizes, copies):
        out.append((start, size * c // tp, c))
        start += size
    return out


def piece_rows(sizes: Sequence[int], copies: Sequence[int], tp: int, rank: int) -> list[Span]:
    """The rows rank ``rank`` holds of a dim made of pieces ``sizes``, piece i split into tp / copies[i]
    blocks, rank r holding block r // copies[i] (kv-head copies; copies 1: the plain r-th 1/tp)."""
    out, at = [], 0
    for start, n, c in piece_blocks(sizes, copies, tp):
        out.append(Span(start + (rank // c) * n, n, at))
        at += n
    return out


def contiguous_stride(shape: Sequence[int]) -> tuple:
    """The strides of a contiguous tensor of ``shape`` (a DTensor's logical strides)."""
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= s
    return tuple(reversed(stride))


def replicated(fqn: str, shape: Sequence[int]) -> ParamPlan:
    """The plan of a parameter stored whole on every rank."""
    return ParamPlan(fqn, "replicate", None, 1, tuple(shape), tuple(shape))


def renamed(pp: ParamPlan, fqn: str) -> ParamPlan:
    """The same layout for another parameter of the same shape (a graph reused for another block)."""
    from dataclasses import replace

    return replace(pp, fqn=fqn)
