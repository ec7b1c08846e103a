"""State dicts of a tp-compiled model, in single-device names and logical shapes.

The parameters are DTensors on the TP mesh, so ``model.state_dict()`` already holds them as
DTensors of their logical shape and DCP saves and reshards them. What this module adds is
what DTensor cannot know:

- a fused projection's shard is several boxes of the full tensor (one per piece), where DCP
  assumes one box per shard, and FSDP2's shard of a TP shard (``fully_shard`` over a
  data-parallel mesh: the stored shard chunked along a dim, ``part_of``) may cut through the
  pieces: its local tensor gets DCP's chunk hooks describing each box from the layout
  (``dcp_boxes``), so every piece is written and read at its true place;
- ``load_state_dict`` takes plain full tensors too (a single-device checkpoint): each becomes
  the parameter's DTensor, this rank's shard cut by its layout;
- ``full_state_dict`` / ``full_optim_state_dict`` gather the true full tensors by the layout,
  unequal fused pieces and FSDP2's shards included.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from tpcompile.errors import TPCheckpointError
from tpcompile.passes.layout import ParamPlan, replicated


def state_of(model: nn.Module):
    return getattr(model, "_tp_state", None)


def rank_tp(model: nn.Module) -> tuple[int, int]:
    st = state_of(model)
    return (st.rank, st.tp) if st is not None else (0, 1)


def layout_of(model: nn.Module, name: str) -> ParamPlan | None:
    """The layout of the parameter called ``name`` if it is sharded (None: stored whole)."""
    st = state_of(model)
    if st is None:
        return None
    pp = st.params.layouts.get(getattr(st.params, "canonical", {}).get(name, name))
    return pp if pp is not None and pp.sharded else None


def entries(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every state-dict name -> the tensor behind it (tied weights: several names, one tensor)."""
    out = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        pre = mname + "." if mname else ""
        for n, p in m._parameters.items():
            if p is not None:
                out[pre + n] = p
        for n, b in m._buffers.items():
            if b is not None and n not in m._non_persistent_buffers_set:
                out[pre + n] = b
    return out


def tied_groups(names_to_tensors: dict[str, torch.Tensor]) -> list[list[str]]:
    by_id: dict[int, list[str]] = {}
    for name, t in names_to_tensors.items():
        by_id.setdefault(id(t), []).append(name)
    return list(by_id.values())


# ===================================================================== DTensor / DCP
@dataclass(frozen=True)
class Part:
    """What of a TP-sharded parameter a DTensor holds on this rank: the stored shard of TP rank
    ``rank``, or under FSDP2 (HSDP) the ``slice = (dim, start, length)`` of it that FSDP2 keeps.

    FSDP2 chunks the stored shard along ``dim`` like ``torch.chunk`` over the ``count`` ranks of
    its shard mesh dim (``chunk`` rows each, the last ones shorter or empty); ``group`` is that
    dim's process group, over which the slices gather back into the stored shard."""

    rank: int
    slice: tuple | None = None
    chunk: int = 0
    count: int = 1
    group: Any = None


