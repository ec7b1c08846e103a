"""DCP checkpoints: every rank writes its own shards; loads reshard to any (dp, tp) or to one device.

The model's state dict holds its parameters as DTensors of their logical shape (TP, or
FSDP2 / HSDP over TP), so ``torch.distributed.checkpoint`` reshards them on load; fused pieces
and FSDP2's shards of TP shards carry DCP hooks with their true boxes (``state_dict.dcp_boxes``).
Optimizer state is keyed by parameter FQN, its per-element tensors as DTensors like their parameters.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from tpcompile.errors import TPCheckpointError

from .state_dict import dcp_boxes, entries, layout_of, optim_fqns, optim_state_dict, part_of


def is_dcp(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ".metadata"))


def save_dcp(model: nn.Module, path: str, optimizer: torch.optim.Optimizer | None = None) -> None:
    import torch.distributed.checkpoint as dcp

    sd: dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        sd["optim"] = optim_state_dict(model, optimizer)
    dcp.save(sd, checkpoint_id=path, no_dist=not dist.is_initialized())


def load_dcp(model: nn.Module, path: str, strict: bool, optimizer: torch.optim.Optimizer | None = None) -> None:
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(path)
    check_dcp_keys(model, path, reader, strict)
    groups = saved_param_groups(model, optimizer, path, reader) if optimizer is not None else None
    sd = {"model": model.state_dict()}
    dcp.load(sd, checkpoint_id=path)
    model.load_state_dict(sd["model"], strict=strict)
    if optimizer is not None:
        load_optimizer(model, optimizer, path, reader, groups)


def saved_param_groups(model: nn.Module, optimizer: torch.optim.Optimizer, path: str, reader) -> list:
    """The saved ``param_groups``, checked against ``optimizer`` before anything is loaded."""
    import torch.distributed.checkpoint as dcp

    if "optim.param_groups" not in reader.read_metadata().state_dict_metadata:
        raise TPCheckpointError(f"{path}: holds no optimizer state (saved without save_checkpoint(optimizer=...))")
    sd = {"optim": {"param_groups": ""}}
    dcp.load(sd, checkpoint_id=path)
    groups = json.loads(sd["optim"]["param_groups"])
    names = optim_fqns(model)
    if [g["params"] for g in groups] != [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]:
        raise TPCheckpointError(f"{path}: the optimizer's parameter groups (by FQN) differ from the saved ones; "
                                f"nothing was loaded.")
    return groups


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, path: str, reader, groups) -> None:
    """Optimizer state resharded to this rank: targets like each parameter, from the checkpoint's metadata."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = reader.read_metadata().state_dict_metadata
    names = optim_fqns(model)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    target: dict[str, Any] = {}
    for p in params:
        fqn = names[id(p)]
        pre = f"optim.state.{fqn}."
        for key, m in md.items():
            if not key.startswith(pre) or "." in key[len(pre):]:
                continue
            if isinstance(m, TensorStorageMetadata) and tuple(m.size) == tuple(p.shape) and len(m.size):
                v = torch.zeros_like(p, dtype=m.properties.dtype).detach()  # a DTensor like the parameter
                pp = layout_of(model, fqn)
                part = part_of(model, v, pp) if pp is not None else None
                if part is not None:
                    dcp_boxes(v, pp, part)
            elif isinstance(m, TensorStorageMetadata):
                v = torch.zeros(tuple(m.size), dtype=m.properties.dtype, device="cpu")
            else:
                v = None
            target.setdefault(fqn, {})[key[len(pre):]] = v
    sd = {"optim": {"state": target}}
    dcp.load(sd, checkpoint_id=path)
    for p in params:
        s = sd["optim"]["state"].get(names[id(p)])
        if s:
            optimizer.state[p] = dict(s)
    for g, saved in zip(optimizer.param_groups, groups):
        g.update({k: tuple(v) if isinstance(g.get(k), tuple) else v for k, v in saved.items() if k != "params"})


def check_dcp_keys(model: nn.Module, path: str, reader, strict: bool) -> None:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = reader.read_metadata().state_dict_metadata
    saved = {k[len("model."):]: m for k, m in md.items() if k.startswith("model.")}
    ents = entries(model)
    errors = []
    for name, t in ents.items():
        m = saved.get(name)
        if m is None:
            errors.append(f"missing key: {name}")
        elif isinstance(m, TensorStorageMetadata) and tuple(m.size) != tuple(t.shape):
            errors.append(f"size mismatch for {name}: saved {tuple(m.size)}, model {tuple(t.shape)}")
    unexpected = sorted(set(saved) - set(ents))
    if strict and unexpected:
        errors.append(f"unexpected keys: {unexpected[:20]}")
    if errors:
        raise TPCheckpointError(f"load_checkpoint({path!r}): nothing was loaded:\n  " + "\n  ".join(errors))
