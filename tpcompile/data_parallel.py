"""Data parallelism around a tp-compiled model, through FSDP2, the way users already write it.

The parameters of a tp-compiled model are DTensors on the TP slice of the user's mesh, so
FSDP2 composes with them as with any DTensor TP (``fully_shard(block, mesh=mesh["dp"])`` on
each block, then on the model: 2-D parameters, TP inside, FSDP across). ``tp_compile(model,
mesh=mesh)`` does that itself: it finds the repeated blocks in the module tree and applies

- ``"dp"`` or ``"dp_shard"``: FSDP2 (parameters, gradients and optimizer state sharded),
- ``"dp_replicate"`` and ``"dp_shard"``: HSDP (FSDP2 on the 2-D data-parallel mesh),
- ``"dp_replicate"`` alone: replicated data parallelism (DDP semantics) through FSDP2's
  ``replicate``, which holds DTensor parameters.

``torch.nn.parallel.DistributedDataParallel`` cannot: its C++ reducer flattens each
parameter's storage into buckets, and a DTensor has none of its own (torch's own TP+DDP path,
``device_mesh=``, turns the parameters back into plain local tensors, under which
``clip_grad_norm_`` silently returns a local norm). Wrapping a tp-compiled model in it
raises a ``TPParameterError`` that says what to use instead.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from tpcompile.errors import TPParameterError

DP_DIMS = ("dp", "dp_replicate", "dp_shard")


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``model``: the children of its largest ``ModuleList`` whose modules
    are all of one class (a transformer's decoder layers), found from the module tree."""
    best: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > len(best) and len({type(c) for c in m}) == 1:
            best = list(m)
    return best


def data_parallel_mesh(mesh) -> tuple[Any, str]:
    """(the data-parallel part of ``mesh``, "shard" | "hsdp" | "replicate"), or (None, "") without one."""
    names = tuple(mesh.mesh_dim_names or ())
    dims = [d for d in DP_DIMS if d in names]
    if "dp" in dims and len(dims) > 1:
        raise ValueError(f"tp_compile(mesh=...): name the data-parallel dims either 'dp' or 'dp_replicate'/'dp_shard', "
                         f"not both (mesh dims {names}).")
    if not dims:
        return None, ""
    if dims == ["dp_replicate"]:
        return mesh["dp_replicate"], "replicate"
    if set(dims) == {"dp_replicate", "dp_shard"}:
        return mesh["dp_replicate", "dp_shard"], "hsdp"
    return mesh[dims[0]], "shard"


def apply_data_parallel(model: nn.Module, mesh) -> str:
    """FSDP2 (or HSDP, or replicate) on each repeated block of ``model`` and then on ``model``."""
    dp_mesh, kind = data_parallel_mesh(mesh)
    if dp_mesh is None:
        return ""
    if kind == "replicate":
        from torch.distributed._composable.replicate_with_fsdp import replicate as wrap
    else:
        from torch.distributed.fsdp import fully_shard as wrap
    for block in find_blocks(model):
        wrap(block, mesh=dp_mesh)
    wrap(model, mesh=dp_mesh)
    return kind


def refuse_ddp() -> None:
    """Make ``DistributedDataParallel(tp_model, ...)`` fail with a message that says what to use.

    DDP's constructor broadcasts the parameters with ``c10d.broadcast_``, which DTensor has no
    rule for; the handler below replaces DTensor's ``NotImplementedError`` for a tp-compiled
    model's parameters only."""
    import torch
    from torch.distributed.tensor import DTensor

    handlers = DTensor._op_dispatcher._custom_op_handlers
    op = torch.ops.c10d.broadcast_.default
    if op in handlers:
        return

    def broadcast(op_call, args, kwargs):
        from tpcompile.params import on_tp_mesh

        tensors = args[0] if args and isinstance(args[0], (list, tuple)) else []
        if any(on_tp_mesh(t) for t in tensors):
            raise TPParameterError(
                "DistributedDataParallel cannot hold a tp-compiled model: its reducer flattens each parameter's "
                "storage, and tensor-parallel parameters are DTensors. For data parallelism use "
                "tp_compile(model, mesh=mesh, example_inputs=batch) with a 'dp' / 'dp_shard' / 'dp_replicate' mesh "
                "dim, or FSDP2 yourself: fully_shard(block, mesh=mesh['dp']) per block, then fully_shard(model, "
                "mesh=mesh['dp']) (replicate() from torch.distributed._composable.replicate_with_fsdp for DDP "
                "semantics). See the README's data-parallel section."
            )
        raise NotImplementedError(f"Operator {op_call} does not have a sharding strategy registered.")

    handlers[op] = broadcast
