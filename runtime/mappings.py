"""Megatron's conjugate mapping operators over functional collectives.

Each op is a small ``torch.autograd.Function``: the forward does one collective (or a
local split) and the backward does its conjugate. They call
``torch.distributed._functional_collectives`` so that AOTAutograd traces them into
``_c10d_functional.*`` + ``wait_tensor`` nodes in the forward and backward graphs, which
Inductor can schedule. Each op needs its own Function: the autograd formulas registered
on the raw functional ops are not Megatron's (``all_reduce``'s backward is another
all-reduce, so ``g`` would multiply replicated gradients by tp), and older torch had
none at all (pytorch#152127).

``group`` is a ``ProcessGroup``, a group name string (what rewritten FX graphs pass as a
constant) or a 1-D ``DeviceMesh``. Dims may be negative.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.distributed.distributed_c10d as c10d
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "group_name",
    "group_size",
    "group_rank",
    "tp_rank",
    "rank_offset",
    "narrow_at_rank",
    "copy_to_tp",
    "copy_to_tp_bucketed",
    "reduce_from_tp",
    "scatter_to_tp",
    "gather_from_tp",
    "reduce_scatter_to_tp",
    "gather_from_sp",
    "reduce_scatter_to_sp",
    "scatter_to_sp",
    "all_to_all_tp",
    "broadcast_from_first",
]

Group = str | dist.ProcessGroup | DeviceMesh


# ---------------------------------------------------------------- group helpers


def group_name(group: Group) -> str:
    """The registered name of ``group``: the form FX graphs carry as a constant."""
    if isinstance(group, str):
        return group
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"need a 1-D DeviceMesh, got {group.ndim}-D")
        return group.get_group().group_name
    return group.group_name


def group_size(group: Group) -> int:
    """Number of ranks in ``group`` (a constant under Dynamo)."""
    return c10d._get_group_size_by_name(group_name(group))


@torch.compiler.assume_constant_result
def _rank_by_name(name: str) -> int:
    return dist.get_rank(c10d._resolve_process_group(name))


def group_rank(group: Group) -> int:
    """This process's rank inside ``group`` (a constant under Dynamo)."""
    return _rank_by_name(group_name(group))


# ---------------------------------------------------------------- the rank as a runtime value


@torch.library.custom_op("tpcompile::tp_rank", mutates_args=())
def tp_rank(like: Tensor, group: str) -> Tensor:
    """This process's rank in ``group``, a 0-d int64 tensor on ``like``'s device, read when the
    program runs, never when it is traced: every rank's graph is then the same graph, and one
    compiled program (one FX-graph / Inductor cache entry) serves every rank. ``like`` places the
    tensor and, as an input no compiler knows the value of, keeps it from being folded to a constant."""
    return torch.full((), dist.get_rank(c10d._resolve_process_group(group)), dtype=torch.int64, device=like.device)


@tp_rank.register_fake
def _(like, group):
    return like.new_empty((), dtype=torch.int64)


def rank_offset(like: Tensor, group: Group, step: int, div: int = 1, mod: int = 0) -> Tensor:
    """Where this rank's block starts: ``((rank // div) % mod) * step`` (``mod`` 0: no modulo), a 0-d
    tensor computed from the runtime rank. The one place that turns the rank into an offset."""
    r = tp_rank(like, group_name(group))
    if div != 1:
        r = r // div
    if mod:
        r = r % mod
    return r * step


def narrow_at_rank(x: Tensor, dim: int, n: int, group: Group, start: int = 0, div: int = 1, mod: int = 0) -> Tensor:
    """``x.narrow(dim, start + rank_offset(..., step=n, div, mod), n)`` with the rank read at run time:
    an ``index_select`` of those ``n`` rows (a copy, the same values), so no rank's offset is a
    constant of the graph."""
    idx = torch.arange(n, device=x.device) + rank_offset(x, group, n, div, mod)
    if start:
        idx = idx + start
    return x.index_select(dim, idx)


def _chunk_len(x: Tensor, dim: int, tp: int) -> int:
    if x.shape[dim] % tp != 0:
        raise ValueError(f"size {x.shape[dim]} of dim {dim} is not divisible by tp={tp}")
    return x.shape[dim] // tp


def _sync(t: Tensor) -> Tensor:
    # Eager funcol returns an AsyncCollectiveTensor; wait here so a plain tensor leaves
    # the Function. Under tracing funcol has already emitted ``wait_tensor``.
    return t.wait() if isinstance(t, funcol.AsyncCollectiveTensor) else t


# ---------------------------------------------------------------- collectives


