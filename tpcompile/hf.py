"""What a Hugging Face user calls on the model itself, made right on a tp-compiled one.

``generate``: every TP rank starts from TP rank 0's random-number state, so sampled tokens (the
next step's inputs) are the same on every rank. ``save_pretrained`` (and ``push_to_hub``, which
calls it): every rank takes part in gathering the full single-device state dict
(``tpcompile.full_state_dict``: padded vocabularies cut back, fused pieces and kv copies in place,
tied weights one tensor), then global rank 0 alone writes it through Hugging Face's own
``save_pretrained(state_dict=...)``, so the files, shards and index are HF's; the others wait.
Without this, safetensors reads a DTensor's storage pointer and raises, and the ranks hang.
"""
from __future__ import annotations

import contextlib
import functools

import torch.distributed as dist
import torch.nn as nn


def install(model: nn.Module, state) -> None:
    """Wrap ``model.generate`` and ``model.save_pretrained`` (as instance attributes) where it has them."""
    if callable(getattr(model, "generate", None)):
        model.generate = _generating(model.generate, state)
    if callable(getattr(model, "save_pretrained", None)) and hasattr(model, "config"):
        model.save_pretrained = _saving(model.save_pretrained, model)
    adapt_trainers()


def _generating(generate, state):
    """``model.generate`` that starts from one RNG state on every TP rank (``api.same_rng_on_tp_ranks``)."""
    from tpcompile.api import same_rng_on_tp_ranks

    @functools.wraps(generate)
    def tp_generate(*args, **kwargs):
        same_rng_on_tp_ranks(state)
        return generate(*args, **kwargs)

    return tp_generate


def _saving(save_pretrained, model: nn.Module):
    """``model.save_pretrained`` called on every rank: the full checkpoint, written once."""

    @functools.wraps(save_pretrained)
    def tp_save_pretrained(save_directory, *args, is_main_process: bool = True, state_dict=None, **kwargs):
        from tpcompile.checkpoint import full_state_dict

        if state_dict is None:  # collective: every rank gathers, rank 0 keeps the full tensors
            state_dict = full_state_dict(model, rank0_only=True)
        if dist.get_rank() == 0 and is_main_process:
            save_pretrained(save_directory, *args, is_main_process=True, state_dict=state_dict, **kwargs)
        dist.barrier()

    return tp_save_pretrained


# ---- the Trainer -------------------------------------------------------------------------------------

OPTIMIZER_DIR = "tp_optimizer"  # in a Trainer checkpoint: the optimizer state, a DCP directory (every rank's shards)


def adapt_trainers() -> None:
    """Make ``transformers.Trainer`` (and its subclasses: TRL's ``SFTTrainer``...) right for a tp-compiled
    model: its ``__init__`` is wrapped once, and a trainer whose model is tp-compiled is adapted
    (``adapt``); any other trainer is left exactly as it was. Done when the Trainer is already imported
    (a script imports it at the top), else by importing it when accelerate, which it needs, is installed."""
    import importlib
    import importlib.util
    import sys

    if "transformers" not in sys.modules:  # nobody here uses Hugging Face
        return
    if "transformers.trainer" not in sys.modules:
        if importlib.util.find_spec("accelerate") is None:
            return
        try:
            importlib.import_module("transformers.trainer")
        except Exception:  # a Trainer that cannot be imported is one nobody will run
            return
    trainer_cls = sys.modules["transformers.trainer"].Trainer
    if getattr(trainer_cls.__init__, "_tpcompile", False):
        return
    init = trainer_cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        model = getattr(self, "model", None)
        if getattr(model, "_tp_state", None) is not None:
            adapt(self, model)

    __init__._tpcompile = True
    trainer_cls.__init__ = __init__


