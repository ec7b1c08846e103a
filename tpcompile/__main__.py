"""``python -m tpcompile explain path/to/file.py:factory [ARG ...] --world-size 8 [--rank 3] [--dump DIR]``

The factory is any function returning ``(model, example_args)`` (or ``(model, args, kwargs)``);
``path.py:fn`` loads a file, ``package.module:fn`` imports a module. ``ARG``s are passed to it
(``VALUE`` or ``NAME=VALUE``, Python literals, else strings), and a factory that returns just a
model gets random inputs of the ``--input`` shapes, so a library's own one serves:
``python -m tpcompile explain timm:create_model vit_large_patch16_224 device=meta --input 2x3x224x224 --world-size 8``.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
import sys
from typing import Callable


def load_factory(spec: str) -> Callable:
    """``file.py:fn`` or ``module:fn`` -> the function."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise SystemExit(f"tpcompile: expected FILE.py:FACTORY or MODULE:FACTORY, got {spec!r}")
    if where.endswith(".py") or os.sep in where:
        path = os.path.abspath(where)
        if not os.path.exists(path):
            raise SystemExit(f"tpcompile: no such file: {where}")
        sys.path.insert(0, os.path.dirname(path))  # so the file's own sibling imports work
        mod_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_spec.name] = module
        mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise SystemExit(f"tpcompile: {where} has no function {name!r}")
    return fn


def factory_call(args: list[str]) -> tuple[list, dict]:
    """``["vit_base_patch16_224", "depth=2", "device=meta"]`` -> positional and keyword arguments."""
    pos, kw = [], {}
    for a in args:
        name, eq, text = a.partition("=")
        if eq and name.isidentifier():
            kw[name] = _literal(text)
        else:
            pos.append(_literal(a))
    return pos, kw


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"tpcompile: --input takes a shape like 2x3x224x224, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tpcompile")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("explain", help="show the TP plan, collectives and rewritten graph of one rank")
    ex.add_argument("factory", help="FILE.py:FACTORY or MODULE:FACTORY returning (model, example_args) or a model")
    ex.add_argument("factory_args", nargs="*", metavar="ARG",
                    help="arguments for the factory: VALUE or NAME=VALUE (Python literals, else strings)")
    ex.add_argument("--input", action="append", default=[], metavar="SHAPE", type=_shape,
                    help="for a factory that returns just a model: a random float input of this shape, "
                         "e.g. 2x3x224x224 (repeatable, in argument order)")
    ex.add_argument("--world-size", type=int, required=True)
    ex.add_argument("--rank", type=int, default=0)
    ex.add_argument("--sequence-parallel", action="store_true")
    ex.add_argument("--dump", metavar="DIR", help="write graphs, plan, collectives (JSON) and a picture to DIR")
    ex.add_argument("--graph", action="store_true", help="also print the rewritten graph code")
    ex.add_argument("--replicate", action="append", default=[], metavar="FQN",
                    help="keep these parameters/modules replicated (globs allowed; repeatable)")
    ex.add_argument("--whole-graph", action="store_true",
                    help="regional=False: every layer in one graph (the default compiles a repeated block once)")
    args = parser.parse_args(argv)

    import torch

    import tpcompile
    from tpcompile.compat import torchvision_without_kernels

    torchvision_without_kernels()  # explain runs on CPU: let timm & co. import beside a CUDA torchvision
    pos, kw = factory_call(args.factory_args)
    made = load_factory(args.factory)(*pos, **kw)
    if isinstance(made, torch.nn.Module):
        if not args.input:
            raise SystemExit("tpcompile: the factory returned a model without inputs: give their shapes "
                             "with --input (e.g. --input 2x3x224x224), or return (model, example_args)")
        made = (made, tuple(torch.randn(s) for s in args.input))
    elif args.input:
        raise SystemExit("tpcompile: --input is for a factory that returns just a model; this one returns its inputs")
    if not isinstance(made, tuple) or len(made) not in (2, 3):
        raise SystemExit("tpcompile: the factory must return (model, example_args), (model, args, kwargs) or a model")
    model, margs, mkwargs = (*made, {}) if len(made) == 2 else made
    if not isinstance(margs, (tuple, list)):
        margs = (margs,)
    rep = tpcompile.explain(
        model, *margs, world_size=args.world_size, rank=args.rank, sequence_parallel=args.sequence_parallel,
        plan={p: "replicate" for p in args.replicate} or None, dump_dir=args.dump,
        regional=False if args.whole_graph else None, **mkwargs,
    )
    print(rep)
    if args.graph:
        print("\nrewritten graph:\n" + rep.graph_code)
    if args.dump:
        print(f"\nwrote {os.path.join(args.dump, f'rank{args.rank}')}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
