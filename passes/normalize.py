"""Normalize: fold the many spellings of one computation into one canonical op.

The placement rules then need one entry per op family. Linear: ``F.linear``,
``torch._C._nn.linear``, ``x @ W.t()`` and ``torch.matmul(x, W.t())`` with a 2-D
parameter ``W`` all become ``torch._C._nn.linear(x, W, b)``; a following ``+ b`` with a
1-D parameter is folded in as the bias. SDPA spellings become the ``torch._C._nn`` one.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

LINEAR = torch._C._nn.linear
SDPA = torch._C._nn.scaled_dot_product_attention

_LINEAR_SPELLINGS = {F.linear, torch.nn.functional.linear, LINEAR}
_MATMULS = {operator.matmul, torch.matmul, "matmul"}
_TRANSPOSES = {"t", torch.t}


def _target(node: fx.Node):
    return node.target if node.op in ("call_function", "call_method") else None


def _transposed_param(node, params: set) -> fx.Node | None:
    """``W`` if ``node`` is ``W.t()`` / ``W.T`` / ``W.transpose(0, 1)`` of a 2-D parameter."""
    if not isinstance(node, fx.Node):
        return None
    t = _target(node)
    if t in _TRANSPOSES or (t in ("transpose", torch.transpose) and set(node.args[1:3]) in ({0, 1}, {-2, -1}, {0, -1}, {-2, 1})):
        src = node.args[0]
    elif node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT"):
        src = node.args[0]
    else:
        return None
    return src if src in params else None


def normalize(gm: fx.GraphModule, params: set[fx.Node]) -> fx.GraphModule:
    """Rewrite ``gm`` in place to canonical ops; ``params`` are the parameter placeholders."""
    g = gm.graph
    for node in list(g.nodes):
        t = _target(node)
        if t in _LINEAR_SPELLINGS and t is not LINEAR:
            node.target = LINEAR
        elif t is F.scaled_dot_product_attention:
            node.target = SDPA
        elif t in _MATMULS and len(node.args) == 2:
            w = _transposed_param(node.args[1], params)
            if w is not None:
                node.op, node.target = "call_function", LINEAR
                node.args, node.kwargs = (node.args[0], w, None), {}
    # fold `linear(x, W) + b` (b a 1-D parameter) into the linear's bias
    for node in list(g.nodes):
        if _target(node) in (operator.add, torch.add, "add") and len(node.args) == 2 and not node.kwargs:
            lin, b = node.args
            if b in params and _target(lin) is LINEAR and len(lin.users) == 1 and (len(lin.args) < 3 or lin.args[2] is None):
                bias_val = b.meta.get("example_value")
                if bias_val is not None and bias_val.dim() == 1:
                    lin.args = (lin.args[0], lin.args[1], b)
                    node.replace_all_uses_with(lin)
                    g.erase_node(node)
    for node in list(g.nodes):  # transposes left dead by the linear rewrite
        if node.op in ("call_method", "call_function") and not node.users and _transposed_param(node, params) is not None:
            g.erase_node(node)
    gm.recompile()
    return gm