def adapt(trainer, model: nn.Module) -> None:
    """What the Trainer must know about a tp-compiled model, told on its own terms.

    - The model owns its placement and gradient reduction (the TP collectives, and FSDP2 over ``dp``
      with ``tp_compile(mesh=...)``): the trainer's own flag for such models
      (``is_distributed_loading_by_transformers``), so accelerate wraps it in no DDP, and
      ``save_pretrained`` is called on every rank (it gathers; rank 0 writes).
    - Ranks of one TP group read the same rows, dp ranks different ones: accelerate splits the data by
      a device mesh (``dp_shard`` x ``tp``), as for Hugging Face's own TP.
    - ``get_tp_size``: the TP degree, which the Trainer divides token counts and loss scales by.
    - Checkpoints: the optimizer state as a DCP directory (``OPTIMIZER_DIR``, each rank its own shards;
      torch.save of rank 0's would hand rank 0's shards to every rank on resume); resuming reads the
      model's safetensors slices and that directory (``tpcompile.load_checkpoint``).
    - Gradient accumulation with FSDP2 over ``dp``: no reduction until the last micro-batch (the
      trainer's own hook for that reads a Hugging Face ``distributed_config`` this model has not).
    - Evaluation: ``gather_for_metrics`` keeps one copy per TP group (``_metrics_once_per_tp_group``).
    - A forward swapped in after ``tp_compile`` (TRL's SFTTrainer) is refused when training starts.
    """
    import os

    import torch
    from torch.distributed.device_mesh import init_device_mesh

    state = model._tp_state
    world = dist.get_world_size()
    tp_ranks = dist.get_process_group_ranks(state.group)
    first = min(tp_ranks)
    if sorted(tp_ranks) != list(range(first, first + state.tp)) or first % state.tp:
        raise ValueError(f"Trainer with a tp-compiled model: the TP group is ranks {tp_ranks}; the Trainer (accelerate) "
                      f"gives the same rows to consecutive ranks only. Build the mesh with 'tp' as its last dim, "
                      f"e.g. init_device_mesh(device, (dp, tp), mesh_dim_names=('dp', 'tp')).")
    trainer.is_distributed_loading_by_transformers = True
    trainer.accelerator.state.device_mesh = init_device_mesh(
        state.mesh.device_type, (world // state.tp, state.tp), mesh_dim_names=("dp_shard", "tp"))
    trainer.get_tp_size = lambda: state.tp

    def save_optimizer_and_scheduler(output_dir: str) -> None:
        from tpcompile.checkpoint import save_checkpoint
        from transformers.trainer import SCHEDULER_NAME

        save_checkpoint(model, os.path.join(output_dir, OPTIMIZER_DIR), optimizer=_bare(trainer.optimizer))
        if trainer.args.should_save and trainer.lr_scheduler is not None:
            torch.save(trainer.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def load_from_checkpoint(resume_from_checkpoint: str, model_: nn.Module | None = None) -> None:
        from tpcompile.checkpoint import load_checkpoint

        load_checkpoint(model if model_ is None else model_, resume_from_checkpoint)

    def load_optimizer_and_scheduler(checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        from tpcompile.checkpoint import load_checkpoint
        from transformers.trainer import SCHEDULER_NAME

        load_checkpoint(model, os.path.join(checkpoint, OPTIMIZER_DIR), optimizer=_bare(trainer.optimizer))
        sched = os.path.join(checkpoint, SCHEDULER_NAME)
        if trainer.lr_scheduler is not None and os.path.isfile(sched):
            trainer.lr_scheduler.load_state_dict(torch.load(sched, weights_only=True))

    @contextlib.contextmanager
    def defer_fsdp_gradient_reduction():
        """Accumulation micro-batches before the last: FSDP2 (tp_compile(mesh=...)) reduces nothing."""
        from torch.distributed.fsdp import FSDPModule

        root = next((m for m in model.modules() if isinstance(m, FSDPModule)), None)  # recurse=True: all of them
        if root is None:
            yield
            return
        root.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            root.set_requires_gradient_sync(True)

    _metrics_once_per_tp_group(trainer.accelerator, world, state.tp)
    # the trainer took its gather function from the accelerator before (with its eval_use_gather_object)
    trainer.gather_function = functools.partial(trainer.accelerator.gather_for_metrics,
                                                use_gather_object=trainer.args.eval_use_gather_object)
    trainer.add_callback(_ForwardKept(model))
    trainer._defer_fsdp_gradient_reduction = defer_fsdp_gradient_reduction
    trainer._save_optimizer_and_scheduler = save_optimizer_and_scheduler
    trainer._load_from_checkpoint = load_from_checkpoint
    trainer._load_optimizer_and_scheduler = load_optimizer_and_scheduler


def _metrics_once_per_tp_group(accelerator, world: int, tp: int) -> None:
    """``gather_for_metrics`` (evaluation losses, predictions) gathers from every rank and then cuts
    the last batch's padding by the dataset's length: with the TP ranks' identical copies in it, that
    cut kept the wrong rows and the eval loss was silently another one. It now keeps, of what the
    ranks gathered (in rank order, the same size each), the rows of each TP group's first rank.
    Plain ``gather`` is left alone: the Trainer divides token counts gathered with it by the TP size."""
    import torch
    from accelerate.utils import recursively_apply

    gather, gather_for_metrics = accelerator.gather, accelerator.gather_for_metrics

    def gather_dp(data):
        return recursively_apply(lambda t: torch.cat(t.chunk(world)[::tp]), gather(data))

    @functools.wraps(gather_for_metrics)
    def tp_gather_for_metrics(input_data, use_gather_object: bool = False):
        accelerator.gather = gather_dp
        try:
            return gather_for_metrics(input_data, use_gather_object=use_gather_object)
        finally:
            del accelerator.gather

    accelerator.gather_for_metrics = tp_gather_for_metrics


def _bare(optimizer):
    """The torch optimizer inside accelerate's wrapper (its ``param_groups`` and ``state`` are the real ones)."""
    return getattr(optimizer, "optimizer", optimizer)


def _forward_kept_check(model: nn.Module) -> None:
    """A trainer that replaced ``model.forward`` after ``tp_compile`` (TRL's SFTTrainer puts in its fused
    LM head, which calls the backbone and the head's weight itself) would run the model's sharded
    DTensor parameters eagerly, outside the compiled program: refused with what replaced it. Wrappers
    that still call tp_compile's forward (accelerate's output casts) name it in ``__wrapped__``."""
    chain, f = [], model.__dict__.get("forward")
    for _ in range(16):
        f = getattr(f, "__func__", f)
        if f is getattr(model._tp_state, "model_forward", None):
            return
        code = getattr(f, "__code__", None)
        if code is not None:
            chain.append(f"{'/'.join(code.co_filename.split('/')[-3:])}:{code.co_firstlineno}")
        f = getattr(f, "__wrapped__", None)
        if f is None:
            break
    raise RuntimeError(
        f"tpcompile: model.forward was replaced after tp_compile (by {' -> '.join(chain) or repr(f)}) with code that "
        f"runs the model's submodules itself: their parameters are tensor-parallel DTensors that only tp_compile's "
        f"forward runs. TRL's SFTTrainer does this for its fused LM head: not supported yet (the Hugging Face Trainer "
        f"is). Train with a trainer that calls the model itself.")


def _ForwardKept(model: nn.Module):
    from transformers import TrainerCallback

    class ForwardKept(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            _forward_kept_check(model)

    return ForwardKept()
