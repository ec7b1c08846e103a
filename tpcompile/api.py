"""``tp_compile``: the one call a user makes."""
from __future__ import annotations

import functools
import hashlib
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from tpcompile import compile_once, eager, hf
from tpcompile.backend import USER_MODES, Recorder, compile_twin
from tpcompile.compat import install_output_hooks
from tpcompile.data_parallel import apply_data_parallel, data_parallel_mesh, refuse_ddp
from tpcompile.eager import EagerLog
from tpcompile.errors import TPEagerFallbackError, TPInputMismatchError, TPShardingError, TPWarning
from tpcompile.params import TPParameters, watch_optimizers
from tpcompile.passes.plan import validate_overrides, with_tied_aliases
from tpcompile.pipeline import GraphRecord, Options
from tpcompile.twin import Twin, state_of, trace_config


def _resolve_mesh(group):
    """(1-D DeviceMesh, ProcessGroup) of the TP group: a mesh given is kept (FSDP2 composes with
    DTensors on a slice of the same mesh), a process group gets a mesh of its own."""
    from torch.distributed.device_mesh import DeviceMesh

    if hasattr(group, "get_group"):  # DeviceMesh
        if group.ndim != 1:
            raise ValueError(f"tp_compile(group=...) takes a 1-D DeviceMesh; got {group.ndim}-D. Pass mesh['tp'].")
        return group, group.get_group()
    pg = dist.group.WORLD if group is None else group
    device = "cuda" if dist.get_backend(pg) == "nccl" and torch.cuda.is_available() else "cpu"
    return DeviceMesh.from_group(pg, device), pg


def _moe_hint(module: nn.Module) -> str:
    """Hugging Face MoE experts run by their eager per-expert loop (``one_hot`` / ``nonzero`` / a Python
    loop over the experts hit: a graph break in a loop) never reach a graph: say which spelling does."""
    cfg = getattr(module, "config", None)
    if getattr(cfg, "_experts_implementation", None) != "eager":
        return ""
    return (" This model's MoE experts use the eager per-expert loop (config._experts_implementation='eager'); "
            "set model.config._experts_implementation = 'grouped_mm' (or 'batched_mm') before tp_compile: "
            "both compile into one graph and their experts are sharded (docs/models.md).")


