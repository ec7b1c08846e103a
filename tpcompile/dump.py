"""Readable graph code and on-disk dumps of what tpcompile did (``TPCOMPILE_DUMP_DIR``).

Dynamo names parameters ``L_self_modules_h_modules_0_modules_attn_..._weight_`` and FX
prints ``x = None`` after each last use; neither helps a reader, and both make golden
files noisy. ``readable_code`` prints the same program with parameters named by FQN.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import warnings
from typing import Any

import torch.fx as fx

from tpcompile.passes.graph_utils import op_name

_FREE = re.compile(r";  (?:\w+ = )+None$", re.M)
_ANNOT = re.compile(r" ?: (?:torch\.[\w.]+|[A-Z]\w*)(?=[,)])")


def readable_code(graph: fx.Graph, names: dict[str, str]) -> str:
    """Python of ``graph`` with FQN-named parameters/buffers and no ``x = None`` clutter.

    ``names``: placeholder name -> FQN. Other placeholders (Dynamo's ``L_idx_``) lose the
    ``L_`` wrapper. Deterministic: the same graph always prints the same text.
    """
    g = fx.Graph()
    env: dict = {}
    out = g.graph_copy(graph, env)
    g.output(out)
    taken = set()
    for old in graph.nodes:
        if old.op != "placeholder":
            continue
        fqn = names.get(old.name)
        want = fqn.replace(".", "_") if fqn else re.sub(r"^[Ll]_(.*?)_?$", r"\1", old.target)
        want = re.sub(r"\W", "_", want)
        if want in taken or not want.isidentifier():
            want = f"{want}_{len(taken)}"
        taken.add(want)
        node = env[old]
        node._rename(want)
        node.target = want
    code = g.python_code("self").src
    code = _FREE.sub("", code)
    code = _ANNOT.sub("", code)
    return "\n".join(line.rstrip() for line in code.strip().splitlines()) + "\n"


def graph_dot(graph: fx.Graph, names: dict[str, str]) -> str:
    """Graphviz DOT of a rewritten graph; mapping ops (collectives) stand out in red."""
    lines = ["digraph tp {", '  node [shape=box, fontname="monospace", fontsize=10];']
    for n in graph.nodes:
        if n.op == "placeholder":
            label, style = names.get(n.name, n.name), 'style=filled, fillcolor="#eeeeee"'
        elif "tp_mapping" in n.meta or "vocab_parallel" in getattr(n.target, "__name__", ""):
            label, style = f"{n.name}\\n{getattr(n.target, '__name__', n.target)}", 'style=filled, fillcolor="#ffb3b3"'
        else:
            target = op_name(n)
            label, style = f"{n.name}\\n{target}", ""
        lines.append(f'  "{n.name}" [label="{label}" {style}];')
        for a in n.all_input_nodes:
            lines.append(f'  "{a.name}" -> "{n.name}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


_warned_no_dot = False


def dump_record(record: Any, directory: str, rank: int, index: int) -> str:
    """Write one graph record under ``directory/rank{rank}/``; returns that folder.

    Files: ``graph{i}.captured.py``, ``graph{i}.rewritten.py``, ``graph{i}.plan.json``,
    ``graph{i}.collectives.json`` (rewritten each time a forward/backward graph compiles),
    ``graph{i}.rewritten.dot`` and, when graphviz's ``dot`` is on PATH, ``.svg``.
    """
    global _warned_no_dot
    folder = os.path.join(directory, f"rank{rank}")
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, f"graph{index}")
    _write(f"{stem}.captured.py", record.original_code)
    _write(f"{stem}.rewritten.py", record.graph_code)
    plan = [dataclasses.asdict(pp) for pp in record.plan.values()]
    _write(f"{stem}.plan.json", json.dumps(plan, indent=1) + "\n")
    coll = [dataclasses.asdict(c) for c in record.collectives]
    _write(f"{stem}.collectives.json", json.dumps({"collectives": coll, "floor": record.floor}, indent=1) + "\n")
    dot_path = f"{stem}.rewritten.dot"
    if record.rewritten is not None and not os.path.exists(dot_path):
        _write(dot_path, graph_dot(record.rewritten.graph, record.names))
        if shutil.which("dot"):
            subprocess.run(["dot", "-Tsvg", dot_path, "-o", f"{stem}.rewritten.svg"], check=False)
        elif not _warned_no_dot:
            _warned_no_dot = True
            warnings.warn(
                f"tpcompile: graphviz `dot` is not installed, so no SVG was drawn; the graph is in {dot_path} "
                f"(render it with `dot -Tsvg {dot_path} -o graph.svg` after `apt install graphviz`).",
                stacklevel=2,
            )
    return folder


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
