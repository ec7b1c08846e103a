"""Code that Dynamo runs eagerly reads real parameters: right, slower.

Dynamo traces the ghost twin (``tpcompile.twin``), whose parameters own no memory (NaN). Some
code is not traced but run as it is, on the twin: a ``torch._dynamo.disable``d function, a frame
Dynamo cannot resume after a graph break (one inside a loop, or inside a ``with`` of a user
context manager), ``torch.utils.checkpoint``'s eager path and its recompute in the backward,
every frame past Dynamo's recompile limit. Such code reaches a parameter through its module
(``self.weight``, ``self.wte.weight.T``): ``nn.Module.__getattr__``. Every twin module's class is
a subclass of its own with ``EagerReads`` first, whose ``__getattr__`` answers an untraced read of
a ghost with the parameter's full value, gathered from this rank's DTensor parameter. The gather
is differentiable: the gradient of the full value comes back as this rank's shard of it (every
rank computes the same full gradient, so no reduction). Traced reads are unchanged (the branch
is dead under ``torch.compiler.is_compiling()``), so compiled graphs and their collectives are
the same as without this module.

The cost: each read all-gathers the whole parameter on every rank, the op runs unsharded, and
autograd may hold the full value until the backward. ``EagerLog`` says so once per frame, with
the frame, the parameters, the bytes and Dynamo's graph-break reasons.
"""
from __future__ import annotations

import os
import sys
import warnings
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from torch.distributed.tensor import DTensor
from torch.utils.weak import WeakIdKeyDictionary

from tpcompile.errors import TPEagerFallbackError, TPWarning

_OWNERS = WeakIdKeyDictionary()  # ghost -> (weakref to EagerParams, fqn)


class EagerReads:
    """First base of every twin module's class: an untraced read of a ghost parameter returns its
    real full value (``real_value``). ``nn.Module.__getattr__`` is only reached for parameters,
    buffers and submodules, so other attribute reads cost nothing."""

    def __getattr__(self, name: str):
        value = super().__getattr__(name)
        if torch.compiler.is_compiling() or not isinstance(value, nn.Parameter):  # ghosts are Parameters
            return value
        return real_value(value, sys._getframe(1))


_CLASSES: dict[type, type] = {}


def eager_class(cls: type) -> type:
    """``cls`` with ``EagerReads`` first (one per class, same name): what a twin module becomes."""
    if issubclass(cls, EagerReads):
        return cls
    out = _CLASSES.get(cls)
    if out is None:
        out = _CLASSES[cls] = type(cls.__name__, (EagerReads, cls), {"__module__": cls.__module__,
                                                                     "__qualname__": cls.__qualname__})
    return out


@dataclass
class _Frame:
    where: str
    fqns: dict = field(default_factory=dict)  # fqn -> bytes gathered per read


@dataclass
class EagerLog:
    """The eagerly-run frames that read parameters, for one tp-compiled model: one ``TPWarning``
    per frame, the first time it is seen (``flush``, after each call)."""

    frames: dict = field(default_factory=dict)  # code object -> _Frame
    new: list = field(default_factory=list)  # frames not warned about yet
    gathered: list = field(default_factory=list)  # (a full value handed out, or a weakref to it; version, fqn, code)
    hint: str = ""  # a model-specific way out, appended to each warning (tpcompile.api._moe_hint)

    def note(self, frame, fqn: str, full: torch.Tensor) -> None:
        frame = _user_frame(frame)
        code = frame.f_code
        # a parameter is only written in place under no_grad (single device refuses it on a leaf otherwise): a
        # value read there is held until the call ends, so a write into a temporary copy is seen; one read with
        # gradients is only watched while something (autograd, the model) holds it
        held = (lambda t=full: t) if not torch.is_grad_enabled() else weakref.ref(full)
        self.gathered.append((held, full._version, fqn, code))
        f = self.frames.get(code)
        if f is None:
            where = f"{_short(code.co_filename)}:{frame.f_lineno} ({getattr(code, 'co_qualname', code.co_name)})"
            f = self.frames[code] = _Frame(where)
            self.new.append(f)
        f.fqns[fqn] = full.numel() * full.element_size()

    def flush(self, stacklevel: int = 3) -> None:
        """Warn once per new eager frame; refuse a parameter written in place by eager code (the
        write went to a gathered copy and would be lost). Nothing to do on a call that ran no eager read."""
        if not self.gathered and not self.new:
            return
        written = [(fqn, code) for ref, version, fqn, code in self.gathered
                   if (t := ref()) is not None and t._version != version]
        self.gathered.clear()
        if written:
            fqn, code = written[0]
            raise TPEagerFallbackError(
                f"tp_compile: {self.frames[code].where} ran eagerly and wrote into parameter {fqn} in place. In "
                f"code Dynamo does not trace, a parameter read is a full copy gathered from this rank's shard, so "
                f"the write would be lost. Update parameters outside the forward (under torch.no_grad(), on "
                f"model.parameters()), or remove the graph break so that the write is compiled.")
        new, self.new = self.new, []
        for f in new:
            total = sum(f.fqns.values())
            names = list(f.fqns)
            why = "; ".join(_latest_reasons(3)) or \
                "no graph break recorded: a torch._dynamo.disable'd function, torch.utils.checkpoint's eager path or " \
                "its recompute in the backward, or Dynamo's recompile limit (TORCH_LOGS=graph_breaks,recompiles)"
            warnings.warn(
                f"tpcompile: {f.where} ran eagerly (Dynamo did not trace it; Dynamo said: {why}). Its parameter "
                f"reads {names[:4]}{' ...' if len(names) > 4 else ''} get the full tensors, all-gathered on every "
                f"rank at each read ({_mib(total)} per call) and used unsharded: right, slower. Remove the graph "
                f"break (TORCH_LOGS=graph_breaks) so that this code is compiled and sharded.{self.hint}",
                TPWarning, stacklevel=stacklevel)


