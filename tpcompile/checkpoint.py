"""Checkpoints for tp-compiled models: meta-device init, per-rank safetensors slices, DTensor state dicts.

Everything here speaks the *single-device* names and shapes (docs/checkpoints.md):

- ``model.state_dict()`` of a tp-compiled model gives each sharded parameter as a ``DTensor``
  of its logical shape (``Shard(dim)``, or ``_StridedShard`` for fused projections), replicated
  ones as plain tensors, so ``torch.distributed.checkpoint`` saves, loads and reshards them;
  ``load_state_dict`` takes those DTensors or plain full tensors.
- ``load_checkpoint`` reads only this rank's slice of each tensor from safetensors files
  (``safe_open(...).get_slice``), after checking every name and shape first.
- ``prepare`` (called by ``tp_compile``) plans the model on example inputs before the first
  call, so a model built on the ``meta`` device gets only its local shards allocated.
"""
from __future__ import annotations

import glob
import json
import math
import os
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from tpcompile.backend import output_zeros, param_placeholders, plan_graph, shard_tensor
from tpcompile.passes.plan import ParamPlan


class TPCheckpointError(RuntimeError):
    """A checkpoint does not fit the model (names, shapes, files); nothing was loaded."""


# ===================================================================== layout of each tensor
def _state(model: nn.Module):
    return getattr(model, "_tp_state", None)


def _plan_of(model: nn.Module, p: torch.Tensor) -> ParamPlan | None:
    """The ParamPlan of a sharded parameter (None: stored whole, as on one device)."""
    st = _state(model)
    if st is None:
        return None
    fqn = st.fqn_of.get(id(p))
    pp = st.plan.get(fqn) if fqn is not None else None
    return pp if pp is not None and pp.style != "replicate" else None


def _rank_tp(model: nn.Module) -> tuple[int, int]:
    st = _state(model)
    return (st.rank, st.tp) if st is not None else (0, 1)


def _ranges(pp: ParamPlan, rank: int, tp: int) -> list[tuple[int, int]]:
    """(start, length) along ``pp.dim`` of each logical piece this rank holds (one per fused chunk).

    A padded vocabulary shard holds ``local`` rows of the zero-padded tensor: the real rows are
    the part below the logical size (possibly none), the rest is padding.
    """
    if getattr(pp, "padded_shape", None) is not None:
        n, size = pp.local_shape[pp.dim], pp.full_shape[pp.dim]
        return [(rank * n, max(0, min(n, size - rank * n)))]
    piece = pp.full_shape[pp.dim] // pp.chunks
    local = piece // tp
    return [(c * piece + rank * local, local) for c in range(pp.chunks)]


def _real_rows(local: torch.Tensor, pp: ParamPlan, rank: int, tp: int) -> torch.Tensor:
    """The part of a local shard that is in the logical tensor (drops vocabulary padding)."""
    if getattr(pp, "padded_shape", None) is None:
        return local
    return local.narrow(pp.dim, 0, _ranges(pp, rank, tp)[0][1])


def _pad_rows(real: torch.Tensor, pp: ParamPlan) -> torch.Tensor:
    """A local shard from its real rows: zeros for the vocabulary padding (inverse of ``_real_rows``)."""
    if getattr(pp, "padded_shape", None) is None or tuple(real.shape) == tuple(pp.local_shape):
        return real
    out = real.new_zeros(pp.local_shape)
    out.narrow(pp.dim, 0, real.shape[pp.dim]).copy_(real)
    return out


def _entries(model: nn.Module) -> dict[str, torch.Tensor]:
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


def _groups(entries: dict[str, torch.Tensor]) -> list[list[str]]:
    by_id: dict[int, list[str]] = {}
    for name, t in entries.items():
        by_id.setdefault(id(t), []).append(name)
    return list(by_id.values())


def _full_shape(model: nn.Module, t: torch.Tensor) -> tuple:
    pp = _plan_of(model, t)
    return tuple(pp.full_shape) if pp is not None else tuple(t.shape)


