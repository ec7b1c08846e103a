"""State dicts of a tp-compiled model, in single-device names and logical shapes.

The parameters are DTensors on the TP mesh, so ``model.state_dict()`` already holds them as
DTensors of their logical shape and DCP saves and reshards them. What this module adds is
what DTensor cannot know:

- a fused projection's shard is several boxes of the full tensor (one per piece), where DCP
  assumes one box per shard: its local tensor gets DCP's chunk hooks describing each box
  (``dcp_boxes``), so every piece is written and read at its true place;
- ``load_state_dict`` takes plain full tensors too (a single-device checkpoint): each becomes
  the parameter's DTensor, this rank's shard cut by its layout;
- ``full_state_dict`` gathers the true full tensors, unequal fused pieces included.
"""
from __future__ import annotations

import json
import torch
import torch.distributed as dist
import torch.nn as nn

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
def contiguous_stride(shape) -> tuple:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= s
    return tuple(reversed(stride))


def as_dtensor(model: nn.Module, stored: torch.Tensor, pp: ParamPlan):
    """This rank's stored shard as a DTensor of the logical shape, with DCP's boxes right."""
    from torch.distributed.tensor import DTensor

    st = state_of(model)
    dt = DTensor.from_local(stored, st.mesh, [pp.placement()], run_check=False,
                            shape=torch.Size(pp.full_shape), stride=contiguous_stride(pp.full_shape))
    dcp_boxes(dt, pp, st.rank)
    return dt


def dcp_boxes(dt, pp: ParamPlan, rank: int) -> None:
    """A fused (strided or unequal-piece) shard is one box of the full tensor per piece.

    DCP describes a DTensor shard by one (offset, size) box, which is wrong for pieces.
    DTensor defers DCP's three hooks to its local tensor when that tensor has them, so we
    give the local tensor hooks that describe each box: DCP then writes and reads (and
    reshards) every piece at its true place.
    """
    if not pp.sharded or (pp.chunks == 1 and not pp.pieces):
        return
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    local = dt._local_tensor
    boxes = [(torch.Size(o), torch.Size(s), at) for o, s, at in pp.boxes(rank)]

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
                return local.narrow(pp.dim, at, s[pp.dim])
        raise ValueError(f"{index.fqn}: no local piece at offset {tuple(index.offset)}")

    local.__create_chunk_list__ = chunks
    local.__create_write_items__ = write_items
    local.__get_tensor_shard__ = shard


def _state_dict_post_hook(module: nn.Module, sd: dict, prefix: str, _meta) -> None:
    """Fused shards leave with DCP hooks that describe their pieces."""
    from torch.distributed.tensor import DTensor

    st = state_of(module)
    for key, v in sd.items():
        if not key.startswith(prefix) or not isinstance(v, DTensor) or v.device_mesh.ndim != 1:
            continue
        pp = layout_of(module, key[len(prefix):])
        if pp is not None and v.device_mesh == st.mesh:
            dcp_boxes(v, pp, st.rank)


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
    """The full tensor of a TP-sharded DTensor parameter, by its layout (every rank takes part)."""
    from torch.distributed.tensor import DTensor

    st = state_of(model)
    if isinstance(t, DTensor) and t.device_mesh.ndim > 1:  # FSDP2 over TP: DTensor gathers both
        if not pp.exact:
            from tpcompile.errors import TPCheckpointError

            raise TPCheckpointError(f"{pp.fqn}: a fused projection with unequal pieces {pp.pieces} cannot be "
                                    f"gathered through FSDP2's DTensor (no placement describes its layout).")
        return t.full_tensor()
    local = t._local_tensor if isinstance(t, DTensor) else t
    padded = pp.pad(local).contiguous()
    parts = [torch.empty_like(padded) for _ in range(st.tp)]
    dist.all_gather(parts, padded, group=st.group)
    return pp.assemble([pp.unpad(p, r) for r, p in enumerate(parts)])


@torch.no_grad()
def full_state_dict(model: nn.Module, *, rank0_only: bool = True, cpu: bool = True) -> dict[str, torch.Tensor]:
    """A plain single-device state dict of full tensors (copies, not views), gathered over the TP group.

    Every rank takes part in the gathers; with ``rank0_only`` the other ranks get ``{}``
    (and keep at most one full tensor at a time). Keys and shapes are the single-device ones.
    Works under FSDP2 too (the data-parallel dimension is gathered by DTensor).
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
    st = state_of(model)
    state = {}
    for p, s in optimizer.state.items():
        pp = layout_of(model, names[id(p)])
        out = {}
        for k, v in s.items():
            if pp is not None and isinstance(v, DTensor) and v.device_mesh == st.mesh:
                dcp_boxes(v, pp, st.rank)
            out[k] = v
        state[names[id(p)]] = out
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    # one opaque string: DCP would otherwise flatten the list of dicts into many small entries
    return {"state": state, "param_groups": json.dumps(groups, default=float)}


__all__ = ["full_state_dict", "optim_state_dict", "install_state_dict_hooks", "layout_of", "entries", "as_dtensor"]
