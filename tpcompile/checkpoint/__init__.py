"""Checkpoints for tp-compiled models: meta-device init, per-rank safetensors slices, DTensor state dicts.

Everything here speaks the *single-device* names and shapes (docs/checkpoints.md):

- ``model.state_dict()`` of a tp-compiled model holds its parameters as ``DTensor``s of their
  logical shape (``Shard(dim)``, or ``_StridedShard`` for fused projections), so
  ``torch.distributed.checkpoint`` saves, loads and reshards them (``state_dict``);
  ``load_state_dict`` takes those DTensors or plain full tensors;
- ``load_checkpoint`` reads only this rank's slice of each tensor from safetensors files
  (``safetensors_io``), or a DCP directory (``dcp``), after checking every name and shape;
- ``prepare`` (called by ``tp_compile``) plans the model on example inputs before the first
  call, so a model built on the ``meta`` device gets only its local shards (``meta_init``).
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from tpcompile.errors import TPCheckpointError

from . import safetensors_io
from .dcp import is_dcp, load_dcp, save_dcp
from .meta_init import prepare, require_plan, reset_parameters
from .safetensors_io import load_safetensors, mark_loaded, save_safetensors
from .state_dict import (full_optim_state_dict, full_state_dict, install_state_dict_hooks,
                         optim_state_dict)


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
    require_plan(model, "load_checkpoint")
    if is_dcp(path):
        load_dcp(model, path, strict, optimizer)
        mark_loaded(model)
        return
    if optimizer is not None:
        raise ValueError("load_checkpoint(optimizer=...) needs a DCP checkpoint (save_checkpoint(format='dcp'))")
    load_safetensors(model, path, strict)


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *, format: str = "dcp",
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """Save ``model`` (and ``optimizer``) with single-device names and logical shapes.

    ``format="dcp"``: ``torch.distributed.checkpoint`` directory, every rank writes its own
    shards (``{"model": ..., "optim": ...}``); loads at any (dp, tp), including a plain model.
    ``format="safetensors"``: one full ``model.safetensors`` (or ``path`` itself if it ends in
    ``.safetensors``), gathered to and written by global rank 0; tied weights once.
    """
    path = os.fspath(path)
    if format == "dcp":
        save_dcp(model, path, optimizer)
        return
    if format != "safetensors":
        raise ValueError(f"save_checkpoint(format={format!r}): use 'dcp' or 'safetensors'")
    if optimizer is not None:
        raise ValueError("save_checkpoint(format='safetensors') holds no optimizer state; use format='dcp'")
    save_safetensors(model, path)


__all__ = [
    "TPCheckpointError",
    "full_state_dict",
    "full_optim_state_dict",
    "load_checkpoint",
    "save_checkpoint",
    "optim_state_dict",
    "reset_parameters",
    "prepare",
    "install_state_dict_hooks",
    "safetensors_io",
]
