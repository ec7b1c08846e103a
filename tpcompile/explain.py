"""``explain``: what ``tp_compile`` would do on rank ``rank`` of ``world_size``, in one process.

Users need to see the plan and the collectives before they rent the GPUs. ``explain``
runs the same capture and passes as ``tp_compile`` under a fake process group (every
collective is a no-op), traces the real forward and backward graphs with AOTAutograd,
and executes nothing: the caller's parameters are never read or written, so a model
built on ``meta`` costs no parameter memory.
"""
from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from tpcompile.backend import Recorder, compile_twin
from tpcompile.params import StandinParameters
from tpcompile.passes.layout import ParamPlan
from tpcompile.passes.plan import validate_overrides, with_tied_aliases
from tpcompile.pipeline import Collective, GraphRecord, Options
from tpcompile.twin import Twin, trace_config


@dataclass
class Report:
    """What tpcompile did to one rank's program.

    ``plan``: {param FQN: "colwise" | "rowwise" | "vocab" | "replicate"}; ``params`` has the
    shard dim, fused chunks and shapes. ``collectives``: one per collective of the compiled
    forward and backward graphs. ``floor``: per phase, the fewest collectives the plan
    needs (DESIGN.md) and why.
    """

    world_size: int
    rank: int
    plan: dict[str, str]
    params: dict[str, ParamPlan]
    collectives: list[Collective]
    floor: dict[str, dict[str, int]]
    graph_code: str
    original_code: str
    param_bytes_local: int
    param_bytes_full: int
    warnings: list[str] = field(default_factory=list)
    records: list[GraphRecord] = field(default_factory=list)

    @property
    def inference(self) -> bool:
        """Every graph was captured under ``no_grad`` (a decode step): there is no backward."""
        return bool(self.records) and all(r.inference for r in self.records)

    def counts(self) -> Counter:
        """Collectives by (phase, kind)."""
        return Counter((c.phase, c.kind) for c in self.collectives)

    def above_floor(self) -> dict[str, int]:
        """Collectives per phase beyond the floor (0 everywhere: the plan is optimal)."""
        have = Counter(c.phase for c in self.collectives)
        return {ph: have[ph] - sum(self.floor.get(ph, {}).values()) for ph in ("forward", "backward")}

    def collectives_summary(self) -> str:
        """One line per collective: phase, kind, bytes, the user's source line."""
        width = max((len(c.module) for c in self.collectives), default=0)
        return "\n".join(
            f"{c.phase:<8} {c.kind:<14} {_bytes(c.nbytes):>10}  {c.module or '(model)':<{width}}  {c.source}"
            + (f"  [fused: {c.fused}]" if c.fused else "")
            for c in self.collectives
        ) + "\n"

    def plan_table(self) -> str:
        width = max((len(f) for f in self.params), default=10)
        rows = []
        for fqn, pp in self.params.items():
            shard = "" if pp.style == "replicate" else f"dim {pp.dim}" + (f" x{pp.chunks} fused" if pp.chunks > 1 else "")
            if pp.kv is not None:  # stored whole; the program takes its kv head's rows
                shard = f"dim {pp.kv.dim} rows " + "+".join(f"{s.start}:{s.start + s.length}" for s in pp.program_rows(0)) + " (rank 0)"
            local = "" if pp.local_shape == pp.full_shape else f" -> {list(pp.local_shape)}"
            if getattr(pp, "padded_shape", None):
                local += f" (padded to {list(pp.padded_shape)})"
            rows.append(f"{fqn:<{width}}  {pp.style:<9} {shard:<15} {list(pp.full_shape)}{local}")
        return "\n".join(rows) + "\n"

    def golden(self) -> str:
        """Deterministic text to pin in a test: plan, collectives, rewritten graph."""
        return f"# plan\n{self.plan_table()}# collectives\n{self.collectives_summary()}# graph\n{self.graph_code}"

    def __str__(self) -> str:
        c = self.counts()
        lines = [
            f"tpcompile.explain: rank {self.rank} of {self.world_size}, {len(self.records)} graph(s)",
            f"parameters: {_bytes(self.param_bytes_local)} on this rank of {_bytes(self.param_bytes_full)} "
            f"({100 * self.param_bytes_local / max(self.param_bytes_full, 1):.0f}%)",
            "",
            "plan:",
            *("  " + r for r in self.plan_table().splitlines()),
            "",
            "collectives per step on this rank:" if not self.inference else
            "collectives per call on this rank (inference: no backward; a decode step's are per token):",
        ]
        extra = self.above_floor()
        for ph in ("forward", "backward"):
            mine = [c for c in self.collectives if c.phase == ph]
            kinds = ", ".join(f"{n} {k}" for (p, k), n in sorted(c.items()) if p == ph) or "none"
            floor = self.floor.get(ph, {})
            why = " + ".join(f"{n} {r}" for r, n in floor.items()) or (
                "no backward graph" if ph == "backward" and self.inference else "nothing")
            verdict = "at the floor" if extra[ph] == 0 else f"{extra[ph]:+d} vs the floor"
            total = sum(x.nbytes for x in mine) if all(x.nbytes >= 0 for x in mine) else -1  # -1: symbolic sizes
            lines.append(f"  {ph:<8} {kinds}; {_bytes(total)}")
            lines.append(f"           floor {sum(floor.values())} ({why}): {verdict}")
        returned = [r.returned_bytes for r in self.records if r.returned_bytes]
        if returned:
            total = -1 if -1 in returned else sum(returned)
            lines.append(f"  of which outputs gathered whole at the end (the logits HF generate() reads): "
                         f"{_bytes(total)} per call; a sampler inside the graph (argmax / top-k / softmax over "
                         f"the vocabulary) moves a few values per row instead")
        experts = [pp for pp in self.params.values() if pp.style == "expert"]
        if experts:
            e = experts[0]
            held = (f"expert parallel: {len(experts)} expert weights hold {e.local_shape[0]} of {e.full_shape[0]} whole "
                    f"experts on this rank; ")
            dispatched = sum(r.floor.get("forward", {}).get("expert dispatch / combine all-to-all", 0) for r in self.records) // 3
            if dispatched:  # sequence parallel: each rank's tokens go to their experts' ranks and back
                lines += ["", held + f"{dispatched} MoE layer(s) on this rank's tokens (sequence parallel): each sends "
                          f"its (token, expert) rows to their experts' ranks and the results back, 3 all-to-alls forward "
                          f"(rows, their experts, results), 2 backward, in a fixed buffer of tp x its rows (no host sync)."]
            else:
                lines += ["", held + "no token moves (no all-to-all: every rank holds every token), each MoE layer's "
                          "combine is one all-reduce (the 'expert combine' of the floor)."]
        fused = [f for r in self.records for f in r.fused_norms]
        if fused:
            sp = " + all-gather" if fused[0].sequence_parallel else ""
            lines += ["", f"fused: {len(fused)} x reduce{sp} + residual add + RMSNorm in one op "
                          f"(tpcompile::reduce_add_rms_norm), at:", *(f"  {f.source}" for f in fused)]
        lines += ["", "where they come from:", *("  " + r for r in self.collectives_summary().splitlines())]
        lines += ["", "warnings:" if self.warnings else "warnings: none", *("  " + w for w in self.warnings)]
        return "\n".join(lines)


