"""Small helpers shared by the passes: logical shapes, user source lines, divisors.

Shapes may be symbolic (``torch.compile(dynamic=...)``: batch and sequence dims are
``SymInt``s; the sharded dims, which come from weights, stay ints). The passes compare and
print sizes only through ``size_expr`` / ``same_size`` / ``static_size`` / ``shape_str``:
``int(s)``, ``s == t`` or ``s % tp`` on a ``SymInt`` would specialise it (a guard per size,
a recompile per sequence length) and ``{shape}`` cannot hash it at all.
"""
from __future__ import annotations

import operator
import re
from typing import Any, Callable, Sequence

import sympy
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
    return stack_fqn(list(stack.values())[-1][0])


def stack_fqn(path: str) -> str:
    """A module path of ``nn_module_stack`` (``L['self']._modules['h']._modules['0']...``) as an FQN."""
    # the root: ``self``, or the first argument of a decorated forward (``wrapper(*args, **kwargs)``: HF's)
    path = re.sub(r"^L\['self'\]|^L\['args'\]\[0\]", "", path)
    path = path.replace(".forward.__self__", "")  # through a twin module's forward (tpcompile/twin.py)
    # a twin module's class has its own ``__getattr__`` (tpcompile/eager.py): Dynamo reads submodules
    # from the instance's ``__dict__`` then
    path = path.replace(".__dict__['_modules']", "._modules")
    path = re.sub(r"\._modules\['([^']+)'\]|\[['\"]?([^\]'\"]+)['\"]?\]", lambda m: "." + (m.group(1) or m.group(2)), path)
    return path.lstrip(".")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def size_expr(s: Any) -> sympy.Expr:
    """The size as a sympy expression: the symbol's formula for a ``SymInt`` (no guard), else the integer."""
    return s.node.expr if isinstance(s, torch.SymInt) else sympy.Integer(int(s))


def numel_expr(sizes: Sequence) -> sympy.Expr:
    """The product of ``sizes`` (expanded, so ``s0*s1`` and ``s1*s0`` compare equal)."""
    out = sympy.Integer(1)
    for x in sizes:
        out = out * size_expr(x)
    return sympy.expand(out)


def same_size(a: Any, b: Any) -> bool:
    """Sizes equal for every value of their symbols (structural: adds no guard)."""
    return size_expr(a) == size_expr(b)


def same_shape(a: Sequence, b: Sequence) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def static_size(s: Any) -> int | None:
    """The size as an int if it is one for every value of the symbols, else None."""
    e = size_expr(s)
    return int(e) if e.is_Integer else None


def shape_str(sizes: Sequence) -> str:
    """``(s0, 16, 4, 16)``-style text of a shape, symbolic sizes by name (printing adds no guard)."""
    return "(" + ", ".join(str(size_expr(x)) for x in sizes) + ("," if len(sizes) == 1 else "") + ")"


def op_name(node: fx.Node) -> str:
    """What a message calls the op of ``node``: a method's name, or the function's ``__name__``."""
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def reachable(node: fx.Node, down: bool = True) -> set:
    """Every node ``node`` reaches through its users (``down``) or its inputs (not ``down``), itself excluded."""
    out, todo = set(), [node]
    while todo:
        n = todo.pop()
        for x in (n.users if down else n.all_input_nodes):
            if x not in out:
                out.add(x)
                todo.append(x)
    return out


def comes_before(a: fx.Node, b: fx.Node) -> bool:
    """True if node ``a`` stands before node ``b`` in their graph."""
    n = a.next
    while n.op != "root":
        if n is b:
            return True
        n = n.next
    return False


def inline_call(gm: fx.GraphModule, call: fx.Node, body: fx.GraphModule, operands: Sequence,
                on_copy: Callable[[fx.Node], None] | None = None) -> None:
    """Copy the body of a higher-order op ``call`` (a checkpointed block, a compiled region) into
    ``gm`` before it, in place: ``operands`` feed its placeholders, a nested body is hoisted into
    ``gm`` under a fresh name, the call's ``getitem`` users read the copied outputs, and the call
    (and its body's ``get_attr`` once unused) is erased. ``on_copy(new)`` sees each copied node."""
    g = gm.graph
    env = dict(zip([p for p in body.graph.nodes if p.op == "placeholder"], operands))
    outputs = None
    with g.inserting_before(call):
        for b in body.graph.nodes:
            if b.op == "placeholder":
                continue
            if b.op == "output":
                outputs = torch.utils._pytree.tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, b.args[0])
                break
            if b.op == "get_attr":
                name = f"{call.args[0].target}_{b.target}"
                setattr(gm, name, getattr(body, b.target))
                new = g.get_attr(name)
                new.meta.update(b.meta)
            else:
                new = g.node_copy(b, lambda a: env[a])
            env[b] = new
            if on_copy is not None:
                on_copy(new)
    for u in list(call.users):
        if u.target is not operator.getitem:
            raise NotImplementedError(f"{call.target} output used as a whole by {u.format_node()}")
        u.replace_all_uses_with(outputs[u.args[1]])
        g.erase_node(u)
    ref = call.args[0]
    g.erase_node(call)
    if not ref.users:
        g.erase_node(ref)
