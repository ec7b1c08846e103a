"""Fuse each row-parallel reduction with the residual add and RMSNorm after it (Megatron's inference layers).

After a row-parallel linear a TP graph computes, on the whole residual stream,

    r = reduce(partial)          # reduce_from_tp (all-reduce), or reduce_scatter_to_sp with SP
    h = residual + r             # the new residual stream
    n = rms_norm(h) * w          # the next block's norm, any spelling ``propagate.rms_norm_of`` knows
    x = f(n) / gather_from_sp(n) # the next column-parallel input (or a replicated consumer)

and this pass replaces ``reduce -> add -> norm`` (and, with SP, the all-gather after it) by one
``tpcompile::reduce_add_rms_norm`` (``runtime/fused_norm.py``) returning ``(n, h)``: the same
collectives (one all-reduce; or one reduce-scatter + one all-gather), one op for the rest. Without SP
Megatron's f stays after the op (identity forward). Runs after ``rewrite`` and ``sequence_parallel``;
pure (graph in, graph out, and the list of what it fused). Patterns it does not recognise (a
row-parallel bias between the reduction and the add, a LayerNorm, a norm value read elsewhere) stay
as they are: correct, unfused.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from tpcompile.runtime import mappings as M
from tpcompile.runtime import fused_norm as _registers_the_op  # noqa: F401  (tpcompile::reduce_add_rms_norm)

from .graph_utils import comes_before, same_shape, shape, source_line, value
from .normalize import LINEARS
from .propagate import RMSNormCall, op_class, rms_norm_of
from .rewrite import _inherit_meta

FUSED_OP = torch.ops.tpcompile.reduce_add_rms_norm.default
_ADDS = (operator.add, torch.add, "add")


@dataclass
class FusedNorm:
    """One fusion: where (the residual add's source line), and which form."""

    source: str
    sequence_parallel: bool
    norm: str  # "torch.rms_norm" or the hand-written tail ("cw": cast then weight, ...)


def _residual_add(red: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(h, residual)`` if the reduction's only user is ``h = residual + red`` (no broadcasting)."""
    if len(red.users) != 1:
        return None
    h = next(iter(red.users))
    if h.op != "call_function" and h.op != "call_method" or h.target not in _ADDS or h.kwargs or len(h.args) != 2:
        return None
    res = h.args[1] if h.args[0] is red else h.args[0] if h.args[1] is red else None
    if not isinstance(res, fx.Node) or res is red or not same_shape(shape(res), shape(h)) \
            or value(res).dtype != value(h).dtype or not same_shape(shape(red), shape(h)):
        return None
    return h, res


def fuse_norms(gm: fx.GraphModule, group: str, needs_backward: bool = True) -> list[FusedNorm]:
    """Replace every ``row-parallel reduction -> residual add -> RMSNorm -> column input`` of ``gm``
    (in place) by the fused op; returns what it fused. ``needs_backward``: the graph is trained, so
    only an SP norm read by one ``gather_from_sp`` is fused (a ``gather_from_tp`` beside it has
    another backward: a split of a whole gradient, where the op's is a reduce-scatter of a partial one)."""
    g = gm.graph
    done = []
    for red in [n for n in g.nodes if n.op == "call_function" and n.target in (M.reduce_from_tp, M.reduce_scatter_to_sp)
                and isinstance(n.args[0], fx.Node) and n.args[0].target in LINEARS]:
        found = _residual_add(red)
        norm = rms_norm_of(found[0]) if found else None
        if norm is None:
            continue
        h, res = found
        sp = red.target is M.reduce_scatter_to_sp
        if sp:  # the normed shard only goes to all-gathers over the tokens (into the next column-parallel
            # linears, or whole to replicated ones: MQA's k/v); in the forward they are one all-gather
            outs = list(norm.out.users)
            kinds = (M.gather_from_sp,) if needs_backward else (M.gather_from_sp, M.gather_from_tp)
            if not outs or any(u.target not in kinds or u.args[2] != red.args[2] for u in outs) \
                    or needs_backward and len(outs) != 1:
                continue
        else:  # whatever reads the norm (Megatron's f of the next column-parallel input, a replicated head)
            outs = [norm.out]
        if not _place_weight(norm, h):
            continue
        done.append(_fuse(g, red, h, res, norm, outs, group, red.args[2] if sp else None))
    if done:
        g.lint()
        gm.recompile()
    return done


def _place_weight(norm: RMSNormCall, h: fx.Node) -> bool:
    """The norm weight must be defined before ``h`` (where the fused op goes): a parameter is; the
    ops on it alone (``copy_to_tp(w)``, SP's gradient all-reduce; ``1 + w.float()``) are moved up."""
    return _hoist(norm.weight, h) if norm.weight is not None else True


def _hoist(x: fx.Node, h: fx.Node) -> bool:
    """Move ``x`` and what it needs before ``h`` if it is a cast / pointwise / f chain on values
    defined before ``h``; False (nothing moved) otherwise."""
    if comes_before(x, h):
        return True
    chain, todo = [], [x]
    while todo:
        n = todo.pop()
        if n is h or n.op != "call_function" and n.op != "call_method" or not (
                n.target is M.copy_to_tp or op_class(n) in ("cast", "pointwise")):
            return False
        chain.append(n)
        todo += [i for i in n.all_input_nodes if not comes_before(i, h) and i not in chain]
    for n in [n for n in h.graph.nodes if n in set(chain)]:  # graph order
        h.prepend(n)
    return True


def _fuse(g: fx.Graph, red, h, res, norm: RMSNormCall, outs: list, group: str, sp_dim) -> FusedNorm:
    partial = red.args[0]
    f = norm.form
    form = (partial, res, norm.weight, group, sp_dim, f.eps, f.aten, f.upcast, f.tail, f.offset, f.weight_upcast)
    with g.inserting_before(h):
        fused = g.call_function(FUSED_OP, form)
        normed = g.call_function(operator.getitem, (fused, 0))
        stream = g.call_function(operator.getitem, (fused, 1))
    for n in (fused, normed, stream):
        _inherit_meta(n, h)
    fused.meta["tp_mapping"] = normed.meta["tp_mapping"] = "reduce_add_rms_norm"
    normed.meta["example_value"], stream.meta["example_value"] = value(norm.out), value(h)
    fused.meta["example_value"] = (value(norm.out), value(h))
    inside = set(norm.nodes)
    for out in outs:
        out.replace_all_uses_with(normed)
    h.replace_all_uses_with(stream, delete_user_cb=lambda u: u not in inside)
    for n in [o for o in outs if o is not norm.out] + list(reversed(norm.nodes)) + [h, red]:
        g.erase_node(n)
    for n in norm.weight_nodes:  # ``1 + w.float()``: computed inside the op now
        if not n.users:
            g.erase_node(n)
    return FusedNorm(source_line(h), sp_dim is not None, "torch.rms_norm" if norm.form.aten else norm.form.tail)


__all__ = ["fuse_norms", "FusedNorm", "FUSED_OP"]