def _bytes(n: int) -> str:
    if n < 0:  # a collective of a graph with symbolic batch / sequence sizes
        return "dynamic"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def explain(
    model: nn.Module,
    *args: Any,
    world_size: int | None = None,
    rank: int = 0,
    sequence_parallel: bool = False,
    plan: dict[str, str] | None = None,
    fuse_norm: bool | None = None,
    dump_dir: str | None = None,
    regional: bool | None = None,
    graph: int | None = None,
    expert_parallel: bool = False,
    sharded_outputs: bool = False,
    **kwargs: Any,
) -> Report:
    """Plan, rewrite and trace ``model(*args, **kwargs)`` as rank ``rank`` of ``world_size``.

    One process, no GPU, no torchrun: a fake process group stands in for the TP group.
    The model is not modified (its parameters stay bitwise the same; one built on
    ``meta`` stays on ``meta``). ``plan``, ``fuse_norm``, ``regional``, ``expert_parallel``, ``sharded_outputs``: as ``tp_compile`` takes them (called under
    ``torch.no_grad()``, the norms are fused by default, as ``tp_compile`` fuses them).

    ``explain(tp_model)`` (a model ``tp_compile`` returned, no batch): the report of the graphs it has
    compiled and run so far, on this rank, e.g. after ``generate()``: ``graph=-1`` picks the last one
    (a decode step: its collectives are per token).
    """
    state = getattr(model, "_tp_state", None)
    if state is not None:
        if args or kwargs:
            raise RuntimeError("explain() takes the plain model, before tp_compile (this one is already "
                               "tensor-parallel); explain(tp_model) with no batch reports the graphs it has run.")
        return _compiled_report(model, state, graph)
    if world_size is None:
        raise TypeError("explain(model, *batch, world_size=N): the TP degree to explain is needed.")
    if dist.is_initialized():
        raise RuntimeError(
            "explain() runs in one process with a fake process group, but torch.distributed is already "
            "initialised. Call it before init_process_group (or in a separate script / `python -m tpcompile "
            "explain`); under torchrun, set TPCOMPILE_DUMP_DIR=dir to dump each rank's rewrite instead."
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"explain(rank={rank}) must be in [0, {world_size}).")
    from torch.distributed.device_mesh import DeviceMesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from tpcompile.api import fqns_of, regional_twin, without_regions_on_break

    validate_overrides(plan or {}, fqns_of(model), type(model).__name__)

    breaks_before = Counter(torch._dynamo.utils.counters["graph_break"])
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        # the same capture and pipeline as tp_compile; stand-in parameters, so the model is never
        # touched, and the "trace" backend builds the forward and backward graphs and runs nothing
        twin = Twin(model, torch.device("cpu"), meta_buffers_as_ghosts=True,
                    regional=regional_twin(regional, world_size, sequence_parallel, fuse_norm))
        twin.warn_regional_off, twin.regions_without_grad = regional is True, fuse_norm is False
        params = StandinParameters(twin)
        options = Options(world_size, rank, dist.group.WORLD.group_name,
                          overrides=with_tied_aliases(plan or {}, twin.aliases), sequence_parallel=sequence_parallel,
                          fuse_norm=fuse_norm, regional=twin.regional, expert_parallel=expert_parallel,
                          sharded_outputs=sharded_outputs)
        recorder = Recorder(rank, dump_dir)
        mesh = DeviceMesh.from_group(dist.group.WORLD, "cpu") if sharded_outputs else None  # the outputs' DTensors
        compiled, twin.compile = compile_twin(twin, params, options, "trace", recorder, mesh=mesh)
        twin.sync()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch._dynamo.config.patch(**trace_config()):
                try:
                    without_regions_on_break(twin, lambda: compiled(*args, **kwargs))
                except torch._dynamo.exc.BackendCompilerFailed as e:
                    raise getattr(e, "inner_exception", None) or e from None
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()  # drop the twin's cache entries (they guard on a fake group)
    breaks = Counter(torch._dynamo.utils.counters["graph_break"]) - breaks_before
    return _report(recorder.records, params.layouts, model, world_size, rank, caught, breaks)