# ===================================================================== DTensor state dicts
def _mesh(model: nn.Module):
    st = _state(model)
    mesh = getattr(st, "_ckpt_mesh", None)
    if mesh is None:
        from torch.distributed.device_mesh import DeviceMesh

        mesh = DeviceMesh.from_group(st.group, st.device.type)
        st._ckpt_mesh = mesh
    return mesh


def _placement(pp: ParamPlan):
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    return Shard(pp.dim) if pp.chunks == 1 else _StridedShard(pp.dim, split_factor=pp.chunks)


def _contiguous_stride(shape: Sequence[int]) -> tuple:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= s
    return tuple(reversed(stride))


def to_dtensor(model: nn.Module, local: torch.Tensor, pp: ParamPlan):
    """This rank's shard as a DTensor of the logical shape (what DCP saves and reshards)."""
    from torch.distributed.tensor import DTensor

    # a padded vocabulary shard is torch.chunk's uneven Shard(dim) once its padding is dropped
    local = _real_rows(local, pp, *_rank_tp(model))
    dt = DTensor.from_local(local, _mesh(model), [_placement(pp)], run_check=False,
                            shape=torch.Size(pp.full_shape), stride=_contiguous_stride(pp.full_shape))
    if pp.chunks > 1:
        _strided_dcp_protocol(dt, pp, *_rank_tp(model))
    return dt


def _strided_dcp_protocol(dt, pp: ParamPlan, rank: int, tp: int) -> None:
    """A fused (strided) shard is ``chunks`` boxes of the logical tensor, not one.

    DCP describes a DTensor shard by one (offset, size) box, which is wrong for
    ``_StridedShard``. DTensor defers DCP's three hooks to its local tensor when that tensor
    has them, so we give the local tensor hooks that describe each box separately: DCP then
    writes and reads (and reshards) every piece at its true place.
    """
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    local = dt._local_tensor
    boxes = []
    for c, (start, length) in enumerate(_ranges(pp, rank, tp)):
        offsets = [0] * len(pp.full_shape)
        offsets[pp.dim] = start
        sizes = list(pp.local_shape)
        sizes[pp.dim] = length
        boxes.append((torch.Size(offsets), torch.Size(sizes), c * length))

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
    """Sharded parameters leave as DTensors of their logical shape."""
    for name, t in _entries(module).items():
        key = prefix + name
        pp = _plan_of(module, t)
        if pp is not None and key in sd and not hasattr(sd[key], "device_mesh"):
            sd[key] = to_dtensor(module, sd[key], pp)


def _load_pre_hook(module, sd, prefix, _meta, _strict, _missing, _unexpected, error_msgs) -> None:
    """Accept DTensors (any placement) or plain full tensors; hand torch this rank's shard."""
    from torch.distributed.tensor import DTensor

    rank, tp = _rank_tp(module)
    st = _state(module)
    for name, t in _entries(module).items():
        key = prefix + name
        if key in sd:  # a meta-built parameter that gets a value is no longer "never loaded"
            getattr(st, "_uninitialised", set()).discard(st.fqn_of.get(id(t)))
        pp = _plan_of(module, t)
        if pp is None or key not in sd:
            continue
        v = sd[key]
        if isinstance(v, DTensor):
            if tuple(v.shape) == tuple(pp.full_shape) and list(v.placements) == [_placement(pp)] \
                    and v.device_mesh.size() == tp:
                sd[key] = _pad_rows(v.to_local(), pp)
                continue
            v = v.full_tensor()
        if tuple(v.shape) != tuple(pp.full_shape):
            error_msgs.append(
                f"size mismatch for {key}: the checkpoint has shape {tuple(v.shape)}, the model's logical "
                f"(single-device) shape is {tuple(pp.full_shape)} (stored as {pp.style} shards of "
                f"{tuple(pp.local_shape)} at tp={tp})."
            )
            sd[key] = t.detach()  # keep torch from adding a second, local-shape message
            continue
        sd[key] = shard_tensor(v, pp, rank, tp)


def install_state_dict_hooks(model: nn.Module) -> None:
    """Make ``state_dict`` / ``load_state_dict`` speak single-device names and logical shapes."""
    model.register_state_dict_post_hook(_state_dict_post_hook)
    model.register_load_state_dict_pre_hook(_load_pre_hook)


