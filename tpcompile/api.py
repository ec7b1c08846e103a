"""``tp_compile``: the one call a user makes."""
from __future__ import annotations

import copy
import hashlib
import logging
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from tpcompile.backend import Backend, GraphRecord, TPShardingError, shard_tensor
from tpcompile.passes.placements import local_size
from tpcompile.passes.plan import GraphPlan, ParamPlan


class TPEagerFallbackError(RuntimeError):
    """Dynamo ran part of the model eagerly, outside any graph tpcompile rewrote."""


class TPInputMismatchError(RuntimeError):
    """The TP ranks were handed different inputs (e.g. a data loader seeded per rank)."""


def _quiet_logging() -> set:
    """Logger methods Dynamo may drop inside the compiled model instead of graph-breaking.

    A graph break splits the model into graphs planned apart (values crossing it are made
    whole), so a harmless ``logger.warning_once(...)`` in a library model (Hugging Face's
    loss selection does this) would cost collectives. Inside compiled code those messages
    are skipped; eager runs still print them.
    """
    names = ("debug", "info", "warning", "warn", "error", "critical", "exception", "log", "warning_once", "info_once",
             "warning_advice")
    fns = {getattr(logging.Logger, n) for n in names if hasattr(logging.Logger, n)}
    return set(torch._dynamo.config.ignore_logging_functions) | fns


def _resolve_group(group) -> dist.ProcessGroup:
    if group is None:
        return dist.group.WORLD
    if hasattr(group, "get_group"):  # DeviceMesh
        if group.ndim != 1:
            raise ValueError(f"tp_compile(group=...) takes a 1-D DeviceMesh; got {group.ndim}-D. Pass mesh['tp'].")
        return group.get_group()
    return group


def _ghost(p: torch.Tensor, device: torch.device) -> nn.Parameter:
    """A Parameter of ``p``'s logical shape that owns one element of memory (stride 0).

    The element is NaN (floats), so code that Dynamo leaves to run eagerly on a ghost
    poisons its result instead of quietly computing with garbage; ``forward`` checks.
    """
    fill = float("nan") if p.dtype.is_floating_point else 0
    g = torch.full((), fill, dtype=p.dtype, device=device).expand(p.shape)
    return nn.Parameter(g, requires_grad=p.requires_grad)