def _compiled_report(model: nn.Module, state, graph: int | None) -> Report:
    """The report of the graphs a tp-compiled model has run (``graph``: one of them)."""
    records = list(state.records)
    if graph is not None:
        records = [records[graph]] if records else []
    if not records:
        raise RuntimeError("explain(tp_model): it has compiled no graph yet; call it once first.")
    fallbacks = [_Note(m) for r in records for m in r.fallbacks]
    return _report(records, state.plan, model, state.tp, state.rank, fallbacks, Counter())


@dataclass
class _Note:
    """A recorded fallback message where ``_report`` expects a caught warning."""

    message: str


def _report(records: list, layouts: dict, model: nn.Module, world_size: int, rank: int, caught, breaks) -> Report:
    if not records:
        raise RuntimeError("explain(): Dynamo captured no graph from this model (it ran entirely eagerly).")
    order = [fqn for fqn, _ in model.named_parameters()]
    params = {fqn: layouts[fqn] for fqn in order if fqn in layouts}
    size = {fqn: p.element_size() for fqn, p in model.named_parameters()}
    full = sum(math.prod(pp.full_shape) * size[f] for f, pp in params.items())
    local = sum(math.prod(pp.local_shape) * size[f] for f, pp in params.items())
    floor: dict[str, Counter] = {"forward": Counter(), "backward": Counter()}
    for r in records:
        for ph, why in r.floor.items():
            floor[ph].update(why)
    msgs = [str(w.message) for w in caught if "tpcompile" in str(w.message)]
    msgs += [f"graph break ({n}x): {reason}" for reason, n in breaks.items()]
    multi = len(records) > 1
    return Report(
        world_size=world_size,
        rank=rank,
        plan={f: pp.style for f, pp in params.items()},
        params=params,
        collectives=[c for r in records for c in r.collectives],
        floor={ph: dict(v) for ph, v in floor.items()},
        graph_code="".join((f"# graph {i}\n" if multi else "") + r.graph_code for i, r in enumerate(records)),
        original_code="".join((f"# graph {i}\n" if multi else "") + r.original_code for i, r in enumerate(records)),
        param_bytes_local=local,
        param_bytes_full=full,
        warnings=list(dict.fromkeys(msgs)),
        records=records,
    )
