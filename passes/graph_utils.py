"""Small helpers shared by the passes: logical shapes, user source lines, divisors."""
from __future__ import annotations

import re
from typing import Any

import torch
import torch.fx as fx

_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')
_OURS = re.compile(r"tpcompile/twin\.py$")  # the twin's forwards: never the user's line


def value(node: Any) -> Any:
    """The fake value Dynamo recorded for ``node`` (logical shapes), or None."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def is_tensor(node: Any) -> bool:
    return isinstance(value(node), torch.Tensor)


def shape(node: fx.Node) -> tuple:
    return tuple(value(node).shape)


def source_line(node: fx.Node) -> str:
    """``file:line (code)`` of the user's code that made ``node``, for warnings and errors."""
    frames = [f for f in _FRAME.findall(node.meta.get("stack_trace") or "") if not _OURS.search(f[0])]
    if not frames:
        return f"node {node.name}"
    path, line, _fn, code = frames[-1]
    short = "/".join(path.split("/")[-2:])
    return f"{short}:{line} `{code.strip()}`"


def module_path(node: fx.Node) -> str:
    """FQN of the innermost user module ``node`` ran in ("" for the top module).

    Backward nodes carry their forward node's stack as ``fwd_nn_module_stack``.
    """
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['self'\]", "", path)
    path = path.replace(".forward.__self__", "")  # through a twin module's forward (tpcompile/twin.py)
    path = re.sub(r"\._modules\['([^']+)'\]|\[['\"]?([^\]'\"]+)['\"]?\]", lambda m: "." + (m.group(1) or m.group(2)), path)
    return path.lstrip(".")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d
