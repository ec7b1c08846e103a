"""Normalize: fold the many spellings of one computation into one canonical op.

The placement rules then need one entry per op family. Linear: ``F.linear``,
``torch._C._nn.linear``, ``x @ W.t()`` and ``torch.matmul(x, W.t())`` with a 2-D
parameter ``W`` all become ``torch._C._nn.linear(x, W, b)``; ``torch.matmul(x, W)``, ``x @ W``
and ``torch.addmm(b, x, W)`` (a weight stored ``[in, out]``, HF ``Conv1D``) become
``linear_in_out(x, W, b)``; a following ``+ b`` with a 1-D parameter is folded in as the bias. SDPA spellings become the ``torch._C._nn`` one.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

LINEAR = torch._C._nn.linear


def linear_in_out(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight + bias`` with ``weight`` stored ``[in, out]`` (HF ``Conv1D``, ``torch.matmul(x, W)``).

    One canonical op for that layout, so the placement rules see out-features on weight dim 1.
    """
    return torch.nn.functional.linear(x, weight.t(), bias)


LINEAR_IO = linear_in_out
LINEARS = (LINEAR, LINEAR_IO)


def weight_out_dim(node: fx.Node) -> int:
    """Which dim of a canonical linear's weight holds the out-features (0 for ``[out, in]``)."""
    return 1 if node.target is LINEAR_IO else 0


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


def _param_2d(node, params: set) -> bool:
    return node in params and _ndim(node) == 2


def _ndim(node) -> int:
    v = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    return v.dim() if isinstance(v, torch.Tensor) else -1


def _is_bias(node, params: set) -> bool:
    return node in params and _ndim(node) == 1


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
            elif _param_2d(node.args[1], params) and _ndim(node.args[0]) >= 1:
                node.op, node.target = "call_function", LINEAR_IO
                node.args, node.kwargs = (node.args[0], node.args[1], None), {}
        elif t in (torch.addmm, "addmm") and len(node.args) == 3 and _param_2d(node.args[2], params) \
                and node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1 and _is_bias(node.args[0], params):
            b, x, w = node.args  # HF Conv1D: addmm(bias, x.view(-1, in), W[in, out])
            node.op, node.target = "call_function", LINEAR_IO
            node.args, node.kwargs = (x, w, b), {}
    # fold `linear(x, W) + b` (b a 1-D parameter) into the linear's bias
    for node in list(g.nodes):
        if _target(node) in (operator.add, torch.add, "add") and len(node.args) == 2 and not node.kwargs:
            lin, b = node.args
            if b in params and _target(lin) in LINEARS and len(lin.users) == 1 and (len(lin.args) < 3 or lin.args[2] is None):
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