def part_of(model: nn.Module, t, pp: ParamPlan) -> Part | None:
    """The part of ``pp``'s parameter that the DTensor ``t`` holds on this rank: its TP DTensor, or
    FSDP2's over it ((dp..., tp) mesh, the TP mesh last, as FSDP2 concatenates them). None for
    anything else (a plain tensor, a DTensor on another mesh); ``TPCheckpointError`` for a DTensor
    over the TP mesh laid out in a way that is not FSDP2's sharding of the stored shard."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    st = state_of(model)
    if st is None or not isinstance(t, DTensor):
        return None
    mesh = t.device_mesh
    if mesh.ndim == 1:
        return Part(st.rank) if mesh == st.mesh else None
    tp_dim = mesh.ndim - 1
    tp_ranks = sorted(dist.get_process_group_ranks(st.group))
    if sorted(dist.get_process_group_ranks(mesh.get_group(tp_dim))) != tp_ranks:
        return None

    def refuse(why: str):
        return TPCheckpointError(
            f"{pp.fqn}: cannot save, load or gather its {mesh.ndim}-D DTensor {t.placements} on mesh dims "
            f"{mesh.mesh_dim_names}: {why}. tpcompile checkpoints FSDP2 / HSDP over its TP parameters (fully_shard on "
            f"the data-parallel mesh, the TP mesh last); nothing was saved or loaded.")

    want = pp.placement() if pp.sharded else Replicate()
    if t.placements[-1] != want or mesh.get_coordinate()[tp_dim] != st.rank:
        raise refuse(f"its TP placement {t.placements[-1]!r} (TP rank {mesh.get_coordinate()[tp_dim]}) is not the "
                     f"layout's {want!r} (TP rank {st.rank})")
    dp = [(i, p) for i, p in enumerate(t.placements[:-1]) if not p.is_replicate()]
    if not dp:
        return Part(st.rank)
    if len(dp) > 1 or not isinstance(dp[0][1], (Shard, _StridedShard)):
        raise refuse("more than one data-parallel mesh dim shards it" if len(dp) > 1 else
                     f"{dp[0][1]!r} on mesh dim {dp[0][0]} is not a shard")
    i, p = dp[0]
    f, stored = p.dim, pp.stored_shape(st.rank)
    count, index = mesh.size(i), mesh.get_coordinate()[i]
    chunk = -(-stored[f] // count)
    start = min(stored[f], index * chunk)
    length = min(chunk, stored[f] - start)
    if tuple(t._local_tensor.shape) != stored[:f] + (length,) + stored[f + 1:]:
        raise refuse(f"its local shape {tuple(t._local_tensor.shape)} is not FSDP2's chunk {index} of {count} along "
                     f"dim {f} of the stored shard {stored}")
    return Part(st.rank, (f, start, length), chunk, count, mesh.get_group(i))


def local_boxes(model: nn.Module, name: str, t: torch.Tensor) -> list[tuple[tuple, tuple, tuple]]:
    """``(offsets, sizes, local)`` boxes of the full tensor that ``t`` (registered as ``name``) holds
    on this rank, in its local tensor: by the layout for a tp-compiled model's tensors (under
    FSDP2 too), by DTensor's own placements for anyone else's DTensor (FSDP2 on a plain model)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    pp = layout_of(model, name) or replicated(name, tuple(t.shape))
    part = part_of(model, t, pp)
    if part is not None:
        return pp.boxes(part.rank, part.slice)
    if isinstance(t, DTensor):
        sizes, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return [(tuple(offsets), tuple(sizes), (0,) * len(sizes))] if all(sizes) else []
    return pp.boxes(rank_tp(model)[0])


def dcp_boxes(dt, pp: ParamPlan, part: Part) -> None:
    """DCP's chunk hooks on ``dt``'s local tensor: one box of the full tensor per piece it holds.

    DCP describes a DTensor shard by one (offset, size) box computed from its placements. That is
    wrong for unequal fused pieces (no placement describes them), and FSDP2's shard of a fused
    shard is a cut through its pieces (``(_StridedShard, _StridedShard)``: DCP's boxes overlap).
    DTensor defers DCP's three hooks to its local tensor when that tensor has them, so we give
    the local tensor hooks that describe each box from the layout: DCP then writes and reads (and
    reshards) every piece at its true place. A plain TP shard needs none (DTensor is exact).
    """
    if not pp.sharded or (part.slice is None and pp.chunks == 1 and not pp.pieces):
        return
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    local = dt._local_tensor
    boxes = [(torch.Size(o), torch.Size(s), at) for o, s, at in pp.boxes(part.rank, part.slice)]

    def chunks():
        return [ChunkStorageMetadata(offsets=o, sizes=s) for o, s, _ in boxes]

    def write_items(fqn, _obj):
        props = TensorProperties.create_from_tensor(local)
        return [
            WriteItem(index=MetadataIndex(fqn, o), type=WriteItemType.SHARD,
                      tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=o, sizes=s), properties=props,
                                                  size=torch.Size(pp.full_shape)))
            for o, s, _ in boxes
        ]

    def shard(index):
        for o, s, at in boxes:
            if index.offset is None or tuple(index.offset) == tuple(o):
                return local[tuple(slice(a, a + n) for a, n in zip(at, s))]
        raise ValueError(f"{index.fqn}: no local piece at offset {tuple(index.offset)}")

    local.__create_chunk_list__ = chunks
    local.__create_write_items__ = write_items
    local.__get_tensor_shard__ = shard