class TensorParallel:
    """State behind a tp-compiled module: the TP group, the ghost twin Dynamo traces, the parameters."""

    def __init__(self, model: nn.Module, group, plan: dict | None, compile_options: dict, *,
                 sequence_parallel: bool = False, sharded_outputs: bool = False, broadcast_inputs: bool = False,
                 fuse_norm: bool | None = None, dump_dir: str | None = None, check_replicas_every: int = 100,
                 async_tp: bool = False, regional: bool | None = None, expert_parallel: bool = False):
        validate_overrides(plan or {}, fqns_of(model), type(model).__name__)
        self.mesh, self.group = _resolve_mesh(group)
        self.tp, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.broadcast_inputs, self.sharded_outputs = broadcast_inputs, sharded_outputs
        install_output_hooks(model)  # before the twin copies the model: the same hooks on both
        self.twin = Twin(model, self.device, regional=regional_twin(regional, self.tp, sequence_parallel, fuse_norm))
        self.twin.warn_regional_off, self.twin.regions_without_grad = regional is True, fuse_norm is False
        self._moe_hint = _moe_hint(model)
        self.params = TPParameters(model, self.mesh, self.rank, self.tp)
        self.eager_log = EagerLog(hint=self._moe_hint)
        eager.register(self.twin, self.params, self.eager_log)
        watch_optimizers(self.params)
        refuse_ddp()
        self.options = Options(self.tp, self.rank, self.group.group_name,
                               overrides=with_tied_aliases(plan or {}, self.twin.aliases),
                               sequence_parallel=sequence_parallel, sharded_outputs=sharded_outputs,
                               rewrite_one_rank=os.environ.get("TPCOMPILE_TP1_REWRITE") == "1", fuse_norm=fuse_norm,
                               regional=self.twin.regional, expert_parallel=expert_parallel)
        self.recorder = Recorder(self.rank, dump_dir or os.environ.get("TPCOMPILE_DUMP_DIR") or None)
        compile_options = dict(compile_options)
        mode = compile_options.pop("backend", "inductor")
        if mode not in USER_MODES:  # "trace" / "plan" are explain's and the planner's
            raise ValueError(f"tp_compile(backend={mode!r}): use 'inductor', 'aot_eager' or 'eager'")
        inductor_options = _inductor_options(compile_options)
        if async_tp:
            inductor_options["_micro_pipeline_tp"] = _async_tp(self.group, mode, sequence_parallel)
        self.compiled, self.twin.compile = compile_twin(
            self.twin, self.params, self.options, mode, self.recorder, mesh=self.mesh, compile_options=compile_options,
            inductor_options=inductor_options)
        self.data_parallel = ""  # what tp_compile(mesh=...) applied: "shard" | "hsdp" | "replicate"
        self._inputs_checked = False
        self.check_replicas_every, self.calls = check_replicas_every, 0
        self._trace_config = trace_config()

    @property
    def device(self) -> torch.device:
        if dist.get_backend(self.group) == "nccl" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def plan(self) -> dict:
        """FQN -> ParamPlan of every parameter a graph has planned so far."""
        return self.params.layouts

    @property
    def records(self) -> list[GraphRecord]:
        """One record per captured graph: plan, rewritten code, collectives, fallbacks."""
        return self.recorder.records

    def plan_now(self, args: tuple, kwargs: dict) -> None:
        """Trace the twin on an example batch with the planning backend: every parameter a graph
        uses is stored as planned before the first real call (``example_inputs``)."""
        self.twin.sync()
        planner, plan_regions = compile_twin(self.twin, self.params, self.options, "plan", Recorder(self.rank),
                                             compile_options={"dynamic": False})
        saved = self.twin.compile, self.twin.regions
        self.twin.compile, self.twin.regions = plan_regions, {}
        try:
            with torch._dynamo.config.patch(**self._trace_config):
                # the same Dynamo settings as forward: the same graphs
                without_regions_on_break(self.twin, lambda: planner(*args, **kwargs))
        except torch._dynamo.exc.BackendCompilerFailed as e:
            inner = getattr(e, "inner_exception", None)
            if inner is not None:
                raise inner from None
            raise
        finally:
            self.twin.compile, self.twin.regions = saved

    # ----------------------------------------------------------------- the module's forward
    def forward(self, *args, **kwargs):
        self.twin.sync()
        if self.tp == 1:  # one rank: nothing to broadcast, compare or check (no collective at all)
            pass
        elif self.broadcast_inputs:
            args, kwargs = self._broadcast(args, kwargs)
        elif not self._inputs_checked:
            self._check_inputs(args, kwargs)
            self._inputs_checked = True
        self.calls += 1
        every = self.check_replicas_every
        if every and self.tp > 1 and (self.calls <= 3 or self.calls % every == 0):
            self.params.check_replicas(self.group, self.device)
        n_graphs, n_calls = len(self.records), self.recorder.calls
        try:
            with torch._dynamo.config.patch(**self._trace_config):
                out = without_regions_on_break(self.twin, lambda: self.compiled(*args, **kwargs))
        except torch._dynamo.exc.BackendCompilerFailed as e:
            inner = getattr(e, "inner_exception", None)
            if isinstance(inner, (TPShardingError, ValueError, NotImplementedError, RuntimeError)):
                raise inner from None
            raise
        self.eager_log.flush(stacklevel=3)
        if self.recorder.calls == n_calls:
            self._check_ran_compiled(out)
        if len(self.records) != n_graphs:  # something (re)compiled: make sure nothing ran on ghosts
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
        if _has_nan(out):
            limit = torch._dynamo.config.recompile_limit
            raise TPEagerFallbackError(
                f"tp_compile: this call ran no compiled graph: Dynamo ran the forward eagerly, where tensor "
                f"parallelism cannot apply. The usual cause is Dynamo's recompile limit "
                f"(torch._dynamo.config.recompile_limit={limit}), e.g. more than {limit} models or input "
                f"types sharing one `forward`: call torch._dynamo.reset() between models or raise the limit. "
                f"TORCH_LOGS=recompiles shows the reasons."
            )

    def _check_no_eager_ghosts(self, out) -> None:
        """Code Dynamo runs eagerly reads real parameters through their modules (``tpcompile.eager``);
        one that reaches a parameter another way (``module._parameters[...]``, ``parameters()`` inside
        the forward) gets the memory-free stand-in, and its result is NaN: say so instead."""
        if not _has_nan(out):
            return
        unseen = [f for f in self.params.slots if f not in self.params.layouts]
        which = (f" (no compiled graph has used {unseen[:6]}{'...' if len(unseen) > 6 else ''})" if unseen else "")
        raise TPEagerFallbackError(
            f"tp_compile: the output is NaN on a call that compiled new graphs: code Dynamo ran eagerly reached a "
            f"parameter other than through its module{which}. Such code reads `module.weight` as the full "
            f"parameter (gathered, right but slower), but a parameter taken from `module._parameters`, "
            f"`parameters()` or `state_dict()` inside the forward is a memory-free stand-in (NaN). Read it as an "
            f"attribute of its module, or remove the graph break (TORCH_LOGS=graph_breaks shows it).{self._moe_hint}"
        )

    def _broadcast(self, args, kwargs):
        """Megatron's broadcast_data: every rank computes on the first rank's inputs."""
        flat, spec = tree_flatten((args, kwargs))
        src = dist.get_global_rank(self.group, 0)
        self._check_inputs(args, kwargs, shapes_only=True)
        out = []
        for x in flat:
            if isinstance(x, torch.Tensor) and state_of(x) is None:  # a KV cache's shard is each rank's own
                x = x.detach().clone().to(self.device)
                dist.broadcast(x, src=src, group=self.group)
            out.append(x)
        return tree_unflatten(out, spec)

    def _check_inputs(self, args, kwargs, shapes_only: bool = False) -> None:
        """Fail loudly if ranks were given different inputs (the classic silent TP bug)."""
        flat, _ = tree_flatten((args, kwargs))
        h = hashlib.sha256()
        for x in flat:
            if isinstance(x, torch.Tensor) and state_of(x) is None:
                h.update(repr((tuple(x.shape), x.dtype)).encode())
                if not shapes_only:
                    # reshape(-1): a 0-dim tensor (the Trainer's num_items_in_batch) cannot be viewed as bytes
                    h.update(x.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
            elif isinstance(x, (int, float, str, bool, type(None))):
                h.update(repr(x).encode())
        digest = torch.tensor(list(h.digest()[:8]) + list(_rng_digest(self.device)) + compile_once.host_digest(),
                              dtype=torch.int64, device=self.device)
        gathered = [torch.empty_like(digest) for _ in range(self.tp)]
        dist.all_gather(gathered, digest, group=self.group)  # one collective for the checks and the compile order
        compile_once.arrange(self.group, [d[16:].tolist() for d in gathered])
        rng_differ = [r for r, d in enumerate(gathered) if not torch.equal(d[8:16], gathered[0][8:16])]
        if rng_differ:
            same_rng_on_tp_ranks(self)
            warnings.warn(
                f"tpcompile: TP ranks {rng_differ} started with another random-number state than TP rank 0 (each "
                f"process seeded apart, or unseeded: torch seeds each process differently). Dropout and every "
                f"other draw inside a tp-compiled model must be the same on all ranks of a TP group, so tpcompile "
                f"gave every rank TP rank 0's state. Seed them the same (torch.manual_seed(seed), one seed for "
                f"all ranks of a TP group) to keep your own streams.", TPWarning, stacklevel=3)
        differ = [r for r, d in enumerate(gathered) if not torch.equal(d[:8], gathered[0][:8])]
        if differ:
            what = "input shapes" if shapes_only else "inputs"
            raise TPInputMismatchError(
                f"tp_compile: TP ranks {differ} got different {what} from TP rank 0. Every rank of a "
                f"tensor-parallel group must see the same batch: seed the data loader the same on all TP "
                f"ranks, or pass tp_compile(..., broadcast_inputs=True) to use the first rank's inputs."
            )


def without_regions_on_break(twin: Twin, call):
    """``call()``; if Dynamo cannot capture a repeated block as one region (a graph break inside
    it, a side effect on a KV cache, blocks that trace apart), run it again with the blocks traced
    inline (each graph planned on its own, as without regional compilation); ``regional=True`` says
    so with a ``TPWarning``. The failure is Dynamo's, at trace time, before the failing frame runs."""
    try:
        return call()
    except (torch._dynamo.exc.UncapturedHigherOrderOpError, torch._dynamo.exc.InternalTorchDynamoError) as e:
        # Internal, from the region: blocks of one class that trace apart (each a dropout of another
        # spelling) miss its reuse guard every layer ("invoke_subgraph: exceeded maximum reuse entries"); a
        # KV cache a block appends to ("An intermediate tensor ... inside a higher-order op subgraph aliases")
        if not twin.regional or (isinstance(e, torch._dynamo.exc.InternalTorchDynamoError)
                                 and not any(w in str(e) for w in ("invoke_subgraph", "higher-order op"))):
            raise
        import warnings

        first = str(e).split("Got graph break/error:", 1)[-1].strip().splitlines()
        twin.regional_off()
        if not twin.warn_regional_off:  # regional=None (the default): whole-graph compilation, quietly
            return call()
        warnings.warn(f"tpcompile: regional compilation is off for this model: a repeated block does not trace as "
                      f"one graph ({first[0] if first else 'a graph break'}). Each layer is compiled in the model's "
                      f"graph(s) instead (correct; compile time grows with depth). Remove the graph break inside "
                      f"the block (TORCH_LOGS=graph_breaks) to compile it once.", TPWarning, stacklevel=4)
        return call()


def regional_twin(regional: bool | None, tp: int, sequence_parallel: bool, fuse_norm: bool | None) -> bool:
    """Whether the repeated blocks are traced as compile regions: unless ``regional=False``, at
    tp > 1, without sequence parallelism and without ``fuse_norm=True`` (one rank is torch.compile;
    under SP the token-sharded residual stream, with fused norms a fusion, crosses the blocks' ends,
    and the pipeline would inline every region). ``TPCOMPILE_REGIONAL=0`` turns the default off (to
    time the test suite both ways)."""
    if regional is None and os.environ.get("TPCOMPILE_REGIONAL") == "0":  # the suite-time measurement's switch
        regional = False
    return regional is not False and tp > 1 and not sequence_parallel and fuse_norm is not True


def fqns_of(model: nn.Module) -> list[str]:
    """The names ``plan=`` patterns are matched against: every parameter, tied ones under each name."""
    return [n for n, _ in model.named_parameters(remove_duplicate=False)]


def _has_nan(out) -> bool:
    """Ghosts are NaN: a result computed on one is NaN (``-inf`` / ``inf`` in a user's output are not ours)."""
    flat, _ = tree_flatten(out)
    flat = [getattr(t, "_local_tensor", t) for t in flat]  # a DTensor output (sharded_outputs): its shard
    flat = [t[0] if (t := state_of(x)) is not None else x for x in flat]  # a KV cache ghost: its shard
    return any(isinstance(t, torch.Tensor) and t.is_floating_point() and bool(t.isnan().any()) for t in flat)


def _async_tp(group, mode: str, sequence_parallel: bool) -> bool:
    """Turn on Inductor's async TP (``_micro_pipeline_tp``: each SP all-gather -> matmul and
    matmul -> reduce-scatter becomes one pipelined symmetric-memory op) for ``group``: its
    symmetric memory is enabled here, which the pass requires. Only SP graphs have those
    collectives; off CUDA + NCCL Inductor fuses nothing (the graphs are still in its form)."""
    import warnings

    if not sequence_parallel:
        raise ValueError("tp_compile(async_tp=True) needs sequence_parallel=True: async TP overlaps the all-gathers "
                         "and reduce-scatters of sequence parallelism with their matmuls (plain TP's all-reduces "
                         "do not fuse).")
    if mode != "inductor":
        raise ValueError(f"tp_compile(async_tp=True) is an Inductor pass: use backend='inductor', not {mode!r}.")
    if dist.get_backend(group) == "nccl" and torch.cuda.is_available():
        from torch.distributed._symmetric_memory import enable_symm_mem_for_group

        with warnings.catch_warnings():  # deprecated in 2.13, but the pass still asks for it
            warnings.simplefilter("ignore", FutureWarning)
            enable_symm_mem_for_group(group.group_name)
    else:
        warnings.warn(f"tp_compile(async_tp=True): async TP needs CUDA and NCCL; on this {dist.get_backend(group)} "
                      f"group Inductor fuses nothing (the program is the same as without it).", TPWarning,
                      stacklevel=4)
    return True


def _inductor_options(compile_options: dict) -> dict:
    """``mode=`` / ``options=`` of ``torch.compile`` are Inductor's: take them out (a custom backend
    cannot take them) and hand them to Inductor as config patches."""
    mode, options = compile_options.pop("mode", None), compile_options.pop("options", None)
    patches = {}
    if mode not in (None, "default"):
        from torch._inductor import list_mode_options

        patches.update(list_mode_options(mode))
    patches.update(options or {})
    return patches


def tp_compile(
    model: nn.Module,
    *,
    mesh: Any = None,
    group: Any = None,
    plan: dict[str, str] | None = None,
    sequence_parallel: bool = False,
    expert_parallel: bool = False,
    sharded_outputs: bool = False,
    broadcast_inputs: bool = False,
    fuse_norm: bool | None = None,
    example_inputs: Any = None,
    init_weights: Any = None,
    device: Any = None,
    dump_dir: str | None = None,
    check_replicas_every: int = 100,
    async_tp: bool = False,
    regional: bool | None = None,
    **compile_options: Any,
) -> nn.Module:
    """Make ``model`` run tensor-parallel over ``group`` (default: WORLD), compiled.

    Returns the same module object, its parameters replaced by ``DTensor`` parameters on the TP
    mesh (``Replicate`` until planned, then this rank's shard): build the optimizer after
    ``tp_compile``. On the first call (or now, with ``example_inputs``) the model is captured
    with logical shapes and planned (column / row / vocab / replicate per parameter), and each
    parameter is stored as planned, in place (same object). ``clip_grad_norm_``, FSDP2
    (``fully_shard`` on a 2-D mesh) and DCP work on them as on any DTensor parameters.

    ``mesh``: a DeviceMesh with a ``"tp"`` dim and, for data parallelism, ``"dp"`` (FSDP2),
    ``"dp_replicate"`` and ``"dp_shard"`` (HSDP) or ``"dp_replicate"`` alone (replicated): TP runs
    over ``mesh["tp"]`` and FSDP2 is applied to each repeated block (found from the module tree)
    and then to the model (``tpcompile.data_parallel``); needs ``example_inputs``.
    ``group``: the TP group otherwise: a ProcessGroup or a 1-D DeviceMesh (``mesh["tp"]``, to
    compose with your own ``fully_shard(..., mesh=mesh["dp"])``).
    ``plan``: per-FQN overrides, e.g. ``{"lm_head": "replicate"}`` (globs allowed).
    ``sequence_parallel``: shard the residual stream (norms, dropout, residual adds) over
    tokens between TP regions (Megatron-SP): all-gather / reduce-scatter instead of
    all-reduce, activations there shrink by tp. The sequence length must divide by tp.
    ``expert_parallel``: MoE experts (the 3-D weights of a grouped expert matmul, found from the graph)
    held whole, E / tp per rank (style ``expert``), instead of every expert split over the ranks
    (expert-TP, the default). Each rank runs the tokens routed to its own experts and one all-reduce
    per MoE layer combines them, as for expert-TP (docs/models.md). E must divide by tp.
    ``sharded_outputs``: return outputs that are sharded at the end of the graph (HF models'
    ``logits``) as ``DTensor``s (``.full_tensor()`` gathers them) instead of gathering every
    call; the loss is unaffected. Needs the model captured as one graph.
    ``broadcast_inputs``: broadcast every input from the group's first rank each call
    instead of checking, on the first call, that all ranks got the same inputs.
    ``fuse_norm``: run each row-parallel reduction, the residual add and the RMSNorm after it (and,
    with SP, the next all-gather) as one op, ``tpcompile::reduce_add_rms_norm`` (Megatron's inference
    layers; docs/fused_norm.md). ``None`` (default): for graphs captured under ``torch.no_grad()`` /
    ``inference_mode``; ``True``: training graphs too (the op has a backward); ``False``: never.
    ``example_inputs`` (args tuple, or kwargs dict): plan now rather than on the first call, so
    the parameters are sharded (and a ``meta``-device model's shards allocated, on ``device``,
    default the group's) before ``tp_compile`` returns; ``init_weights`` initialises those:
    see ``tpcompile.checkpoint.prepare`` and docs/checkpoints.md. Needed before ``fully_shard``.
    ``check_replicas_every``: on the first 3 calls and then every N-th, check that the parameters
    replicated over the TP group are bitwise equal on every rank (one checksum each, one small
    all-gather) and raise ``TPDivergenceError`` naming the first that is not; 0 turns it off.
    ``async_tp``: with ``sequence_parallel=True`` on CUDA + NCCL, Inductor's async TP
    (``_micro_pipeline_tp``) splits each all-gather -> matmul and matmul -> reduce-scatter into
    pipelined chunks that overlap communication with compute (symmetric memory is enabled for
    the TP group); the numbers are unchanged.
    ``regional``: regional compilation: the repeated blocks (the largest ``ModuleList`` of one class)
    are captured, planned and compiled once and that program runs every layer, so compile time
    stays nearly flat in depth; the plan, collectives and numbers are the whole graph's. ``None``
    (default): on wherever that holds, the whole graph planned otherwise (sequence parallelism, fused
    norms, one rank, per-layer overrides, a block that is not a TP region of its own, a graph break
    inside a block), and a block whose hooks or training flags differ from the first block's traced
    inline; ``True``: the same, with a ``TPWarning`` when it falls back; ``False``: one graph of every
    layer.
    ``compile_options``: passed to ``torch.compile`` (``dynamic``, ``fullgraph``, ...; ``mode`` and
    ``options`` go to Inductor); ``backend`` picks what compiles the rewritten graph:
    ``"inductor"`` (default), ``"aot_eager"`` or ``"eager"``.
    """
    default_group_from_launcher()
    if getattr(model, "_tp_state", None) is not None:
        raise RuntimeError("tp_compile: this module is already tensor-parallel.")
    if mesh is not None:
        group = _tp_of(mesh, group, example_inputs)
    state = TensorParallel(model, group, plan, compile_options, sequence_parallel=sequence_parallel,
                           sharded_outputs=sharded_outputs, broadcast_inputs=broadcast_inputs, fuse_norm=fuse_norm,
                           dump_dir=dump_dir, check_replicas_every=check_replicas_every, async_tp=async_tp,
                           regional=regional, expert_parallel=expert_parallel)
    model._tp_state = state
    model.forward = state.model_forward = _signed_like(model.forward, state.forward)
    hf.install(model, state)  # Hugging Face's generate / save_pretrained on the tp-compiled model
    from tpcompile import checkpoint  # checkpoint-facing side: state dicts, meta-device models

    checkpoint.install_state_dict_hooks(model)
    checkpoint.prepare(model, state, example_inputs, init_weights, device)
    if mesh is not None:
        state.data_parallel = apply_data_parallel(model, mesh)
    return model


def _signed_like(forward, tp_forward):
    """``tp_forward`` under ``forward``'s name and signature: callers that read the signature (the HF
    Trainer keeps only the dataset columns ``forward`` names) see the model's own."""

    @functools.wraps(forward)
    def tp_model_forward(*args, **kwargs):
        return tp_forward(*args, **kwargs)

    return tp_model_forward


def default_group_from_launcher() -> None:
    """Initialise the default process group from torchrun's environment if nobody has: Hugging Face
    Trainer scripts never call ``init_process_group`` (accelerate does, later, and reuses one that
    exists), and HF's own ``from_pretrained(tp_plan=...)`` initialises it the same way. NCCL on CUDA
    (on the device ``LOCAL_RANK`` names), gloo otherwise; said once with a ``TPWarning``."""
    if dist.is_initialized():
        return
    if not all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        raise RuntimeError("tp_compile needs torch.distributed: launch with torchrun (tp_compile then initialises the "
                           "default process group itself) or call torch.distributed.init_process_group() first.")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    warnings.warn(f"tpcompile: initialised the default process group from torchrun's environment ({backend}, "
                  f"{dist.get_world_size()} ranks); tensor parallelism runs over all of them unless tp_compile gets a "
                  f"group= or mesh=.", TPWarning, stacklevel=3)


def _rng_digest(device: torch.device) -> bytes:
    """8 bytes of this process's RNG state (CPU, and the device's on CUDA)."""
    h = hashlib.sha256(torch.get_rng_state().numpy().tobytes())
    if device.type == "cuda":
        h.update(torch.cuda.get_rng_state(device).numpy().tobytes())
    return h.digest()[:8]


def same_rng_on_tp_ranks(state: TensorParallel) -> None:
    """Give every TP rank the first rank's RNG state (CPU, and CUDA on an NCCL group).

    Sampled tokens are inputs of the next step: a rank that draws another token computes another
    sequence, and the collectives then mix the two (the inference version of the silent TP bug).
    The logits every rank samples from are bitwise the same (gathered, or combined by the
    vocab-parallel sampler), so with the same generator state every rank draws the same token."""
    src = dist.get_global_rank(state.group, 0)
    cpu = torch.get_rng_state()
    t = cpu.to(state.device)
    dist.broadcast(t, src=src, group=state.group)
    torch.set_rng_state(t.cpu())
    if state.device.type == "cuda":
        g = torch.cuda.get_rng_state().to(state.device)
        dist.broadcast(g, src=src, group=state.group)
        torch.cuda.set_rng_state(g.cpu())


def _tp_of(mesh, group, example_inputs):
    """The TP slice of ``tp_compile(mesh=...)``'s mesh, after checking what the one-call form needs."""
    names = tuple(mesh.mesh_dim_names or ())
    if group is not None:
        raise ValueError("tp_compile: pass mesh= (TP over mesh['tp'], FSDP2 over its data-parallel dims) or group=, "
                         "not both.")
    if "tp" not in names:
        raise ValueError(f"tp_compile(mesh=...): the mesh needs a 'tp' dim (it has {names}); e.g. "
                         f"init_device_mesh(device, (dp, tp), mesh_dim_names=('dp', 'tp')).")
    if data_parallel_mesh(mesh)[0] is not None and example_inputs is None:
        raise ValueError("tp_compile(mesh=...) with a data-parallel dim needs example_inputs=(a batch like the real "
                         "ones): FSDP2 shards the planned tensor-parallel parameters, so the plan must exist first.")
    return mesh["tp"] if mesh.ndim > 1 else mesh


def tp_state(model: nn.Module) -> TensorParallel:
    """The ``TensorParallel`` state of a tp-compiled module (plan, graph records, group)."""
    state = getattr(model, "_tp_state", None)
    if state is None:
        raise ValueError("not a tp_compile'd module")
    return state