# ===================================================================== full state dict
def _gather_full(model: nn.Module, local: torch.Tensor, pp: ParamPlan) -> torch.Tensor:
    st = _state(model)
    parts = [torch.empty_like(local) for _ in range(st.tp)]
    dist.all_gather(parts, local.contiguous(), group=st.group)
    pieces = [p.chunk(pp.chunks, pp.dim) for p in parts]  # [rank][chunk]
    full = torch.cat([pieces[r][c] for c in range(pp.chunks) for r in range(st.tp)], pp.dim)
    return full.narrow(pp.dim, 0, pp.full_shape[pp.dim])  # drops vocabulary padding, if any


@torch.no_grad()
def full_state_dict(model: nn.Module, *, rank0_only: bool = True, cpu: bool = True) -> dict[str, torch.Tensor]:
    """A plain single-device state dict of full tensors (copies, not views), gathered over the TP group.

    Every rank takes part in the gathers; with ``rank0_only`` the other ranks get ``{}``
    (and keep at most one full tensor at a time). Keys and shapes are the single-device ones.
    """
    sd = model.state_dict()
    if _state(model) is None:
        return {k: v.detach().to("cpu" if cpu else v.device, copy=True) for k, v in sd.items()}
    keep = not rank0_only or _state(model).rank == 0
    entries = _entries(model)
    out, done = {}, {}
    for key, v in sd.items():
        t = entries.get(key)
        pp = _plan_of(model, t) if t is not None else None
        if pp is not None and id(t) in done:  # a tied weight, gathered under its first name
            full = done[id(t)]
        elif pp is None:
            full = v.detach().to("cpu" if cpu else v.device, copy=True)
        else:
            full = _gather_full(model, t.detach(), pp)  # the whole local shard, padding included
            full = full.cpu() if cpu else full
            done[id(t)] = full if keep else None
        if keep:
            out[key] = full
    return out


# ===================================================================== safetensors loading
def _safetensors_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_checkpoint: {path!r} is neither a file nor a directory")
    index = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
    if index:
        with open(index[0]) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise TPCheckpointError(f"{index[0]}: no 'weight_map' in the index")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            names = [k for k, v in weight_map.items() if v in missing][:5]
            raise TPCheckpointError(f"{index[0]} names files that are not there: {missing} (tensors {names}...)")
        return [os.path.join(path, f) for f in files]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"load_checkpoint: no *.safetensors (or DCP .metadata) in {path!r}")
    return files


def _read_headers(files: list[str]) -> dict[str, tuple[str, tuple, str]]:
    """name -> (file, shape, dtype) for every tensor of every file; a bad file is named."""
    from safetensors import safe_open

    found: dict[str, tuple[str, tuple, str]] = {}
    for fn in files:
        try:
            with safe_open(fn, framework="pt", device="cpu") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    if k in found:
                        raise TPCheckpointError(f"tensor {k!r} is in both {found[k][0]} and {fn}")
                    found[k] = (fn, tuple(sl.get_shape()), sl.get_dtype())
        except TPCheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error type for bad headers / sizes
            raise TPCheckpointError(f"{fn}: corrupt or truncated safetensors file ({e}); nothing was loaded.") from e
    return found


_BLOCK_BYTES = 4 * 1024 * 1024


