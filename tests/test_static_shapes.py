"""The compiled program sees every local shard with static sizes, also when batch and sequence are symbolic.

The backend swaps Dynamo's ghost parameters for this rank's local shards before AOTAutograd.
A tensor Dynamo never saw gets fresh symbolic sizes with no guard source there: the kernels
are then compiled for any size, and a guard on such a size (e.g. the ``-1`` of
``view(B, T, -1, head_dim)`` after a column-parallel projection, as Hugging Face's Llama
writes it) fails while Dynamo builds its guards (IndexError in ``produce_guards_verbose``).
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tpcompile
from fakepg import fake_group


class InferredHeads(nn.Module):
    """One attention block whose head count is inferred by ``view(B, T, -1, head_dim)``."""

    def __init__(self, dim: int = 32, head_dim: int = 8, vocab: int = 64):
        super().__init__()
        self.head_dim = head_dim
        self.emb = nn.Embedding(vocab, dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx, targets):
        x = self.emb(idx)
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
        logits = self.lm_head(x + self.o(y))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _symbolic_placeholders(gm: torch.fx.GraphModule) -> list[str]:
    return [
        n.name
        for n in gm.graph.nodes
        if n.op == "placeholder"
        and isinstance(n.meta.get("val"), torch.Tensor)
        and any(isinstance(s, torch.SymInt) for s in n.meta["val"].shape)
    ]


def _model(model_name: str):
    torch.manual_seed(0)
    if model_name == "gpt":
        import gpt

        return gpt.make_model()
    return InferredHeads(), (torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))


@pytest.mark.parametrize("model_name", ["gpt", "inferred_heads"])
def test_local_shards_have_static_sizes(model_name):
    model, (x, y) = _model(model_name)
    with fake_group(2):
        model = tpcompile.tp_compile(model, backend="aot_eager")
        model(x, y).backward()
        rec = tpcompile.tp_state(model).records[0]
        assert [phase for phase, _ in rec.compiled_graphs] == ["forward", "backward"]
        for phase, gm in rec.compiled_graphs:
            assert _symbolic_placeholders(gm) == [], f"{phase} graph has symbolic sizes"
        assert rec.plan["q.weight" if model_name != "gpt" else "h.0.attn.q_proj.weight"].style == "colwise"


@pytest.mark.parametrize("model_name", ["gpt", "inferred_heads"])
def test_symbolic_batch_and_sequence_keep_local_shards_static(model_name):
    """``mark_dynamic`` on batch and sequence: the activations are symbolic (``view(B, T, -1, hd)``
    next to symbolic B, T; ``flatten(0, 1)``), the local shards still static, the plan the same."""
    model, (x, y) = _model(model_name)
    for t in (x, y):
        torch._dynamo.mark_dynamic(t, 0)
        torch._dynamo.mark_dynamic(t, 1)
    with fake_group(2):
        model = tpcompile.tp_compile(model, backend="aot_eager")
        model(x, y).backward()
        (rec,) = tpcompile.tp_state(model).records
        fw = dict(rec.compiled_graphs)["forward"]
        tokens = [n.name for n in fw.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)
                  and n.meta["val"].dtype == torch.int64]
        assert len(tokens) == 2 and _symbolic_placeholders(fw) == tokens, "only idx / targets are symbolic"
        assert rec.plan["q.weight" if model_name != "gpt" else "h.0.attn.q_proj.weight"].style == "colwise"
