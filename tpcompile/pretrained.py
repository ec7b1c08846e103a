"""``from_pretrained``: a published checkpoint directory to a tensor-parallel model in one call.

Serving starts from a directory in the model library's layout (``config.json`` + sharded
``*.safetensors`` + index). The steps are the ones docs/checkpoints.md describes by hand: the
architecture built on ``meta`` from the config (no rank ever holds the whole model), planned on a
small synthetic batch, its shards allocated and initialised (HF's ``_init_weights`` also sets the
non-persistent buffers no checkpoint holds, such as rotary ``inv_freq``), then only this rank's
slices read from the files.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.nn as nn


def from_pretrained(path_or_class: Any, path: str | os.PathLike | None = None, *, example_length: int = 8,
                    dtype: torch.dtype | None = None, eval: bool = True, **tp_kwargs: Any) -> nn.Module:
    """A tp-compiled model loaded from a ``save_pretrained`` directory, each rank reading its slices.

    ``tpcompile.from_pretrained(path)`` takes the class named in ``config.json``
    (``architectures[0]``); ``tpcompile.from_pretrained(LlamaForCausalLM, path)`` a class of your
    own choosing. ``example_length``: tokens of the synthetic batch (one row of token ids) that
    plans the model; ``dtype``: the parameters' dtype (default: the config's ``torch_dtype``, else
    float32); ``eval``: return the model in eval mode (serving; planned under ``no_grad``, as it runs:
    an LM head with no loss behind it vocab-sharded, see ``passes/propagate.py``). ``tp_kwargs`` go to ``tp_compile``
    (``group``, ``backend``, ``plan``, ...). The shape of ``AutoModelForCausalLM.from_pretrained(path,
    tp_plan="auto")``, with no plan.
    """
    import transformers as tf

    import tpcompile

    if isinstance(path_or_class, (str, os.PathLike)):
        cls, path = None, path_or_class
    else:
        cls = path_or_class
    if path is None:
        raise ValueError("tpcompile.from_pretrained(ModelClass, path): the checkpoint directory is missing")
    path = os.fspath(path)
    config = tf.AutoConfig.from_pretrained(path)
    if cls is None:
        names = getattr(config, "architectures", None) or []
        cls = getattr(tf, names[0], None) if names else None
        if cls is None:
            raise ValueError(f"tpcompile.from_pretrained({path!r}): config.json names no architecture transformers "
                             f"has ({names}); pass the model class: from_pretrained(ModelClass, path)")
    dtype = dtype or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = cls(config).to(dtype)
    if eval:
        model.eval()
    vocab = int(getattr(config, "vocab_size", 2))
    ids = torch.randint(0, vocab, (1, example_length), generator=torch.Generator().manual_seed(0))
    # a serving model is planned as it runs, under no_grad: its LM head vocab-sharded (1/tp per rank)
    with torch.no_grad() if eval else contextlib.nullcontext():
        model = tpcompile.tp_compile(model, example_inputs={"input_ids": ids}, init_weights=model._init_weights,
                                     **tp_kwargs)
    tpcompile.load_checkpoint(model, path)
    return model