def _copy_local(fn: str, name: str, dest: torch.Tensor, pp: ParamPlan | None, rank: int, tp: int) -> None:
    """Copy this rank's slice of ``name`` into ``dest`` with ``get_slice`` reads of <= 4 MiB.

    Only the rank's rows / columns are read (one span per fused piece), in blocks of rows,
    and the file is opened per block: safetensors maps the whole file, and the pages a read
    touches count as this process's memory until the map is closed. So loading costs the
    local shards plus one block, not a full tensor.
    """
    from safetensors import safe_open

    def read(index):
        with safe_open(fn, framework="pt", device="cpu") as f:
            return f.get_slice(name)[index]

    with safe_open(fn, framework="pt", device="cpu") as f:
        shape = tuple(f.get_slice(name).get_shape())
        if not shape:
            dest.copy_(f.get_tensor(name))
            return
    dim = 0 if pp is None else pp.dim
    if pp is None:
        spans = [(0, 0, shape[0])]
    else:
        piece = pp.local_shape[dim] // pp.chunks  # local rows per fused piece
        spans = [(s, c * piece, n) for c, (s, n) in enumerate(_ranges(pp, rank, tp))]
        if getattr(pp, "padded_shape", None) is not None:  # vocabulary padding: zeros, not read
            n = spans[0][2]
            dest.narrow(dim, n, dest.shape[dim] - n).zero_()
    row = max(1, math.prod(shape[1:]) * dest.element_size())  # bytes of one full row (dim 0)
    for src, dst, n in spans:
        if dim == 0:
            step = max(1, _BLOCK_BYTES // row)
            for o in range(0, n, step):
                k = min(step, n - o)
                dest.narrow(0, dst + o, k).copy_(read(slice(src + o, src + o + k)))
        else:
            step = max(1, _BLOCK_BYTES // max(1, row * n // shape[dim]))
            for o in range(0, shape[0], step):
                k = min(step, shape[0] - o)
                index = (slice(o, o + k),) + (slice(None),) * (dim - 1) + (slice(src, src + n),)
                dest.narrow(0, o, k).narrow(dim, dst, n).copy_(read(index))


@torch.no_grad()
def _load_safetensors(model: nn.Module, path: str, strict: bool) -> list[str]:
    files = _safetensors_files(path)
    found = _read_headers(files)
    entries = _entries(model)
    groups = _groups(entries)
    errors, plan = [], []
    for names in groups:
        t = entries[names[0]]
        src = next((n for n in names if n in found), None)
        if src is None:
            errors.append(f"missing key: {' / '.join(names)} (shape {_full_shape(model, t)})")
            continue
        want, (fn, have, _) = _full_shape(model, t), found[src]
        if tuple(have) != tuple(want):
            errors.append(f"size mismatch for {src}: {fn} has shape {have}, the model's logical shape is {want}")
            continue
        plan.append((src, t, fn))
    unexpected = sorted(set(found) - set(entries))
    if strict and unexpected:
        errors.append(f"unexpected keys (not in the model; strict=False ignores them): {unexpected[:20]}"
                      f"{'...' if len(unexpected) > 20 else ''}")
    if errors:
        raise TPCheckpointError(f"load_checkpoint({path!r}): nothing was loaded:\n  " + "\n  ".join(errors))
    rank, tp = _rank_tp(model)
    for src, t, fn in plan:
        _copy_local(fn, src, t.data, _plan_of(model, t), rank, tp)
    _mark_loaded(model)
    return unexpected


# ===================================================================== DCP (sharded) checkpoints
def _is_dcp(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ".metadata"))


def _optim_fqns(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str]:
    names = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)
    return names