def _all_reduce(x: Tensor, name: str) -> Tensor:
    return _sync(funcol.all_reduce(x.contiguous(), "sum", name))


def _all_gather(x: Tensor, dim: int, name: str) -> Tensor:
    return _sync(funcol.all_gather_single(x.contiguous(), dim, name))


def _reduce_scatter(x: Tensor, dim: int, name: str) -> Tensor:
    _chunk_len(x, dim, group_size(name))
    return _sync(funcol.reduce_scatter_single(x.contiguous(), "sum", dim, name))


def _split(x: Tensor, dim: int, name: str) -> Tensor:
    return narrow_at_rank(x, dim, _chunk_len(x, dim, group_size(name)), name)


def _all_to_all(x: Tensor, scatter_dim: int, gather_dim: int, name: str) -> Tensor:
    tp = group_size(name)
    n = _chunk_len(x, scatter_dim, tp)
    # Put the destination rank in front, exchange equal blocks along dim 0, then lay the
    # received blocks (source rank major) along gather_dim.
    send = x.unflatten(scatter_dim, (tp, n)).movedim(scatter_dim, 0).contiguous()
    recv = _sync(funcol.all_to_all_single(send, None, None, name))
    return recv.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)


# ---------------------------------------------------------------- autograd functions


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, name: str) -> Tensor:
        ctx.name = name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        return _all_reduce(g, ctx.name), None


class _CopyToTPBucketed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, name: str, *xs: Tensor) -> tuple:
        ctx.name = name
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *gs: Tensor):
        out = list(gs)
        for dtype in dict.fromkeys(g.dtype for g in gs):  # one all-reduce per dtype
            idx = [i for i, g in enumerate(gs) if g.dtype == dtype]
            flat = _all_reduce(torch.cat([gs[i].reshape(-1) for i in idx]), ctx.name)
            for i, piece in zip(idx, flat.split([gs[i].numel() for i in idx])):
                out[i] = piece.view(gs[i].shape)
        return (None, *out)


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, name: str) -> Tensor:
        return _all_reduce(x, name)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, None


class _Split(torch.autograd.Function):
    """fwd: keep own chunk along dim; bwd: all-gather along dim."""

    @staticmethod
    def forward(ctx, x: Tensor, name: str, dim: int) -> Tensor:
        ctx.name, ctx.dim = name, dim
        return _split(x, dim, name)

    @staticmethod
    def backward(ctx, g: Tensor):
        return _all_gather(g, ctx.dim, ctx.name), None, None


class _Gather(torch.autograd.Function):
    """fwd: all-gather along dim; bwd: keep own chunk."""

    @staticmethod
    def forward(ctx, x: Tensor, name: str, dim: int) -> Tensor:
        ctx.name, ctx.dim = name, dim
        return _all_gather(x, dim, name)

    @staticmethod
    def backward(ctx, g: Tensor):
        return _split(g, ctx.dim, ctx.name), None, None


class _GatherRS(torch.autograd.Function):
    """fwd: all-gather along dim; bwd: reduce-scatter along dim."""

    @staticmethod
    def forward(ctx, x: Tensor, name: str, dim: int) -> Tensor:
        ctx.name, ctx.dim = name, dim
        return _all_gather(x, dim, name)

    @staticmethod
    def backward(ctx, g: Tensor):
        return _reduce_scatter(g, ctx.dim, ctx.name), None, None


class _ReduceScatter(torch.autograd.Function):
    """fwd: reduce-scatter along dim; bwd: all-gather along dim."""

    @staticmethod
    def forward(ctx, x: Tensor, name: str, dim: int) -> Tensor:
        ctx.name, ctx.dim = name, dim
        return _reduce_scatter(x, dim, name)

    @staticmethod
    def backward(ctx, g: Tensor):
        return _all_gather(g, ctx.dim, ctx.name), None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, name: str, scatter_dim: int, gather_dim: int) -> Tensor:
        ctx.name, ctx.scatter_dim, ctx.gather_dim = name, scatter_dim, gather_dim
        return _all_to_all(x, scatter_dim, gather_dim, name)

    @staticmethod
    def backward(ctx, g: Tensor):
        return _all_to_all(g, ctx.gather_dim, ctx.scatter_dim, ctx.name), None, None, None


# ---------------------------------------------------------------- public ops


def copy_to_tp(x: Tensor, group: Group) -> Tensor:
    """Megatron's f: enter a TP region with a replicated activation.

    fwd: ``y = x`` (a view, no copy).  bwd: ``dx = sum_r dy_r`` (all-reduce), because each
    rank's column shard only sees its part of the input gradient.
    """
    return _CopyToTP.apply(x, group_name(group))


