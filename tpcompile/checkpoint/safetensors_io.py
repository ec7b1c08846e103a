"""Safetensors checkpoints: per-rank slice reads (published HF checkpoints), one full file out.

Loading reads only this rank's rows / columns of each tensor (``safe_open(...).get_slice``),
one span per fused piece as the parameter's layout gives them, after checking every name and
shape first; saving gathers full tensors to the first rank and writes one file.
"""
from __future__ import annotations

import glob
import json
import math
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from tpcompile.errors import TPCheckpointError

from .state_dict import entries, full_state_dict, local_boxes, state_of, tied_groups


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor a checkpoint's values are copied into: a DTensor parameter's stored shard."""
    return getattr(t, "_local_tensor", t).data


def mark_loaded(model: nn.Module) -> None:
    st = state_of(model)
    if st is not None:
        getattr(st, "_uninitialised", set()).clear()


def safetensors_files(path: str) -> list[str]:
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


def read_headers(files: list[str]) -> dict[str, tuple[str, tuple, str]]:
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


def copy_local(fn: str, name: str, dest: torch.Tensor, boxes: list) -> None:
    """Copy this rank's part of ``name`` into ``dest`` with ``get_slice`` reads of <= 4 MiB.

    ``boxes``: ``(offsets, sizes, local)`` of the full tensor that ``dest`` holds (``local_boxes``:
    one per fused piece, cut by FSDP2's slice under data parallelism). Only those are read, in
    blocks of rows, and the file is opened per block: safetensors maps the whole file, and the
    pages a read touches count as this process's memory until the map is closed. So loading
    costs the local shards plus one block, not a full tensor.
    """
    from safetensors import safe_open

    def read(index):
        with safe_open(fn, framework="pt", device="cpu") as f:
            return f.get_slice(name)[index]

    with safe_open(fn, framework="pt", device="cpu") as f:
        if not f.get_slice(name).get_shape():
            dest.copy_(f.get_tensor(name))
            return
    for offsets, sizes, local in boxes:
        row = max(1, math.prod(sizes[1:]) * dest.element_size())  # bytes of one row of the box
        step = max(1, _BLOCK_BYTES // row)
        rest_src = tuple(slice(o, o + n) for o, n in zip(offsets[1:], sizes[1:]))
        rest_dst = tuple(slice(o, o + n) for o, n in zip(local[1:], sizes[1:]))
        for i in range(0, sizes[0], step):
            k = min(step, sizes[0] - i)
            dest[(slice(local[0] + i, local[0] + i + k),) + rest_dst].copy_(
                read((slice(offsets[0] + i, offsets[0] + i + k),) + rest_src))


@torch.no_grad()
def load_safetensors(model: nn.Module, path: str, strict: bool) -> list[str]:
    """Check every name and shape of the files against ``model``, then copy this rank's slices."""
    files = safetensors_files(path)
    found = read_headers(files)
    ents = entries(model)
    groups = tied_groups(ents)
    errors, plan = [], []
    for names in groups:
        t = ents[names[0]]
        src = next((n for n in names if n in found), None)
        if src is None:
            errors.append(f"missing key: {' / '.join(names)} (shape {tuple(t.shape)})")
            continue
        want, (fn, have, _) = tuple(t.shape), found[src]
        if tuple(have) != tuple(want):
            errors.append(f"size mismatch for {src}: {fn} has shape {have}, the model's logical shape is {want}")
            continue
        plan.append((src, names[0], t, fn))
    unexpected = sorted(set(found) - set(ents))
    if strict and unexpected:
        errors.append(f"unexpected keys (not in the model; strict=False ignores them): {unexpected[:20]}"
                      f"{'...' if len(unexpected) > 20 else ''}")
    if errors:
        raise TPCheckpointError(f"load_checkpoint({path!r}): nothing was loaded:\n  " + "\n  ".join(errors))
    for src, name, t, fn in plan:
        copy_local(fn, src, _local(t), local_boxes(model, name, t))
    mark_loaded(model)
    return unexpected


def save_safetensors(model: nn.Module, path: str) -> None:
    """One full ``model.safetensors`` (or ``path`` itself if it ends in ``.safetensors``), written by
    global rank 0; tied weights once, under their first name (as ``save_pretrained`` does)."""
    from safetensors.torch import save_file

    full = full_state_dict(model, rank0_only=True)
    if not dist.is_initialized() or dist.get_rank() == 0:
        ents = entries(model)
        seen, unique = set(), {}
        for k, v in full.items():
            if id(ents[k]) not in seen:
                seen.add(id(ents[k]))
                unique[k] = v.contiguous()
        fn = path if path.endswith(".safetensors") else os.path.join(path, "model.safetensors")
        os.makedirs(os.path.dirname(fn) or ".", exist_ok=True)
        save_file(unique, fn, metadata={"format": "pt"})
    if dist.is_initialized():
        dist.barrier()