def _state_dict_post_hook(module: nn.Module, sd: dict, prefix: str, _meta) -> None:
    """Sharded parameters (TP DTensors, or FSDP2's over them) leave with DCP hooks that describe their boxes."""
    from torch.distributed.tensor import DTensor

    for key, v in sd.items():
        if not key.startswith(prefix) or not isinstance(v, DTensor):
            continue
        pp = layout_of(module, key[len(prefix):])
        part = part_of(module, v, pp) if pp is not None else None
        if part is not None:
            dcp_boxes(v, pp, part)


def _load_pre_hook(module, sd, prefix, _meta, _strict, _missing, _unexpected, error_msgs) -> None:
    """Accept DTensors (any placement) or plain full tensors; hand torch a DTensor like the parameter."""
    from torch.distributed.tensor import DTensor, Replicate

    st = state_of(module)
    rank, tp = st.rank, st.tp
    for name, t in entries(module).items():
        key = prefix + name
        if key not in sd:
            continue
        getattr(st, "_uninitialised", set()).discard(st.params.canonical.get(name, name))
        if not isinstance(t, DTensor) or t.device_mesh.ndim != 1:
            continue  # a buffer, or FSDP2's parameter (FSDP's own hooks handle it)
        v = sd[key]
        pp = layout_of(module, name) or replicated(name, t.shape)
        if isinstance(v, DTensor):
            if v.device_mesh == t.device_mesh and v.placements == t.placements:
                continue
            v = v.full_tensor()
        if tuple(v.shape) != tuple(pp.full_shape):
            error_msgs.append(
                f"size mismatch for {key}: the checkpoint has shape {tuple(v.shape)}, the model's logical "
                f"(single-device) shape is {tuple(pp.full_shape)} (stored as {pp.style} shards at tp={tp})."
            )
            sd[key] = t.detach()  # keep torch from adding a second message
            continue
        stored = pp.stored(v.to(t.dtype), rank) if pp.sharded else v
        sd[key] = DTensor.from_local(stored, t.device_mesh, [pp.placement() if pp.sharded else Replicate()],
                                     run_check=False, shape=t.shape, stride=t.stride())


def install_state_dict_hooks(model: nn.Module) -> None:
    """Make ``state_dict`` / ``load_state_dict`` speak single-device names and logical shapes."""
    model.register_state_dict_post_hook(_state_dict_post_hook)
    model.register_load_state_dict_pre_hook(_load_pre_hook)


# ===================================================================== full state dict
def gather_full(model: nn.Module, t: torch.Tensor, pp: ParamPlan) -> torch.Tensor:
    """The full tensor of a TP-sharded parameter (a TP DTensor, FSDP2's DTensor over it, or a plain
    local shard) by its layout: FSDP2's slices gathered into the stored shard over the
    data-parallel group, then the stored shards over the TP group (every rank takes part)."""
    st = state_of(model)
    part = part_of(model, t, pp)
    local = t._local_tensor if hasattr(t, "_local_tensor") else t
    if part is not None and part.slice is not None:
        f, n = part.slice[0], pp.stored_shape(st.rank)[part.slice[0]]
        padded = local.new_zeros(local.shape[:f] + (part.chunk,) + local.shape[f + 1:])
        padded.narrow(f, 0, local.shape[f]).copy_(local)
        slices = [torch.empty_like(padded) for _ in range(part.count)]
        dist.all_gather(slices, padded, group=part.group)
        local = torch.cat(slices, f).narrow(f, 0, n)
    padded = pp.pad(local).contiguous()
    parts = [torch.empty_like(padded) for _ in range(st.tp)]
    dist.all_gather(parts, padded, group=st.group)
    return pp.assemble([pp.unpad(p, r) for r, p in enumerate(parts)])