def optim_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state keyed by parameter FQN; per-element state of a sharded parameter as DTensors."""
    names = _optim_fqns(model, optimizer)
    state = {}
    for p, s in optimizer.state.items():
        pp = _plan_of(model, p)
        out = {}
        for k, v in s.items():
            if pp is not None and isinstance(v, torch.Tensor) and v.shape == p.shape:
                v = to_dtensor(model, v, pp)
            out[k] = v
        state[names[id(p)]] = out
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    # one opaque string: DCP would otherwise flatten the list of dicts into many small entries
    return {"state": state, "param_groups": json.dumps(groups, default=float)}


def _saved_param_groups(model: nn.Module, optimizer: torch.optim.Optimizer, path: str, reader) -> list:
    """The saved ``param_groups``, checked against ``optimizer`` before anything is loaded."""
    import torch.distributed.checkpoint as dcp

    if "optim.param_groups" not in reader.read_metadata().state_dict_metadata:
        raise TPCheckpointError(f"{path}: holds no optimizer state (saved without save_checkpoint(optimizer=...))")
    sd = {"optim": {"param_groups": ""}}
    dcp.load(sd, checkpoint_id=path)
    groups = json.loads(sd["optim"]["param_groups"])
    names = _optim_fqns(model, optimizer)
    if [g["params"] for g in groups] != [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]:
        raise TPCheckpointError(f"{path}: the optimizer's parameter groups (by FQN) differ from the saved ones; "
                                f"nothing was loaded.")
    return groups


def _load_optimizer_dcp(model: nn.Module, optimizer: torch.optim.Optimizer, path: str, reader, groups) -> None:
    """Optimizer state resharded to this rank: targets made from the checkpoint's metadata."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = reader.read_metadata().state_dict_metadata
    names = _optim_fqns(model, optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    target: dict[str, Any] = {}
    bufs: dict[str, dict] = {}
    for p in params:
        fqn, pp = names[id(p)], _plan_of(model, p)
        pre = f"optim.state.{fqn}."
        for key, m in md.items():
            if not key.startswith(pre) or "." in key[len(pre):]:
                continue
            buf = v = None
            if isinstance(m, TensorStorageMetadata):
                if pp is not None and tuple(m.size) == tuple(pp.full_shape):
                    buf = torch.zeros(p.shape, dtype=m.properties.dtype, device=p.device)
                    v = to_dtensor(model, buf, pp)  # its local tensor is a view of buf: DCP fills buf
                else:
                    v = torch.zeros(tuple(m.size), dtype=m.properties.dtype, device=p.device if len(m.size) else "cpu")
            target.setdefault(fqn, {})[key[len(pre):]] = v
            bufs.setdefault(fqn, {})[key[len(pre):]] = buf
    sd = {"optim": {"state": target}}
    dcp.load(sd, checkpoint_id=path)
    for p in params:
        fqn = names[id(p)]
        s = sd["optim"]["state"].get(fqn)
        if s:
            optimizer.state[p] = {k: v if bufs[fqn][k] is None else bufs[fqn][k] for k, v in s.items()}
    for g, saved in zip(optimizer.param_groups, groups):
        g.update({k: tuple(v) if isinstance(g.get(k), tuple) else v for k, v in saved.items() if k != "params"})


def _check_dcp_keys(model: nn.Module, path: str, reader, strict: bool) -> None:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = reader.read_metadata().state_dict_metadata
    saved = {k[len("model."):]: m for k, m in md.items() if k.startswith("model.")}
    entries = _entries(model)
    errors = []
    for name, t in entries.items():
        m = saved.get(name)
        if m is None:
            errors.append(f"missing key: {name}")
        elif isinstance(m, TensorStorageMetadata) and tuple(m.size) != _full_shape(model, t):
            errors.append(f"size mismatch for {name}: saved {tuple(m.size)}, model {_full_shape(model, t)}")
    unexpected = sorted(set(saved) - set(entries))
    if strict and unexpected:
        errors.append(f"unexpected keys: {unexpected[:20]}")
    if errors:
        raise TPCheckpointError(f"load_checkpoint({path!r}): nothing was loaded:\n  " + "\n  ".join(errors))


# ===================================================================== public entry points
def load_checkpoint(model: nn.Module, path: str | os.PathLike, *, strict: bool = True,
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load ``path`` into ``model`` (tp-compiled or plain), reading only this rank's slices.

    ``path``: a ``*.safetensors`` file, a directory of them (with ``*.safetensors.index.json``
    as published checkpoints have, or without), or a DCP directory written by
    ``save_checkpoint`` (then ``optimizer`` state is restored too, resharded to this TP degree).
    Names are the single-device FQNs; a tied weight may be present under any of its names.
    Every name and shape is checked before anything is copied (``TPCheckpointError``).
    """
    path = os.fspath(path)
    _require_plan(model, "load_checkpoint")
    if _is_dcp(path):
        import torch.distributed.checkpoint as dcp

        reader = dcp.FileSystemReader(path)
        _check_dcp_keys(model, path, reader, strict)
        groups = _saved_param_groups(model, optimizer, path, reader) if optimizer is not None else None
        sd = {"model": model.state_dict()}
        dcp.load(sd, checkpoint_id=path)
        model.load_state_dict(sd["model"], strict=strict)
        if optimizer is not None:
            _load_optimizer_dcp(model, optimizer, path, reader, groups)
        _mark_loaded(model)
        return
    if optimizer is not None:
        raise ValueError("load_checkpoint(optimizer=...) needs a DCP checkpoint (save_checkpoint(format='dcp'))")
    _load_safetensors(model, path, strict)


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *, format: str = "dcp",
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """Save ``model`` (and ``optimizer``) with single-device names and logical shapes.

    ``format="dcp"``: ``torch.distributed.checkpoint`` directory, every rank writes its own
    shards (``{"model": ..., "optim": ...}``); loads at any TP degree, including a plain model.
    ``format="safetensors"``: one full ``model.safetensors`` (or ``path`` itself if it ends in
    ``.safetensors``), gathered to and written by the group's first rank; tied weights once.
    """
    path = os.fspath(path)
    if format == "dcp":
        import torch.distributed.checkpoint as dcp

        sd: dict[str, Any] = {"model": model.state_dict()}
        if optimizer is not None:
            sd["optim"] = optim_state_dict(model, optimizer)
        dcp.save(sd, checkpoint_id=path, no_dist=not dist.is_initialized())
        return
    if format != "safetensors":
        raise ValueError(f"save_checkpoint(format={format!r}): use 'dcp' or 'safetensors'")
    if optimizer is not None:
        raise ValueError("save_checkpoint(format='safetensors') holds no optimizer state; use format='dcp'")
    from safetensors.torch import save_file

    full = full_state_dict(model, rank0_only=True)
    st = _state(model)
    if st is None or st.rank == 0:
        seen, unique = set(), {}
        for k, v in full.items():  # tied weights once, under their first name (as save_pretrained does)
            t = _entries(model)[k]
            if id(t) not in seen:
                seen.add(id(t))
                unique[k] = v.contiguous()
        fn = path if path.endswith(".safetensors") else os.path.join(path, "model.safetensors")
        os.makedirs(os.path.dirname(fn) or ".", exist_ok=True)
        save_file(unique, fn, metadata={"format": "pt"})
    if st is not None:
        dist.barrier(group=st.group)


# ===================================================================== meta-device models
def reset_parameters(module: nn.Module) -> None:
    """Per-module init: the module's own ``reset_parameters()`` if it has one (torch layers do)."""
    fn = getattr(module, "reset_parameters", None)
    if callable(fn):
        fn()


def _sweeps(init_weights) -> list[Callable[[nn.Module], None]]:
    if init_weights is None or init_weights is False:
        return []
    if init_weights is True:
        return [reset_parameters]
    if callable(init_weights):
        return [init_weights]
    return [reset_parameters if f is True else f for f in init_weights]


def _require_plan(model: nn.Module, what: str) -> None:
    st = _state(model)
    if st is None:
        return
    meta = [n for n, p in st.params.items() if p.is_meta]
    if meta:
        raise RuntimeError(f"{what}: parameters {meta[:4]} are still on the meta device; "
                           f"pass tp_compile(model, example_inputs=...) so they get allocated.")


def _mark_loaded(model: nn.Module) -> None:
    st = _state(model)
    if st is not None:
        getattr(st, "_uninitialised", set()).clear()


class _PlanOnly:
    """Dynamo backend that only plans: the same passes as the real backend, no compile.

    Returns zeros of the graph's output shapes, so later graphs (after a break) get traced
    and planned too; Dynamo's backend guard keeps these entries away from the real calls.
    """

    def __init__(self, state):
        self.state = state

    def __call__(self, gm, example_inputs):
        st = self.state
        fqns, _ = param_placeholders(st, gm, example_inputs)
        stand_in = output_zeros(gm)
        st.apply_plan(plan_graph(gm, fqns, st.tp, st.overrides)[0])
        return stand_in


def _post_order(model: nn.Module) -> list[nn.Module]:
    out: list[nn.Module] = []
    model.apply(out.append)  # the order ``model.apply(init_fn)`` visits modules in
    return out


def _units(mods: list[nn.Module]) -> list[list[nn.Module]]:
    """Modules that share a parameter (tied weights) are initialised together."""
    parent = list(range(len(mods)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    for i, m in enumerate(mods):
        for p in m._parameters.values():
            if p is not None and p.is_meta:
                j = owner.setdefault(id(p), i)
                parent[find(i)] = find(j)
    groups: dict[int, list[nn.Module]] = {}
    for i, m in enumerate(mods):
        groups.setdefault(find(i), []).append(m)
    return sorted(groups.values(), key=lambda g: mods.index(g[0]))


def _rng(device: torch.device):
    if device.type == "cuda":
        return (lambda: torch.cuda.get_rng_state(device)), (lambda s: torch.cuda.set_rng_state(s, device))
    return torch.get_rng_state, torch.set_rng_state


def _own_meta(m: nn.Module) -> list[str]:
    return [n for n, p in m._parameters.items() if p is not None and p.is_meta]


@torch.no_grad()
def prepare(model: nn.Module, state, example_inputs, init_weights, device) -> None:
    """Plan on ``example_inputs`` now; allocate (and optionally initialise) meta tensors.

    Init of a meta model (``init_weights``: ``True`` for each module's ``reset_parameters``, a
    per-module function such as ``model._init_weights``, or a list of these run one after
    the other) reproduces, bit for bit, ``torch.manual_seed(s)`` then ``for fn in sweeps:
    model.apply(fn)`` on one device: a first pass runs every init on full-size tensors one
    module at a time only to record the RNG state before each call; a second pass rebuilds
    each module's full tensors from those states, keeps this rank's slice and frees the rest.
    Peak memory: the largest module's full parameters, twice the init compute.
    """
    meta_params = [n for n, p in state.params.items() if p.is_meta]
    meta_bufs = [n for n, b in model.named_buffers() if b.is_meta]
    if not meta_params and not meta_bufs:
        if example_inputs is not None:
            _plan_now(model, state, example_inputs)
        return
    if example_inputs is None:
        raise ValueError(
            f"tp_compile: {len(meta_params) + len(meta_bufs)} parameters/buffers (e.g. "
            f"{(meta_params + meta_bufs)[0]!r}) are on the meta device; pass example_inputs=(...) (a batch "
            f"like the real ones) so tp_compile can plan before allocating only this rank's shards."
        )
    device = torch.device(device) if device is not None else state.device
    sweeps = _sweeps(init_weights)
    mods = _post_order(model)
    twin_of = {id(m): t for m, t in state._pairs}
    get_rng, set_rng = _rng(device)

    # pass 1: buffers (small, replicated) for good; RNG states before each (sweep, module)
    states: dict[tuple[int, int], torch.Tensor] = {}
    for m in mods:
        _materialise_buffers(m, twin_of[id(m)], device)
    for s, fn in enumerate(sweeps):
        for i, m in enumerate(mods):
            states[(s, i)] = get_rng()
            saved = {n: m._parameters[n] for n in _own_meta(m)}
            for n, p in saved.items():
                m._parameters[n] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), p.requires_grad)
            fn(m)
            m._parameters.update(saved)
    end_state = get_rng() if sweeps else None
    bad = [f"{mn}.{n}" if mn else n for mn, m in model.named_modules() for n, b in m._buffers.items()
           if b is not None and b.is_floating_point() and n in m._non_persistent_buffers_set and b.isnan().any()]
    if bad:
        raise ValueError(f"tp_compile: non-persistent buffers {bad} were on the meta device and no init set them "
                         f"(no checkpoint holds them): pass init_weights= a function that sets them "
                         f"(e.g. a Hugging Face model's model._init_weights), or create buffers off meta.")

    _plan_now(model, state, example_inputs)

    # pass 2: one unit of modules at a time: full tensors, replayed init, keep the slice
    index = {id(m): i for i, m in enumerate(mods)}
    new: dict[int, nn.Parameter] = {}
    uninit = set()
    for unit in _units(mods):
        params = {id(p): p for m in unit for p in m._parameters.values() if p is not None and p.is_meta}
        if not params:
            continue
        full = {}
        for pid, p in params.items():
            pp = state.plan.get(state.fqn_of.get(pid))
            # with no init only the local shard is ever allocated (NaN until loaded)
            shape = p.shape if pp is None else pp.full_shape if sweeps else pp.local_shape
            fill = float("nan") if p.is_floating_point() else 0
            full[pid] = nn.Parameter(torch.full(shape, fill, dtype=p.dtype, device=device), p.requires_grad)
        if sweeps:
            swapped = [(m, n, p) for m in unit for n, p in m._parameters.items() if p is not None and id(p) in full]
            for m, n, p in swapped:
                m._parameters[n] = full[id(p)]
            for s, fn in enumerate(sweeps):
                for m in unit:
                    set_rng(states[(s, index[id(m)])])
                    fn(m)
            for m, n, p in swapped:
                m._parameters[n] = p
        for pid, p in params.items():
            fqn = state.fqn_of[pid]
            f = full[pid].data
            if sweeps and f.is_floating_point() and f.isnan().any():
                raise ValueError(f"tp_compile: init_weights left {fqn} (at least partly) uninitialised; "
                                 f"give an init for its module ({type(_owner(unit, p)).__name__}), or load a checkpoint.")
            pp = state.plan.get(fqn)
            local = shard_tensor(f, pp, state.rank, state.tp) if pp is not None and sweeps else f
            new[pid] = nn.Parameter(local, requires_grad=p.requires_grad)
            if not sweeps:
                uninit.add(fqn)
            del full[pid], f
    if end_state is not None:
        set_rng(end_state)
    _install_params(model, state, new)
    if uninit:
        state._uninitialised = uninit
        forward = model.forward

        def checked(*args, **kwargs):
            if state._uninitialised:
                raise RuntimeError(
                    f"tp_compile: {len(state._uninitialised)} parameters (e.g. {sorted(state._uninitialised)[0]!r}) "
                    f"were built on the meta device and never loaded: call tpcompile.load_checkpoint(model, path) "
                    f"first, or pass tp_compile(..., init_weights=True)."
                )
            return forward(*args, **kwargs)

        model.forward = checked


def _owner(unit: list[nn.Module], p) -> nn.Module:
    return next(m for m in unit if any(q is p for q in m._parameters.values()))


def _materialise_buffers(m: nn.Module, twin: nn.Module, device: torch.device) -> None:
    for n, b in list(m._buffers.items()):
        if b is not None and b.is_meta:
            fill = float("nan") if b.is_floating_point() else 0
            nb = torch.full(b.shape, fill, dtype=b.dtype, device=device)
            m._buffers[n] = nb
            twin._buffers[n] = nb


def _install_params(model: nn.Module, state, new: dict[int, nn.Parameter]) -> None:
    """Swap meta Parameters for real local ones everywhere they are referenced (tied too)."""
    for m in model.modules():
        for n, p in m._parameters.items():
            if p is not None and id(p) in new:
                m._parameters[n] = new[id(p)]
    ghosts = dict(zip(state.params.keys(), state._ghosts))
    for fqn, p in list(state.params.items()):
        q = new.get(id(p))
        if q is None:
            continue
        state.params[fqn] = q
        del state.fqn_of[id(p)]
        state.fqn_of[id(q)] = fqn
        state.real_of_ghost[id(ghosts[fqn])] = q
        g = ghosts[fqn]
        if g.device != q.device:
            g.data = torch.full((), float("nan") if g.is_floating_point() else 0, dtype=g.dtype,
                                device=q.device).expand(g.shape)


def _plan_now(model: nn.Module, state, example_inputs) -> None:
    """Trace the ghost twin on ``example_inputs`` with the planning backend; apply the plan."""
    if isinstance(example_inputs, dict):
        args, kwargs = (), example_inputs
    elif isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    else:
        args, kwargs = tuple(example_inputs), {}
    for m, t in state._pairs:
        t.training = m.training
    planner = torch.compile(state.twin, backend=_PlanOnly(state), dynamic=False)
    try:
        with torch._dynamo.config.patch(**state.dynamo_config):
            planner(*args, **kwargs)  # the same Dynamo settings as TensorParallel.forward: the same graphs
    except torch._dynamo.exc.BackendCompilerFailed as e:
        inner = getattr(e, "inner_exception", None)
        if inner is not None:
            raise inner from None
        raise


__all__ = [
    "TPCheckpointError",
    "full_state_dict",
    "load_checkpoint",
    "save_checkpoint",
    "optim_state_dict",
    "reset_parameters",
    "to_dtensor",
]