_TORCH = os.path.dirname(torch.__file__) + os.sep
_MODULES = os.path.join(_TORCH, "nn", "modules") + os.sep  # nn.Module.__call__ and the built-in modules' forwards
_OURS = os.path.dirname(__file__) + os.sep
_TWIN = os.path.join(os.path.dirname(__file__), "twin.py")  # the twin modules' forwards: call machinery too


def _user_frame(frame):
    """The outermost frame of the eagerly-run code a read is in: up through user frames and the
    module-call machinery, stopping at the code that started running it eagerly (a frame Dynamo
    compiled, Dynamo's own wrappers, ``torch.utils.checkpoint``, tpcompile). ``nn.Linear.forward``
    reading its weight inside a block's body that Dynamo left is reported as that body, once."""
    found, f = frame, frame
    while f is not None:
        path = f.f_code.co_filename
        if path.startswith(_MODULES) or path == _TWIN:
            f = f.f_back
            continue
        if path.startswith((_TORCH, _OURS)) or _compiled(f.f_code):
            break
        found, f = f, f.f_back
    return found


def _compiled(code) -> bool:
    """Bytecode Dynamo wrote (a compiled frame, or the resume function after a graph break)."""
    return code.co_name.startswith("__resume_at") or any(n.startswith("__compiled_fn") for n in code.co_names)


def _latest_reasons(n: int) -> list[str]:
    """The first lines of the last ``n`` distinct things Dynamo could not trace (its graph-break and
    unsupported-construct counters keep them in the order first seen)."""
    from torch._dynamo.utils import counters

    out: list[str] = []
    for r in reversed([*counters["graph_break"], *counters["unimplemented"]]):
        line = _one_line(r)
        if line and line not in out:
            out.append(line)
        if len(out) == n:
            break
    return out[::-1]


def _short(path: str) -> str:
    parts = path.replace(os.sep, "/").split("/")
    if "site-packages" in parts:
        parts = parts[parts.index("site-packages") + 1:]
    return "/".join(parts[-3:])


def _one_line(reason: str) -> str:
    line = " ".join(str(reason).strip().splitlines()[0].split()) if str(reason).strip() else ""
    return line[:200] + ("..." if len(line) > 200 else "")


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**16 else f"{n} bytes"


@dataclass
class EagerParams:
    """What an untraced read needs: the model's ``TPParameters`` (current DTensor parameter and
    its layout by FQN) and the log."""

    params: object
    log: EagerLog


def register(twin, params, log: EagerLog) -> None:
    """Let untraced reads of ``twin``'s ghosts gather ``params``' values. The table holds the owner
    weakly (Dynamo's caches may outlive the model and keep ghosts); the twin keeps it alive."""
    owner = EagerParams(params, log)
    ref = weakref.ref(owner)
    for g in twin.ghosts:
        _OWNERS[g] = (ref, twin.fqn_of[id(g)])
    twin.eager = owner


@torch._dynamo.disable(recursive=True)
def real_value(value, frame):
    """``value`` itself, or for a ghost its parameter's full value (differentiable). Never traced:
    it runs in code Dynamo already left, and the gather inside must not become a frame of its own."""
    if not isinstance(value, torch.Tensor):
        return value
    entry = _OWNERS.get(value)
    if entry is None:
        return value
    owner = entry[0]()
    if owner is None:
        return value
    fqn = entry[1]
    p = owner.params.current(fqn)
    full = _Gathered.apply(p, owner.params.layouts.get(fqn), owner.params.rank) if isinstance(p, DTensor) else p
    owner.log.note(frame, fqn, full)
    return full


class _Gathered(torch.autograd.Function):
    """DTensor parameter -> its full value; backward: every rank holds the same full gradient (the
    eager code ran the same on all of them), so this rank's shard of it is its gradient (no sum)."""

    @staticmethod
    def forward(ctx, p, layout, rank):
        ctx.spec, ctx.layout, ctx.rank = p._spec, layout, rank
        full = p.full_tensor()
        return full.clone() if full.untyped_storage().data_ptr() == p._local_tensor.untyped_storage().data_ptr() \
            else full

    @staticmethod
    def backward(ctx, grad):
        from torch.distributed.tensor import distribute_tensor

        lay = ctx.layout
        if lay is not None and lay.sharded and ctx.spec.mesh.ndim == 1:
            local = lay.stored(grad, ctx.rank)
            return lay.mark(DTensor(local, ctx.spec, requires_grad=False)), None, None
        # replicated, or a placement tpcompile did not make (FSDP2's on a 2-D mesh): the local chunk
        g = distribute_tensor(grad.contiguous(), ctx.spec.mesh, ctx.spec.placements, src_data_rank=None)
        return g, None, None


__all__ = ["EagerReads", "EagerLog", "eager_class", "register", "real_value"]
