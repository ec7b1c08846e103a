"""Attention written the ways real models write it stays head-sharded, at the floor, at parity.

- rotary embeddings through complex numbers (``view_as_complex`` / ``*`` a ``freqs_cis`` buffer /
  ``view_as_real``: Meta's llama reference, torchtitan): views that drop / add the last dim of 2;
- scores and weighted values with ``einsum`` (``'bhqd,bhkd->bhqk'``, ``'bqhd,bkhd->bhqk'``, an
  ellipsis): a batched contraction over the heads label every operand is sharded on;
- ``einops.rearrange`` for the head split: the reshape / permute it stands for;
- learned position (and token-type) tables looked up with a buffer (HF BERT): replicated, only
  the word embedding vocab-parallel (Megatron);
- a relative position bias ``[buckets, heads]`` added to the scores (HF T5): the table
  column-parallel on its heads, no gather of the bias gradient.
Plans and collective counts on a fake group (``explain``); training parity on gloo for the
hand-written blocks here, and for BERT / T5 in ``tests/test_hf_models.py`` (MORE).
"""
import functools

import pytest
import torch

import attention_spellings as A
import tpcompile
from models_common import assert_at_floor, assert_parity
from multirank import run_cases

_QKV = ("wq", "wk", "wv")


@pytest.mark.parametrize("cls", A.ALL, ids=lambda c: c.__name__)
@pytest.mark.parametrize("world", [2, 4])
def test_attention_spelling_is_head_sharded_at_the_floor(cls, world):
    model, x = A.make(cls)
    rep = tpcompile.explain(model, x.requires_grad_(), world_size=world)
    for name in _QKV:
        assert (rep.params[f"{name}.weight"].style, rep.params[f"{name}.weight"].dim) == ("colwise", 0)
        assert rep.params[f"{name}.weight"].local_shape == (A.D // world, A.D)
    assert (rep.params["wo.weight"].style, rep.params["wo.weight"].dim) == ("rowwise", 1)
    assert rep.counts() == {("forward", "all_reduce"): 1, ("backward", "all_reduce"): 1}
    assert rep.above_floor() == {"forward": 0, "backward": 0}
    assert rep.warnings == []


class _Embeddings(torch.nn.Module):
    """Word, position and token-type tables, all three looked up with the user's inputs."""

    def __init__(self, vocab=64, positions=16, dim=32):
        super().__init__()
        self.tok, self.pos, self.typ = (torch.nn.Embedding(n, dim) for n in (vocab, positions, 2))
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, ids, position_ids, token_type_ids):
        h = self.tok(ids) + self.pos(position_ids) + self.typ(token_type_ids)
        return torch.nn.functional.cross_entropy(self.head(h).flatten(0, 1), ids.flatten())


def test_only_the_largest_input_indexed_table_is_vocab_parallel():
    """Positions and token types passed as inputs (packed sequences do) are still not the vocabulary:
    replicated, no all-reduce for them; the word embedding is vocab-parallel."""
    ids = torch.randint(0, 64, (2, 8))
    pos, typ = torch.arange(8).expand(2, 8), torch.zeros(2, 8, dtype=torch.long)
    rep = tpcompile.explain(_Embeddings(), ids, pos, typ, world_size=2)
    assert rep.plan == {"tok.weight": "vocab", "pos.weight": "replicate", "typ.weight": "replicate",
                        "head.weight": "colwise", "head.bias": "colwise"}
    # forward: the embedding's all-reduce, the loss's all-gather; backward: the f before the head
    assert rep.counts() == {("forward", "all_reduce"): 1, ("forward", "all_gather"): 1, ("backward", "all_reduce"): 1}
    assert rep.above_floor() == {"forward": 0, "backward": 0} and rep.warnings == []


