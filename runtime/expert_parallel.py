"""Expert parallelism without moving tokens: each rank runs the rows routed to its own experts.

Under tensor parallelism without sequence parallelism every rank already holds every token
(replicated), and the router, top-k and sort are computed identically on every rank. So rank r,
holding experts ``[r * El, (r + 1) * El)`` whole (``ParamPlan`` style ``expert``), can compute exactly
the rows routed to those experts, leave zeros on every other row, and the weighted combine is a
pending sum that **one all-reduce** makes whole: the same collective, and the same bytes, as
expert-TP. A dispatch / combine all-to-all would move ``k`` copies of the tokens to their experts
and back; here no token moves, so none is needed (docs/models.md compares the costs).

Shapes stay static: the rows of this rank's experts are found on the device from the routing
(cumulative counts per expert, or the expert id of each row), rolled to the front of a buffer of
all rows, and grouped-multiplied; the kernels skip the rows past this rank's last offset. No host
sync is added (HF's opaque ``grouped_mm_fallback`` op syncs once per call on its own, as on one
device). Every op here is plain torch, so autograd and AOTAutograd trace it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .mappings import tp_rank


def _rank(rank: int | str, like: Tensor) -> int | Tensor:
    """``rank`` as given, or (a TP group's name, what rewritten graphs pass) this rank in that group
    read when the program runs: a 0-d tensor, so every rank's program is the same."""
    return tp_rank(like, rank) if isinstance(rank, str) else rank


def _grouped_linear(x: Tensor, weight: Tensor, route: Tensor, form: str, out_dim: int) -> Tensor:
    from tpcompile.passes.normalize import grouped_linear

    return grouped_linear(x, weight, route, form, out_dim)


def own_rows(route: Tensor, form: str, n_rows: int, n_local: int, rank: int | str) -> Tensor:
    """``[n_rows]`` bool: which rows (in the model's row order) are routed to rank ``rank``'s experts
    ``[rank * n_local, (rank + 1) * n_local)``. ``route``: cumulative counts per expert over rows sorted by
    expert (the grouped forms), or the expert id of each row (``"ids"``)."""
    rank = _rank(rank, route)
    if form == "ids":
        return torch.div(route, n_local, rounding_mode="floor") == rank
    lo, hi = _bounds(route, n_local, rank)
    pos = torch.arange(n_rows, device=route.device)
    return (pos >= lo) & (pos < hi)


def _bounds(offs: Tensor, n_local: int, rank: int | Tensor) -> tuple[Tensor, Tensor]:
    """First and one-past-last sorted row of this rank's experts, as 0-d tensors (no host sync)."""
    ends = torch.cat([offs.new_zeros(1), offs]).long()  # ends[e]: rows before expert e
    first = torch.as_tensor(rank, device=offs.device) * n_local  # a tensor index: no .item() (no host sync)
    lo, hi = ends.index_select(0, torch.stack([first, first + n_local]))
    return lo, hi


def local_experts_linear(x: Tensor, weight: Tensor, route: Tensor, form: str, out_dim: int,
                         rank: int | str) -> Tensor:
    """``grouped_linear(x, W, route)`` for the rows routed to this rank's experts (``weight``: its
    ``[El, ...]`` slice of the expert dim), zeros on every other row.

    Rows of other experts in ``x`` may hold anything (the previous expert matmul left them
    undefined): they are masked before the matmul, so neither they nor their gradient reach a weight
    or another row."""
    n_local, n = weight.shape[0], x.shape[0]
    rank = _rank(rank, route)
    if form == "ids":
        mine = own_rows(route, form, n, n_local, rank)
        local_ids = (route - rank * n_local).clamp(0, n_local - 1)
        xs = torch.where(mine[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        y = _grouped_linear(xs, weight, local_ids, form, out_dim)
        return torch.where(mine[:, None], y, torch.zeros((), dtype=y.dtype, device=y.device))
    lo, hi = _bounds(route, n_local, rank)
    pos = torch.arange(n, device=x.device)
    valid = (pos < hi - lo)[:, None]  # after rolling this rank's rows to the front
    rolled = x[(pos + lo) % n]
    rolled = torch.where(valid, rolled, torch.zeros((), dtype=x.dtype, device=x.device))
    mine = torch.arange(n_local, device=route.device) + rank * n_local  # this rank's experts
    offs = (route.index_select(0, mine).long() - lo).to(route.dtype)
    y = _grouped_linear(rolled, weight, offs, form, out_dim)
    y = torch.where(valid, y, torch.zeros((), dtype=y.dtype, device=y.device))
    return y[(pos - lo) % n]  # rows back in the model's order: zeros off this rank's experts


def expert_rows_zeroed(x: Tensor, route: Tensor, form: str, n_local: int, rank: int | str) -> Tensor:
    """This rank's rows of ``x`` kept, every other row zero: the rank's summand of the whole value."""
    mine = own_rows(route, form, x.shape[0], n_local, rank)
    mine = mine.view(-1, *([1] * (x.dim() - 1)))
    return torch.where(mine, x, torch.zeros((), dtype=x.dtype, device=x.device))


def expert_rows_to_replicate(x: Tensor, route: Tensor, form: str, n_local: int, group: str) -> Tensor:
    """Rows of this rank's experts -> the whole value on every rank: zero the other rows, all-reduce
    (Megatron's g; each row is computed on exactly one rank)."""
    from .mappings import reduce_from_tp

    return reduce_from_tp(expert_rows_zeroed(x, route, form, n_local, group), group)


# ----------------------------------------------------------------------------- under sequence parallelism
# Each rank holds 1/tp of the tokens, routes them itself, and the rows (token, expert) travel to the rank of
# their expert and back: Megatron's all-to-all token dispatcher, in a fixed worst-case buffer. Every rank sends
# each other rank a block of S rows (S: its own rows, tokens x top-k), filled up to the rows routed there, so
# every shape is static and no count is read on the host (no host sync, one graph, Inductor-friendly); the
# price is tp x the bytes of an exact exchange (docs/models.md compares).


def _row_experts(route: Tensor, form: str, n_rows: int) -> Tensor:
    """The expert of each row: ``route`` itself (``"ids"``), or, for rows sorted by expert with cumulative
    counts, how many experts end at or before the row (rows past the last count: E, a row of no expert)."""
    if form == "ids":
        return route.long()
    return torch.searchsorted(route.long(), torch.arange(n_rows, device=route.device), right=True)


def dispatch_rows(x: Tensor, route: Tensor, form: str, n_local: int, group: str) -> tuple:
    """Send each row of ``x`` (this rank's tokens' rows, routed by ``route``) to the rank holding its expert.

    Returns ``(rows, rows_route, send_at, order, valid)``: ``rows`` the rows this rank's experts receive from
    every rank (``[tp * S, H]``; zero where a block is not full), laid out for ``grouped_linear`` with
    ``rows_route`` (sorted by local expert with cumulative counts, or the local expert of each row); the
    rest is what ``combine_rows`` needs to send the results back. Two all-to-alls (the rows, differentiable:
    their backward is the reverse all-to-all; and each row's local expert, int32)."""
    from .mappings import _all_to_all, all_to_all_tp, group_size

    tp, S = group_size(group), x.shape[0]
    e = _row_experts(route, form, S)
    dest = torch.div(e, n_local, rounding_mode="floor").clamp(max=tp)  # tp: a row of no expert, sent nowhere
    slot = (torch.nn.functional.one_hot(dest, tp + 1).cumsum(0) - 1).gather(1, dest[:, None]).squeeze(1)
    send_at = torch.where(dest < tp, dest * S + slot, tp * S)  # its row in the send buffer (tp * S: a dump row)
    send = x.new_zeros(tp * S + 1, *x.shape[1:]).index_copy(0, send_at, x)[:-1]
    ids = torch.full((tp * S + 1,), -1, dtype=torch.int32, device=x.device)
    ids = ids.index_copy(0, send_at, (e - dest * n_local).to(torch.int32))[:-1]
    rows = all_to_all_tp(send, group, 0, 0)  # block s: the rows rank s routed to this rank's experts
    key = _all_to_all(ids, 0, 0, group).long()  # their local experts (-1: an empty slot)
    key = torch.where(key >= 0, key, n_local)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    if form == "ids":
        valid = key < n_local
        return torch.where(valid[:, None], rows, zero), key.clamp(max=n_local - 1), send_at, None, valid
    order = torch.argsort(key, stable=True)  # by local expert (then source rank, then the source's order)
    valid = key.index_select(0, order) < n_local
    counts = torch.zeros(n_local + 1, dtype=torch.long, device=x.device).scatter_add(0, key, torch.ones_like(key))
    offs = counts[:n_local].cumsum(0).to(route.dtype)
    return torch.where(valid[:, None], rows.index_select(0, order), zero), offs, send_at, order, valid


def combine_rows(y: Tensor, send_at: Tensor, order: Tensor | None, valid: Tensor, group: str) -> Tensor:
    """The experts' results ``y`` (``dispatch_rows``' layout) back to the ranks and rows they came from:
    ``[S, O]`` in the order of the rows dispatched (zeros for a row of no expert). One all-to-all (its
    backward the reverse one). Rows past the experts' last count are undefined in ``y``: zeroed first."""
    from .mappings import all_to_all_tp

    zero = torch.zeros((), dtype=y.dtype, device=y.device)
    y = torch.where(valid[:, None], y, zero)
    if order is not None:  # back in the order received
        y = torch.zeros_like(y).index_copy(0, order, y)
    back = all_to_all_tp(y, group, 0, 0)  # block d: this rank's rows, computed by rank d's experts
    back = torch.cat([back, back.new_zeros(1, *back.shape[1:])])
    return back.index_select(0, send_at)