def copy_to_tp_bucketed(xs: list[Tensor], group: Group) -> tuple:
    """Megatron's f for many small replicated values at once (SP's norm weights and biases).

    fwd: each ``y_i = x_i``.  bwd: their gradients flattened into one buffer per dtype and
    all-reduced once: one collective per backward instead of one per weight (what DDP's
    buckets do), as its latency, not its bytes, is what such small gradients cost.
    """
    return _CopyToTPBucketed.apply(group_name(group), *xs)


def reduce_from_tp(x: Tensor, group: Group) -> Tensor:
    """Megatron's g: sum the partial outputs of a row-parallel layer.

    fwd: ``y = sum_r x_r`` (all-reduce).  bwd: ``dx = dy`` (dy is replicated).
    """
    return _ReduceFromTP.apply(x, group_name(group))


def scatter_to_tp(x: Tensor, group: Group, dim: int = -1) -> Tensor:
    """Replicate -> Shard(dim): keep this rank's chunk.

    fwd: ``y = chunk_r(x, dim)``.  bwd: ``dx = cat_r(dy_r, dim)`` (all-gather).
    """
    return _Split.apply(x, group_name(group), dim % x.dim())


def gather_from_tp(x: Tensor, group: Group, dim: int = -1) -> Tensor:
    """Shard(dim) -> Replicate.

    fwd: ``y = cat_r(x_r, dim)`` (all-gather).  bwd: ``dx = chunk_r(dy, dim)`` (dy is
    replicated, so each rank keeps its own slice; no communication).
    """
    return _Gather.apply(x, group_name(group), dim % x.dim())


def reduce_scatter_to_tp(x: Tensor, group: Group, dim: int = -1) -> Tensor:
    """Partial -> Shard(dim).

    fwd: ``y = chunk_r(sum_s x_s, dim)`` (reduce-scatter).  bwd: ``dx = cat_r(dy_r, dim)``
    (all-gather).
    """
    return _ReduceScatter.apply(x, group_name(group), dim % x.dim())


def gather_from_sp(x: Tensor, group: Group, dim: int = 1) -> Tensor:
    """Sequence parallel: Shard(seq) -> Replicate, entering a TP region.

    fwd: ``y = cat_r(x_r, dim)`` (all-gather).  bwd: ``dx = chunk_r(sum_s dy_s, dim)``
    (reduce-scatter): the consumers are column-parallel, so each rank holds a partial
    gradient of the full sequence.
    """
    return _GatherRS.apply(x, group_name(group), dim % x.dim())


def reduce_scatter_to_sp(x: Tensor, group: Group, dim: int = 1) -> Tensor:
    """Sequence parallel: Partial -> Shard(seq), leaving a TP region.

    fwd: ``y = chunk_r(sum_s x_s, dim)`` (reduce-scatter).  bwd: ``dx = cat_r(dy_r, dim)``
    (all-gather).
    """
    return _ReduceScatter.apply(x, group_name(group), dim % x.dim())


def scatter_to_sp(x: Tensor, group: Group, dim: int = 1) -> Tensor:
    """Sequence parallel: Replicate -> Shard(seq).

    fwd: ``y = chunk_r(x, dim)``.  bwd: ``dx = cat_r(dy_r, dim)`` (all-gather).
    """
    return _Split.apply(x, group_name(group), dim % x.dim())


def all_to_all_tp(x: Tensor, group: Group, scatter_dim: int, gather_dim: int) -> Tensor:
    """Shard(gather_dim) -> Shard(scatter_dim), e.g. sequence-sharded <-> head-sharded.

    fwd: rank r sends ``chunk_s(x, scatter_dim)`` to rank s and returns
    ``cat_s(received_s, gather_dim)``.  bwd: the reverse all-to-all (scatter along
    gather_dim, gather along scatter_dim): a permutation, so its adjoint is its inverse.
    """
    nd = x.dim()
    return _AllToAll.apply(x, group_name(group), scatter_dim % nd, gather_dim % nd)


def broadcast_from_first(x: Tensor, group: Group) -> Tensor:
    """Every rank gets group rank 0's ``x`` (Megatron's ``broadcast_data``), so all TP
    ranks see the same batch. Every rank passes a tensor of the same shape and dtype;
    only rank 0's values count. Not differentiable: meant for data inputs.
    """
    # funcol.broadcast's ``src`` is a rank *within* the group (dist.broadcast takes a
    # global rank): 0 is the group's first rank.
    return _sync(funcol.broadcast(x.detach().contiguous(), 0, group_name(group)))