@torch.no_grad()
def full_state_dict(model: nn.Module, *, rank0_only: bool = True, cpu: bool = True) -> dict[str, torch.Tensor]:
    """A plain single-device state dict of full tensors (copies, not views), gathered over the TP group.

    Every rank takes part in the gathers; with ``rank0_only`` the other ranks get ``{}``
    (and keep at most one full tensor at a time). Keys and shapes are the single-device ones.
    Works under FSDP2 / HSDP too (each parameter gathered by its layout, ``gather_full``).
    """
    from torch.distributed.tensor import DTensor

    sd = model.state_dict()
    st = state_of(model)
    keep = not rank0_only or not dist.is_initialized() or dist.get_rank() == 0
    out, done = {}, {}
    ents = entries(model)
    for key, v in sd.items():
        t = ents.get(key)
        pp = layout_of(model, key) if st is not None else None
        if pp is not None and t is not None and id(t) in done:  # a tied weight, gathered under its first name
            full = done[id(t)]
        elif pp is not None:
            full = gather_full(model, v, pp).detach()
            full = full.cpu() if cpu else full
            if t is not None:
                done[id(t)] = full if keep else None
        elif isinstance(v, DTensor):  # replicated (full_tensor() of a Replicate DTensor is its local tensor)
            full = v.full_tensor().detach().to("cpu" if cpu else v.device, copy=True)
        else:
            full = v.detach().to("cpu" if cpu else v.device, copy=True)
        if keep:
            out[key] = full
    return out


# ===================================================================== optimizer state
def optim_fqns(model: nn.Module) -> dict[int, str]:
    names = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)
    return names


def optim_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state keyed by parameter FQN; per-element state of a sharded parameter as DTensors
    (with the parameter's DCP boxes)."""
    from torch.distributed.tensor import DTensor

    names = optim_fqns(model)
    state = {}
    for p, s in optimizer.state.items():
        pp = layout_of(model, names[id(p)])
        out = {}
        for k, v in s.items():
            part = part_of(model, v, pp) if pp is not None and isinstance(v, DTensor) else None
            if part is not None:
                dcp_boxes(v, pp, part)
                if part.slice is None:  # the TP shard itself: full_tensor() places unequal pieces right
                    pp.mark(v)
            out[k] = v
        state[names[id(p)]] = out
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    # one opaque string: DCP would otherwise flatten the list of dicts into many small entries
    return {"state": state, "param_groups": json.dumps(groups, default=float)}


@torch.no_grad()
def full_optim_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, *, rank0_only: bool = True,
                          cpu: bool = True) -> dict[str, dict[str, Any]]:
    """The optimizer's per-parameter state as plain single-device tensors, keyed by parameter FQN
    (``{"h.0.mlp.fc.weight": {"step": ..., "exp_avg": ..., "exp_avg_sq": ...}}``): what a
    single-device optimizer holds. Sharded state is gathered like its parameter (``gather_full``,
    under FSDP2 too); every rank takes part; with ``rank0_only`` the other ranks get ``{}``."""
    from torch.distributed.tensor import DTensor

    names = optim_fqns(model)
    keep = not rank0_only or not dist.is_initialized() or dist.get_rank() == 0
    out: dict[str, dict[str, Any]] = {}
    for g in optimizer.param_groups:  # the same order on every rank: the gathers match up
        for p in g["params"]:
            s = optimizer.state.get(p)
            if not s:
                continue
            fqn, pp = names[id(p)], layout_of(model, names[id(p)])
            full = {}
            for k, v in s.items():
                if pp is not None and isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(pp.full_shape):
                    v = gather_full(model, v, pp)
                elif isinstance(v, DTensor):
                    v = v.full_tensor()
                if isinstance(v, torch.Tensor):
                    v = v.detach().to("cpu" if cpu else v.device, copy=True)
                full[k] = v
            if keep:
                out[fqn] = full
    return out


__all__ = ["full_state_dict", "full_optim_state_dict", "optim_state_dict", "install_state_dict_hooks", "layout_of",
           "entries", "part_of"]
