"""Hugging Face GPT-2 (``transformers``) for tests/test_models.py: trained with a new sequence
length every step, as a real data loader, evaluation or generation gives.

GPT-2 is the fused-QKV case: ``Conv1D`` weights stored ``[in, out]`` (``torch.addmm`` on
``x.view(-1, in)``, then ``view(size_out)``), ``c_attn``'s output split into q, k, v, learned
positions, a tied LM head over a vocabulary of 250 (padded at TP=4). With ``dynamic=None``
Dynamo compiles the first length static and, on the second, one graph with a symbolic
sequence dim that serves every later length: 2 graphs for 4 lengths, each at the floor
(``sharded_outputs=True``: the logits are not gathered, training reads only the loss).
"""
from __future__ import annotations

import torch

from hf_models import make_model
from models_common import assert_at_floor, assert_parity, train_beside

LENGTHS = (16, 8, 12, 10)


def lm_batches(vocab: int, lengths=LENGTHS, batch_sizes=(2,)) -> list:
    """``(input_ids, labels)`` per step, the sequence length (and batch size) changing every step;
    the first two labels ignored, as padding in a real batch."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i, t in enumerate(lengths):
        ids = torch.randint(0, vocab, (batch_sizes[i % len(batch_sizes)], t), generator=g)
        labels = ids.clone()
        labels[:, :2] = -100
        out.append((ids, labels))
    return out


def lm_loss(model, batch, mark_dynamic: bool = False):
    """The HF way: ``model(input_ids=..., labels=...).loss``. ``mark_dynamic``: batch and sequence
    dims marked dynamic on the inputs (``torch._dynamo.mark_dynamic``), as a user who knows does."""
    ids, labels = batch
    if mark_dynamic:
        ids, labels = ids.clone(), labels.clone()
        for t in (ids, labels):
            torch._dynamo.mark_dynamic(t, 0)
            torch._dynamo.mark_dynamic(t, 1)
    return model(input_ids=ids, labels=labels).loss


def changing_lengths(rank: int, world: int) -> dict:
    model = make_model("gpt2", n_layer=1)  # one block: what changes with the length is all in it
    # sharded_outputs: the loss is all training reads; the [B, T, V] logits stay sharded (no gather)
    return train_beside(rank, world, model, lm_batches(model.config.vocab_size), lm_loss, sharded_outputs=True)


CASES = {"gpt2_changing_lengths": (changing_lengths, ())}


def check(name: str, world: int, results: list) -> None:
    r = assert_parity(results)
    assert_at_floor(r)
    assert r["n_graphs"] == 2, f"{r['n_graphs']} graphs for {len(LENGTHS)} lengths: one static, then one dynamic"
    plan = r["plan"]
    h = "transformer.h.0"
    assert plan[f"{h}.attn.c_attn.weight"] == ("colwise", 1, 3), plan[f"{h}.attn.c_attn.weight"]  # [in, 3C]: q, k, v
    assert plan[f"{h}.attn.c_attn.bias"] == ("colwise", 0, 3)
    assert plan[f"{h}.attn.c_proj.weight"] == ("rowwise", 0, 1)
    assert plan[f"{h}.mlp.c_fc.weight"] == ("colwise", 1, 1)
    assert plan[f"{h}.mlp.c_proj.weight"] == ("rowwise", 0, 1)
    assert plan["transformer.wte.weight"][0] == "vocab"
    assert r["local_numel"] < r["full_numel"] * 0.75