class TensorParallel:
    """State behind a tp-compiled module: the group, the ghost twin Dynamo traces, the plan."""

    def __init__(self, model: nn.Module, group, plan: dict | None, broadcast_inputs: bool, compile_options: dict,
                 trace_only: bool = False, sequence_parallel: bool = False):
        # trace_only (explain): plan and trace only; the model's parameters are never touched
        self.trace_only = trace_only
        # Dynamo settings of every trace of the twin (forward, and checkpoint's planning trace)
        self.dynamo_config = {"nested_graph_breaks": True, "ignore_logging_functions": _quiet_logging()}
        self.sequence_parallel = sequence_parallel
        self.sharded_outputs = compile_options.pop("sharded_outputs", False)
        self._mesh = None
        self.dump_dir = compile_options.pop("dump_dir", None) or os.environ.get("TPCOMPILE_DUMP_DIR") or None
        self.group = _resolve_group(group)
        self.group_name = self.group.group_name
        self.tp = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.overrides = dict(plan or {})
        self.broadcast_inputs = broadcast_inputs and not trace_only
        self.inner_backend = compile_options.pop("backend", "inductor")
        self.records: list[GraphRecord] = []
        self.graph_calls = 0  # rewritten graphs run so far: a call that runs none ran eagerly on the ghosts
        self.plan: dict[str, ParamPlan] = {}
        self.fqn_of: dict[int, str] = {}
        self.params: dict[str, nn.Parameter] = {}
        self.standins: dict[str, nn.Parameter] = {}  # trace_only: local-shaped ghosts
        for fqn, p in model.named_parameters(remove_duplicate=False):
            if id(p) not in self.fqn_of:
                self.fqn_of[id(p)] = fqn
                self.params[fqn] = p
            elif fqn != self.fqn_of[id(p)]:  # a tied weight: an override may name any of its names
                self._alias_overrides(fqn, self.fqn_of[id(p)])
        device = self.device
        memo: dict[int, Any] = {}
        self.name_of: dict[int, str] = {}  # ghost / buffer id -> FQN, for readable graphs
        self.real_of_ghost: dict[int, nn.Parameter] = {}
        for p in self.params.values():
            g = _ghost(p, p.device if p.device.type != "meta" else device)
            memo[id(p)] = g
            self.real_of_ghost[id(g)] = p
            self.name_of[id(g)] = self.fqn_of[id(p)]
        for b in model.buffers():
            # tracing a model built on meta: buffers become ghosts too (their values are never read)
            memo[id(b)] = _ghost(b, device) if trace_only and b.device.type == "meta" else b
        for fqn, b in model.named_buffers():
            self.name_of.setdefault(id(memo[id(b)]), fqn)
        self.twin = copy.deepcopy(model, memo)
        self._pairs = list(zip(model.modules(), self.twin.modules()))
        self._ghosts = [memo[id(p)] for p in self.params.values()]  # keep ids stable
        self.compiled = torch.compile(self.twin, backend=Backend(self), **compile_options)
        self._inputs_checked = trace_only  # one process: nothing to compare

    def _alias_overrides(self, alias: str, fqn: str) -> None:
        from tpcompile.passes.plan import _style_for_fqn

        style = _style_for_fqn(alias, self.overrides)
        if style is not None and _style_for_fqn(fqn, self.overrides) is None:
            self.overrides[fqn] = style

    @property
    def device(self) -> torch.device:
        if dist.get_backend(self.group) == "nccl" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # ----------------------------------------------------------------- called by the backend
    def apply_plan(self, plan: GraphPlan) -> None:
        """Store each parameter the way the plan says (first graph that uses it decides)."""
        for pp in plan.params.values():
            known = self.plan.get(pp.fqn)
            if known is not None:
                if (known.style, known.dim, known.chunks) != (pp.style, pp.dim, pp.chunks):
                    raise TPShardingError(
                        f"{pp.fqn}: a later graph needs it {pp.style} but it is stored {known.style}; "
                        f"pin one with plan={{{pp.fqn!r}: {known.style!r}}}."
                    )
                continue
            p = self.params[pp.fqn]
            if self.trace_only:
                ghost = _ghost(p, p.device if p.device.type != "meta" else self.device)
                self.standins[pp.fqn] = nn.Parameter(ghost[tuple(slice(0, n) for n in pp.local_shape)], p.requires_grad)
            elif pp.style != "replicate":
                if p.grad is not None:
                    raise TPShardingError(f"{pp.fqn}: first used after training started; cannot reshard it now.")
                p.data = shard_tensor(p.data, pp, self.rank, self.tp)
            self.plan[pp.fqn] = pp

    def as_dtensors(self, outputs: Any, sharded: dict) -> list:
        """A graph's flat outputs with those kept sharded (``{index: (dim, full size)}``) as DTensors.

        A vocabulary padded to ``ceil(V / tp)`` rows per rank is cut back to DTensor's uneven
        split (``torch.chunk``'s sizes), which is the same layout without the padding.
        """
        from torch.distributed.tensor import DTensor, Shard

        if self._mesh is None:
            from torch.distributed.device_mesh import DeviceMesh

            self._mesh = DeviceMesh.from_group(self.group, self.device.type)
        outputs = list(outputs)
        for i, (dim, full) in sharded.items():
            t = outputs[i]
            n = local_size(full, self.tp)
            real = max(0, min(n, full - self.rank * n))
            if real != t.shape[dim]:
                t = t.narrow(dim, 0, real)
            shape = t.shape[:dim] + (full,) + t.shape[dim + 1:]
            outputs[i] = DTensor.from_local(t, self._mesh, [Shard(dim)], run_check=False, shape=shape,
                                            stride=torch.empty(shape, device="meta").stride())
        return outputs

    def local_param(self, fqn: str) -> nn.Parameter:
        """What a compiled graph takes for ``fqn``: this rank's shard (or, trace_only, its ghost)."""
        return self.standins[fqn] if self.trace_only else self.params[fqn]

    def dump(self, index: int, record: GraphRecord) -> None:
        from tpcompile.dump import dump_record

        dump_record(record, self.dump_dir, self.rank, index)

    # ----------------------------------------------------------------- the module's forward
    def forward(self, *args, **kwargs):
        for m, t in self._pairs:
            t.training = m.training
        if self.broadcast_inputs:
            args, kwargs = self._broadcast(args, kwargs)
        elif not self._inputs_checked:
            self._check_inputs(args, kwargs)
            self._inputs_checked = True
        n_graphs, n_calls = len(self.records), self.graph_calls
        try:
            with torch._dynamo.config.patch(**self.dynamo_config):
                out = self.compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            inner = getattr(e, "inner_exception", None)
            if isinstance(inner, (TPShardingError, ValueError, NotImplementedError)):
                raise inner from None
            raise
        if self.graph_calls == n_calls and not self.trace_only:
            self._check_ran_compiled(out)
        if len(self.records) != n_graphs and not self.trace_only:  # something (re)compiled: make sure nothing ran on ghosts
            self._check_no_eager_ghosts(out)
            if len(self.records) - n_graphs > 1:
                if self.sharded_outputs:
                    raise TPShardingError(
                        f"tp_compile(sharded_outputs=True): the model was captured as {len(self.records) - n_graphs} "
                        f"graphs (a graph break; the first ends at {self.records[n_graphs].ends_at}). Only a model "
                        f"captured as one graph can return sharded outputs: remove the graph break "
                        f"(TORCH_LOGS=graph_breaks) or use sharded_outputs=False.")
                self._warn_graph_breaks(self.records[n_graphs:])
        return out

    def _warn_graph_breaks(self, records: list) -> None:
        """One call captured several graphs: say where each one ends and what its end costs."""
        import warnings

        from tpcompile.backend import TPWarning

        parts = []
        for i, r in enumerate(records[:-1]):
            cost = f"{len(r.exit_mappings)} value(s) made whole there ({', '.join(r.exit_mappings)})" if r.exit_mappings \
                else "nothing sharded crosses it"
            parts.append(f"graph {i + 1} ends at {r.ends_at}: {cost}")
        msg = (
            f"tpcompile: the model was captured as {len(records)} graphs (graph breaks); each is planned on its own, "
            f"so a projection whose shard would cross a break stays replicated. " + "; ".join(parts) +
            ". TORCH_LOGS=graph_breaks shows why Dynamo broke the graph."
        )
        warnings.warn(msg, TPWarning, stacklevel=3)
        records[0].fallbacks.append(msg)

    def _check_ran_compiled(self, out) -> None:
        """No rewritten graph ran in this call: Dynamo ran the whole forward eagerly, on the ghosts."""
        flat, _ = tree_flatten(out)
        if any(isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all() for t in flat):
            limit = torch._dynamo.config.recompile_limit
            raise TPEagerFallbackError(
                f"tp_compile: this call ran no compiled graph: Dynamo ran the forward eagerly, where tensor "
                f"parallelism cannot apply. The usual cause is Dynamo's recompile limit "
                f"(torch._dynamo.config.recompile_limit={limit}), e.g. more than {limit} models or input "
                f"types sharing one `forward`: call torch._dynamo.reset() between models or raise the limit. "
                f"TORCH_LOGS=recompiles shows the reasons."
            )

    def _check_no_eager_ghosts(self, out) -> None:
        """A frame Dynamo skipped (e.g. a graph break inside a loop) runs eagerly on the ghosts."""
        flat, _ = tree_flatten(out)
        poisoned = any(isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all() for t in flat)
        seen = {fqn for r in self.records for fqn in r.plan}
        unseen = [f for f in self.params if f not in seen]
        if poisoned and unseen:
            raise TPEagerFallbackError(
                f"tp_compile: parameters {unseen[:6]}{'...' if len(unseen) > 6 else ''} were used outside every "
                f"compiled graph: Dynamo ran that code eagerly (typically a graph break inside a loop makes it "
                f"skip the whole frame), where tensor parallelism cannot apply. Remove the graph break "
                f"(TORCH_LOGS=graph_breaks shows it) or move it out of the loop."
            )

    def _broadcast(self, args, kwargs):
        """Megatron's broadcast_data: every rank computes on the first rank's inputs."""
        flat, spec = tree_flatten((args, kwargs))
        src = dist.get_global_rank(self.group, 0)
        self._check_inputs(args, kwargs, shapes_only=True)
        out = []
        for x in flat:
            if isinstance(x, torch.Tensor):
                x = x.detach().clone().to(self.device)
                dist.broadcast(x, src=src, group=self.group)
            out.append(x)
        return tree_unflatten(out, spec)

    def _check_inputs(self, args, kwargs, shapes_only: bool = False) -> None:
        """Fail loudly if ranks were given different inputs (the classic silent TP bug)."""
        flat, _ = tree_flatten((args, kwargs))
        h = hashlib.sha256()
        for x in flat:
            if isinstance(x, torch.Tensor):
                h.update(repr((tuple(x.shape), x.dtype)).encode())
                if not shapes_only:
                    h.update(x.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            elif isinstance(x, (int, float, str, bool, type(None))):
                h.update(repr(x).encode())
        digest = torch.tensor(list(h.digest()[:8]), dtype=torch.int64, device=self.device)
        gathered = [torch.empty_like(digest) for _ in range(self.tp)]
        dist.all_gather(gathered, digest, group=self.group)
        differ = [r for r, d in enumerate(gathered) if not torch.equal(d, gathered[0])]
        if differ:
            what = "input shapes" if shapes_only else "inputs"
            raise TPInputMismatchError(
                f"tp_compile: TP ranks {differ} got different {what} from TP rank 0. Every rank of a "
                f"tensor-parallel group must see the same batch: seed the data loader the same on all TP "
                f"ranks, or pass tp_compile(..., broadcast_inputs=True) to use the first rank's inputs."
            )


def tp_compile(
    model: nn.Module,
    *,
    group: Any = None,
    plan: dict[str, str] | None = None,
    sequence_parallel: bool = False,
    sharded_outputs: bool = False,
    broadcast_inputs: bool = False,
    example_inputs: Any = None,
    init_weights: Any = None,
    device: Any = None,
    **compile_options: Any,
) -> nn.Module:
    """Make ``model`` run tensor-parallel over ``group`` (default: WORLD), compiled.

    Returns the same module object. On the first call, the model is captured with logical
    shapes, planned (column / row / vocab / replicate per parameter), and each parameter is
    resharded *in place*: the ``Parameter`` objects stay the same, so an optimizer built
    right after ``tp_compile`` works, and from then on they hold only this rank's shard.

    ``plan``: per-FQN overrides, e.g. ``{"lm_head": "replicate"}`` (globs allowed).
    ``sequence_parallel``: shard the residual stream (norms, dropout, residual adds) over
    tokens between TP regions (Megatron-SP): all-gather / reduce-scatter instead of
    all-reduce, activations there shrink by tp. The sequence length must divide by tp.
    ``sharded_outputs``: return outputs that are sharded at the end of the graph (HF models'
    ``logits``) as ``DTensor``s (``.full_tensor()`` gathers them) instead of gathering every
    call; the loss is unaffected. Needs the model captured as one graph.
    ``broadcast_inputs``: broadcast every input from the group's first rank each call
    instead of checking, on the first call, that all ranks got the same inputs.
    ``example_inputs`` (args tuple, or kwargs dict): plan now rather than on the first call, so
    the parameters are sharded (and a ``meta``-device model's shards allocated, on ``device``,
    default the group's) before ``tp_compile`` returns; ``init_weights`` initialises those:
    see ``tpcompile.checkpoint.prepare`` and docs/checkpoints.md.
    ``compile_options``: passed to ``torch.compile`` (``dynamic``, ``mode``, ``fullgraph``,
    ...); ``backend`` picks what compiles the rewritten graph: ``"inductor"`` (default),
    ``"aot_eager"`` or ``"eager"``.
    """
    if not dist.is_initialized():
        raise RuntimeError("tp_compile needs torch.distributed initialised (torchrun + dist.init_process_group()).")
    if getattr(model, "_tp_state", None) is not None:
        raise RuntimeError("tp_compile: this module is already tensor-parallel.")
    state = TensorParallel(model, group, plan, broadcast_inputs, dict(compile_options, sharded_outputs=sharded_outputs),
                           sequence_parallel=sequence_parallel)
    model._tp_state = state
    model.forward = state.forward
    from tpcompile import checkpoint  # checkpoint-facing side: state dicts, meta-device models

    checkpoint.install_state_dict_hooks(model)
    checkpoint.prepare(model, state, example_inputs, init_weights, device)
    return model


def tp_state(model: nn.Module) -> TensorParallel:
    """The ``TensorParallel`` state of a tp-compiled module (plan, graph records, group)."""
    state = getattr(model, "_tp_state", None)
    if state is None:
        raise ValueError("not a tp_compile'd module")
    return state
