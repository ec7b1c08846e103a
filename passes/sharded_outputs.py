"""Keep sharded graph outputs sharded: drop the all-gathers that make them whole at the end.

A graph's outputs must normally be whole (the caller sees plain tensors), so the rewrite
gathers a sharded output at the end. For Hugging Face models that output is the logits,
``[B, T, V]``: the biggest collective of the step and a whole-vocabulary buffer per rank,
although training reads only ``.loss`` (computed inside, from the sharded logits). With
``tp_compile(sharded_outputs=True)`` the backend returns such outputs as DTensors instead
(``Shard(dim)``; ``.full_tensor()`` gathers on demand).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from tpcompile.runtime import mappings as M

from .graph_utils import same_shape, shape, static_size, value
from .rewrite import gather_padded_from_tp, gather_pieces_from_tp

_GATHERS = (M.gather_from_tp, gather_padded_from_tp)
_STATE_GATHERS = (*_GATHERS, gather_pieces_from_tp)  # a state's placement travels with its ghost (kv-head copies too)


def keep_outputs_sharded(gm: fx.GraphModule) -> dict[int, tuple[int, int]]:
    """Return the local shard instead of the gathered value for each output that is only an
    end-of-graph gather (in place); ``{output index: (dim, logical size of dim)}``."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    vals = list(out.args[0]) if isinstance(out.args[0], (tuple, list)) else None
    kept: dict = {}
    if vals is None:
        return kept
    gathers = set()
    for i, v in enumerate(vals):
        if isinstance(v, fx.Node) and v.target in _GATHERS and list(v.users) == [out]:
            dim = v.args[2] % value(v).dim()
            full = static_size(value(v).shape[dim])  # a vocabulary or hidden dim: from a weight, static
            if full is None:
                continue
            vals[i], kept[i] = v.args[0], (dim, full)
            gathers.add(v)
    _drop_gathers(gm, out, vals, gathers)
    return kept


def _drop_gathers(gm: fx.GraphModule, out: fx.Node, vals: list, gathers) -> None:
    """The output node returns ``vals`` (shards in place of the end-of-graph ``gathers``, erased)."""
    if gathers:
        out.args = (type(out.args[0])(vals),)
        for v in gathers:
            gm.graph.erase_node(v)
        gm.recompile()


def _is_state(node: fx.Node, state: set, info: dict) -> bool:
    """A KV cache: ``cat([past, new])`` onto a state input or onto nothing (``torch.tensor([])``, a
    fresh dynamic cache), or a buffer created sharded for an in-place writer (a static cache's
    ``torch.zeros``, ``propagate.index_copy``), or ``index_copy_`` into either."""
    if node in state or (node in info and info[node].kind == "shard_buffer"):
        return True
    if node.op == "call_method" and node.target in ("index_copy_", "index_copy"):
        return _is_state(node.args[0], state, info)
    if node.op != "call_function" or node.target is not torch.cat or not node.args[0]:
        return False
    first = node.args[0][0]
    return isinstance(first, fx.Node) and (first in state or same_shape(shape(first), (0,)))


def keep_state_sharded(gm: fx.GraphModule, state: set, info: dict) -> dict[int, tuple]:
    """Return this rank's shard instead of the gathered value for each output that is sharded
    state (a KV cache: ``_appends_to_state``), in place; ``{output index: (placement, logical
    sizes of the output)}``; ``info``: the propagation's node -> NodeInfo. The backend hands those out as state ghosts (``tpcompile.twin``)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    vals = list(out.args[0]) if isinstance(out.args[0], (tuple, list)) else None
    kept: dict = {}
    if vals is None:
        return kept
    gathers = []
    for i, v in enumerate(vals):
        if isinstance(v, fx.Node) and v.target in _STATE_GATHERS and list(v.users) == [out] \
                and v.args[0] in info and _is_state(v.args[0], state, info):
            vals[i], kept[i] = v.args[0], (info[v.args[0]].out, tuple(value(v).shape))
            gathers.append(v)
    _drop_gathers(gm, out, vals, gathers)
    return kept