def _hf(family: str):
    import hf_models

    model = hf_models.make_model(family)
    ids = torch.randint(1, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    return model, ids


def test_bert_position_and_token_type_tables_stay_whole():
    """``position_ids`` / ``token_type_ids`` are buffers: not the user's tokens, so those tables are
    replicated (no all-reduce); the word embedding is vocab-parallel. TP=4 (TP=2: gloo parity)."""
    pytest.importorskip("transformers")
    model, ids = _hf("bert")
    rep = tpcompile.explain(model, input_ids=ids, labels=ids, world_size=4)
    emb = "bert.embeddings."
    assert rep.plan[emb + "word_embeddings.weight"] == "vocab"
    assert rep.plan[emb + "position_embeddings.weight"] == rep.plan[emb + "token_type_embeddings.weight"] == "replicate"
    layers = 2
    assert rep.floor["forward"] == {"row-parallel linear": 2 * layers, "vocab-parallel embedding": 1, "vocab-parallel loss": 1}
    # at the floor, plus the all-gather of the returned logits
    assert rep.counts() == {("forward", "all_reduce"): 2 * layers + 1, ("forward", "all_gather"): 2,
                            ("backward", "all_reduce"): 2 * layers + 1}
    assert rep.above_floor() == {"forward": 1, "backward": 0}
    # the one warning: the MLM head's dense feeds a LayerNorm over its features (replicated, as in Megatron)
    assert len(rep.warnings) == 1 and "cls.predictions.transform.dense" in rep.warnings[0]


def test_t5_relative_position_bias_is_sharded_on_its_heads():
    """The bias table ``[buckets, heads]`` is column-parallel: its lookup is this rank's heads of the
    bias, added to head-sharded scores; no all-gather of its gradient in the backward. TP=4."""
    pytest.importorskip("transformers")
    model, ids = _hf("t5")
    rep = tpcompile.explain(model, input_ids=ids, labels=ids, world_size=4)
    for stack in ("encoder", "decoder"):
        pp = rep.params[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        assert (pp.style, pp.dim, pp.local_shape) == ("colwise", 1, (32, 1))
    assert rep.plan["shared.weight"] == "vocab"
    rows = 2 * 2 + 2 * 3  # encoder: attention + MLP per layer; decoder: + cross-attention
    cols = 2 * 2 + 2 * 3 + 1 + 1  # their input projections (cross-attention k/v read the encoder output), LM head
    assert rep.counts() == {("forward", "all_reduce"): rows + 2, ("forward", "all_gather"): 2,
                            ("backward", "all_reduce"): cols}
    assert rep.above_floor() == {"forward": 1, "backward": 0}  # the returned logits' all-gather
    assert rep.warnings == []


@functools.cache
def _trained(world: int) -> dict:
    names = [c.__name__ for c in A.ALL]
    return dict(zip(names, run_cases(world, [(A.train, (n,)) for n in names])))


@pytest.mark.parametrize("cls", A.ALL, ids=lambda c: c.__name__)
def test_attention_spelling_trains_like_single_device(cls):
    """3 SGD steps on 2 gloo ranks (TP=4 plans: above); the third batch has another sequence length
    (a dynamic-shape recompile: ``rearrange`` and the views get symbolic sizes)."""
    r = assert_parity(_trained(2)[cls.__name__])
    assert r["plan"]["wq.weight"] == ("colwise", 0, 1) and r["plan"]["wo.weight"] == ("rowwise", 1, 1)
    assert r["n_graphs"] == 2 and r["warnings"] == []
    assert_at_floor(r)


def _rearranges():
    from einops import rearrange

    return {  # literal lengths, as a model's `h=self.n_heads` (Dynamo specialises those)
        "b t (h d) -> b h t d": lambda x: rearrange(x, "b t (h d) -> b h t d", h=4),
        "b h t d -> b t (h d)": lambda x: rearrange(x.view(2, -1, 4, 8), "b h t d -> b t (h d)"),
        "b t (h d) -> (b h) t d": lambda x: rearrange(x, "b t (h d) -> (b h) t d", d=8),
        "... (h d) -> ... h d": lambda x: rearrange(x, "... (h d) -> ... h d", h=2),
        "b t d -> b 1 t d": lambda x: rearrange(x, "b t d -> b 1 t d"),
        "b (t two) d -> b t (d two)": lambda x: rearrange(x, "b (t two) d -> b t (d two)", two=2),
    }


@pytest.mark.parametrize("pattern", list(_rearranges()))
def test_rearrange_becomes_the_views_it_stands_for(pattern):
    """``passes/normalize.py`` replaces ``einops.rearrange`` by reshape / permute nodes: the same values
    (against einops itself), the ``rearrange`` gone, also with symbolic sizes (``dynamic=True``)."""
    from tpcompile.passes.normalize import normalize

    left = []

    def backend(gm, example_inputs):
        normalize(gm, set())
        left.extend(n for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "rearrange")
        return gm.forward

    fn = _rearranges()[pattern]
    x = torch.randn(2, 6, 32)
    torch._dynamo.reset()
    for dynamic in (False, True):
        out = torch.compile(fn, backend=backend, dynamic=dynamic, fullgraph=True)(x)
        assert torch.equal(out, fn(x)), (pattern, dynamic)
        torch._dynamo.reset()
    assert left == []
