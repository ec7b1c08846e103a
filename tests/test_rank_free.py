"""One compiled program for every TP rank (issue 17, item 2).

No constant of a rewritten graph depends on the rank: vocab offsets, kv-copy rows, dropout slices and
splits read it when the program runs (``runtime.mappings.tp_rank``, a custom op whose input keeps
compilers from folding it). So every rank's rewritten graph and AOT forward / backward graphs are the
same text, and a cache warmed by one rank's Inductor compile is an FX-graph cache hit for another.
On the fake group: graphs and Inductor run exactly as on that rank, collectives are no-ops.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._inductor.codecache import PyCodeCache

import gpt
import kv_models
import llama
import tpcompile
from fakepg import fake_group


def _graphs(make, world: int, rank: int, **kw) -> list:
    """The rewritten graph and the AOT forward / backward graphs (code text) of rank ``rank``
    (``no_grad`` in ``kw``: an inference graph, forward only)."""
    model, args = make()
    inference = kw.pop("no_grad", False)
    with torch.set_grad_enabled(not inference):
        rep = tpcompile.explain(model, *args, world_size=world, rank=rank, **kw)
    out = [("rewritten", r.graph_code) for r in rep.records]
    out += [(phase, gm.code) for r in rep.records for phase, gm in r.compiled_graphs]
    want = {"rewritten", "forward"} | (set() if inference else {"backward"})
    assert {p for p, _ in out} >= want, [p for p, _ in out]
    return out


def _mixtral():
    import hf_models

    model = hf_models.make_model("mixtral", _experts_implementation="grouped_mm", num_hidden_layers=1)
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    return model, (ids,)


def _sampling_step():
    import sampling_cases

    model = sampling_cases.SamplingLM(vocab=127).eval()
    return model, (torch.zeros(2, 1, dtype=torch.long), torch.tensor([5]), torch.arange(model.max_len)[None, :] <= 5)


def _first(made):
    model, batches = made
    return model, batches[0]


CASES = {  # name -> (model factory, tp, explain options, ops whose offsets were the rank's)
    "gpt dropout padded vocab": (lambda: gpt.make_model(n_layer=1, dropout=0.1, vocab_size=250), 4, {},  # 63 rows a rank
                                 ("vocab_parallel_embedding", "sharded_sdpa", "ce_stats_at_rank", "ce_grad_at_rank")),
    "gpt sp dropout": (lambda: gpt.make_model(n_layer=1, dropout=0.1), 2, {"sequence_parallel": True},
                       ("reduce_scatter_to_sp", "sharded_dropout", "sharded_sdpa", "vocab_parallel_cross_entropy")),
    "llama": (lambda: llama.make_model(n_layers=1, device="meta"), 4, {},
              ("vocab_parallel_embedding", "vocab_parallel_cross_entropy")),
    "kv copies": (lambda: _first(kv_models.make(2, "repeat_kv", layers=1)), 4, {}, ("take_rows_of", "copies_to_shard")),
    "expert parallel": (_mixtral, 2, {"expert_parallel": True}, ("local_experts_linear",)),
    "vocab-parallel sampling": (_sampling_step, 4, {"no_grad": True},  # padded vocab: 32 columns a rank
                                ("vocab_parallel_topk", "vocab_parallel_softmax", "sharded_fill_random",
                                 "vocab_parallel_argmax")),
}


def test_every_rank_rewrites_the_same_graph():
    for name, (make, world, kw, ops) in CASES.items():
        first = _graphs(make, world, 0, **dict(kw))
        code = "\n".join(c for _, c in first)
        for op in ops:  # the case exercises what used to carry the rank
            assert op in code, (name, op, code)
        assert any("tpcompile.tp_rank" in c for p, c in first if p != "rewritten"), name
        last = _graphs(make, world, world - 1, **dict(kw))
        assert [p for p, _ in first] == [p for p, _ in last], name
        for (phase, a), (_, b) in zip(first, last):
            assert a == b, (name, phase)


class TinyLM(nn.Module):
    """Vocab-parallel embedding and loss, a column -> row MLP with dropout on its sharded hidden."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(64, 32), nn.Linear(32, 64, bias=False)
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, idx, target):
        h = self.emb(idx)
        h = h + self.down(F.dropout(F.gelu(self.up(h)), 0.1))
        return F.cross_entropy(self.head(h).flatten(0, 1), target.flatten())


def test_one_rank_warms_the_inductor_cache_for_another(tmp_path, monkeypatch):
    code = tpcompile.explain(TinyLM(), torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long),
                             world_size=2, rank=1).records[0].graph_code
    for op in ("vocab_parallel_embedding(", "sharded_dropout(", "vocab_parallel_cross_entropy("):
        assert op in code, (op, code)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    seen = []
    for rank in (0, 1):
        counters.clear()
        loaded = len(PyCodeCache.modules)
        with fake_group(2, rank):
            torch.manual_seed(0)
            model = tpcompile.tp_compile(TinyLM())
            idx = torch.randint(0, 64, (2, 8))
            model(idx, idx).backward()
        # the program rank 1 loaded reads its rank when it runs: Inductor folded no rank 0 into it
        calls = [open(m.__file__).read().count("torch.ops.tpcompile.tp_rank.default(") for m in PyCodeCache.modules[loaded:]]
        seen.append((counters["inductor"]["fxgraph_cache_miss"], counters["inductor"]["fxgraph_cache_hit"]))
    assert os.listdir(tmp_path), "Inductor wrote no cache"
    assert seen == [(2, 0), (0, 2)], seen  # rank 0: forward + backward compiled; rank 1: both from rank 0's entries
    assert sum(calls) == 3, calls  # the offsets of the embedding, the dropout mask slice and the loss (forward)


def test_rank_ops_pass_opcheck_and_read_the_rank_when_they_run():
    from tpcompile.runtime import ce_kernels
    from tpcompile.runtime import mappings as M
    from tpcompile.runtime import vocab_parallel as V

    with fake_group(4, 3) as group:
        name = group.group_name
        x = torch.randn(5, 7, requires_grad=True)
        logits, target = torch.randn(6, 4), torch.tensor([0, 3, 12, 13, 15, -100])  # V = 14: rank 3 holds 12, 13
        lse, scale = torch.randn(6), torch.rand(6)
        for op, args in ((M.tp_rank, (x, name)), (V.ce_stats_at_rank, (logits, target, name, 14, True, "torch")),
                         (V.ce_grad_at_rank, (logits, target, lse, scale, name, 0.1, 14, "torch"))):
            torch.library.opcheck(op, args)
        assert M.tp_rank(x, name).item() == 3
        assert torch.equal(M.narrow_at_rank(x, 1, 2, name, start=1, div=2), x[:, 3:5])  # 1 + (3 // 2) * 2
        assert torch.equal(M.narrow_at_rank(x, 0, 1, name, mod=2), x[1:2])  # (3 % 2) * 1
        assert torch.equal(V.ce_stats_at_rank(logits, target, name, 14, True, "torch"),
                           ce_kernels.ce_stats(logits, target, 12, 2, True))
        assert torch.equal(V.ce_grad_at_rank(logits, target, lse, scale, name, 0.1, 14, "torch"),
                           ce_kernels.ce_grad(logits, target, lse, scale, 12, 2, 0.1, 14))
