"""torchtune's Llama 3 (``torchtune.models.llama3.llama3``: GQA, RoPE, SwiGLU, RMSNorm as
``F.rms_norm``, i.e. ``torch.rms_norm`` in the graph), random weights, trained with
``sequence_parallel=True`` beside its single-device copy: parity, the plan, and the SP floor
(``passes/sequence_parallel.py`` ``floor_with_sp``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models_common import assert_at_floor, assert_parity, train_beside

VOCAB, B, T = 128, 2, 16  # T divides by 4: each rank keeps T / tp tokens of the residual stream


class _WithLoss(torch.nn.Module):
    """The user's training step: cross-entropy on torchtune's logits."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(tokens).flatten(0, 1), targets.flatten())


def _llama3(rank: int, world: int, sequence_parallel: bool) -> dict:
    from torchtune.models.llama3 import llama3

    torch.manual_seed(0)
    model = _WithLoss(llama3(vocab_size=VOCAB, num_layers=2, num_heads=8, num_kv_heads=4, embed_dim=64,
                             max_seq_len=64))
    g = torch.Generator().manual_seed(1)
    batches = [tuple(torch.randint(0, VOCAB, (B, T), generator=g) for _ in range(2)) for _ in range(3)]
    return train_beside(rank, world, model, batches, lambda m, b: m(*b), sequence_parallel=sequence_parallel)


CASES = {"llama3_sequence_parallel": (_llama3, (True,))}


def check(name: str, world: int, results: list) -> None:
    r = assert_parity(results)
    plan = r["plan"]
    for i in range(2):
        layer = f"model.layers.{i}"
        for p in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.w1", "mlp.w3"):
            assert plan[f"{layer}.{p}.weight"][0] == "colwise", (p, plan[f"{layer}.{p}.weight"])
        for p in ("attn.output_proj", "mlp.w2"):
            assert plan[f"{layer}.{p}.weight"][0] == "rowwise", (p, plan[f"{layer}.{p}.weight"])
        assert plan[f"{layer}.sa_norm.scale"][0] == plan[f"{layer}.mlp_norm.scale"][0] == "replicate"
    assert plan["model.tok_embeddings.weight"][0] == "vocab" and plan["model.output.weight"][0] == "colwise"
    assert r["n_graphs"] == 1 and not r["warnings"], r["warnings"]
    assert_at_floor(r)
    # SP: reduce-scatters into the token-sharded stream (2 per layer + the embedding), no all-reduce forward
    kinds = [k for _, ph, k in r["collectives"] if ph == "forward"]
    assert kinds.count("reduce_scatter") == 5 and "all_reduce" not in kinds, kinds
