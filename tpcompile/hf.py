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

import functools

import torch.distributed as dist
import torch.nn as nn


def install(model: nn.Module, state) -> None:
    """Wrap ``model.generate`` and ``model.save_pretrained`` (as instance attributes) where it has them."""
    if callable(getattr(model, "generate", None)):
        model.generate = _generating(model.generate, state)
    if callable(getattr(model, "save_pretrained", None)) and hasattr(model, "config"):
        model.save_pretrained = _saving(model.save_pretrained, model)


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
