"""Acceptance: ``generate()`` of tp-compiled Hugging Face models, called as HF users call it.

Tiny configs of Llama (GQA 8/4), GPT-2 (fused c_attn, tied vocab-parallel head), Qwen2 (2 kv heads:
fewer than tp at TP=4) and Gemma (MQA: 1 kv head), ``model.eval()``, a batch of 2 left-padded
prompts with an attention mask, the default dynamic cache, on 2 and 4 gloo ranks (one spawned group
per degree for every case). Greedy tokens equal single device's on every rank. The KV cache the
model hands back to HF stays head-sharded between graphs (``tpcompile.twin.state_ghost``): each
rank holds 1/tp of it where tp divides the kv heads, its kv head where there are fewer kv heads
than tp (kv-head copies: 1/kv of it), and it is never gathered at a graph's end. Decode with the
dynamic cache compiles 3 graphs in all: the prompt, the first decode step (static shapes), and one
graph with a symbolic cache length for every later step. Sampling: ranks seeded apart on purpose,
``generate`` starts them from rank 0's RNG state, so all ranks draw the same tokens.
"""
import functools
import os

import pytest

pytest.importorskip("transformers")

import generate_cases as G  # noqa: E402
from multirank import run_cases  # noqa: E402

FAMILIES = ("llama", "gpt2", "qwen2", "gemma")
KV_HEADS = {"llama": 4, "gpt2": 4, "qwen2": 2, "gemma": 1}
LAYERS = 2
GRAPHS = {None: 3, "static": 2}  # dynamic: prompt, first decode step, one dynamic decode graph; static: 2
# The default suite: TP=2, one family per cache kind, in one spawned group (each case compiles 2-3
# graphs: the suite's time budget). TPCOMPILE_GENERATE_ALL=1: every family with both caches at TP=2
# and TP=4 (Qwen2 and Gemma there: kv heads < tp), and the hand-written loop at TP=4.
ALL = bool(os.environ.get("TPCOMPILE_GENERATE_ALL"))
CASES = {
    2: [(f, c) for f in FAMILIES for c in (None, "static")] if ALL else [("llama", None), ("gpt2", "static")],
    4: [(f, c) for f in FAMILIES for c in (None, "static")] if ALL else [],
}
PARAMS = [(w, f, c) for w, cases in CASES.items() for f, c in cases]


@functools.cache
def _saved_llama() -> str:
    """A tiny Llama written by ``save_pretrained`` as several shard files and an index."""
    import glob
    import tempfile

    import hf_models

    path = tempfile.mkdtemp(prefix="tpcompile-pretrained-")
    hf_models.make_model("llama").save_pretrained(path, max_shard_size="100KB")
    assert len(glob.glob(os.path.join(path, "*.safetensors"))) >= 3
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    return path


@functools.cache
def _gloo(world: int) -> dict:
    """Every case of a degree in one spawned group; at TP=2 also the hand-written loop."""
    cases = {c: (G.generate_beside, c) for c in CASES[world]}
    if world == 2 or ALL:
        cases["loop"] = (G.hand_written_loop, ())
    if world == 2:
        cases["pretrained"] = (G.from_pretrained_generate, (_saved_llama(),))
        cases["sp"] = (G.generate_beside, ("llama", None, 8, "aot_eager", True))
        cases["moe"] = (_moe_generate, ())
    return dict(zip(cases, run_cases(world, list(cases.values()))))


def _moe_generate(rank: int, world: int) -> dict:
    """Mixtral (1 layer, 4 experts, top-2, ``"batched_mm"``): experts expert-TP while generating."""
    return G.generate_beside(rank, world, "mixtral", num_hidden_layers=1, _experts_implementation="batched_mm")


def _same_tokens(results, key):
    for rank, r in enumerate(results):
        assert r[key] == results[0][key], f"rank {rank}: other {key} than rank 0"
    return results[0]


@pytest.mark.parametrize("world,family,cache", PARAMS, ids=[f"tp{w}-{f}-{c or 'dynamic'}" for w, f, c in PARAMS])
def test_generate_matches_single_device(world, family, cache):
    """Greedy tokens equal single device's on every rank; sampled tokens equal on every rank (the
    same distribution as single device's, not its draws: logits that differ in the last bits can
    flip a draw near a top-p / multinomial boundary; GPT-2 flips one of 16 here); the cache
    sharded; decode graphs bounded."""
    results = _gloo(world)[(family, cache)]
    r = _same_tokens(results, "tokens")
    assert r["tokens"] == r["ref_tokens"]
    _same_tokens(results, "sampled")
    assert r["n_graphs"] == GRAPHS[cache], r["n_graphs"]  # sampling compiled nothing new
    held, logical = r["kv_held"], r["kv_logical"]
    if cache == "static":  # the static cache also holds a position counter (one int64 per layer)
        held, logical = held - 8 * LAYERS, logical - 8 * LAYERS
    # each rank its kv heads: 1/tp of the cache, or one head's worth where kv heads < tp (kv-head copies)
    assert held * min(world, KV_HEADS[family]) == logical, (r["kv_held"], r["kv_logical"])
    for graph in r["collectives"][1:]:  # per decode step: no k / v gathered
        kinds = [k for k, _ in graph]
        assert kinds.count("all_reduce") == 2 * LAYERS + 1, graph  # attention + MLP per layer, the embedding
        assert kinds.count("all_gather") <= 1, graph  # at most the last position's logits
    for exit_maps in r["exit"]:
        assert len(exit_maps) <= 1, exit_maps
    assert r["warnings"] == [], r["warnings"]
    # the LM head vocab-sharded at decode, tied (GPT-2, Gemma) or not (Llama, Qwen2): 1/tp of its rows
    fqn, style, local = r["head"]
    assert style in ("colwise", "vocab") and local[0] == -(-r["vocab"] // world), r["head"]
    # explain(tp, graph=-1) after generate(): the decode graph's collectives per token, at the floor,
    # no backward, and the cost of the last position's logits returned whole
    assert r["above_floor"] == {"forward": 0, "backward": 0}, (r["above_floor"], r["explain"])
    text = r["explain"]
    assert "inference: no backward" in text and "backward none" in text, text
    assert "gathered whole at the end (the logits HF generate() reads)" in text, text
    assert r["returned_bytes"] == 2 * r["vocab"] * 4  # one position of a batch of 2, fp32


@pytest.mark.parametrize("world", [2, 4] if ALL else [2], ids=lambda w: f"tp{w}")
def test_hand_written_static_cache_loop(world):
    """A gpt-fast style loop: KV caches as module buffers written in place (``index_copy_`` in one
    block, ``k_cache[:, :, pos] = k`` in the other), prefill then one token per call: greedy tokens
    equal single device's, the buffers held head-sharded (adopted on the first call: 1/tp of the
    bytes per rank), two graphs (the prompt, and one decode graph reused for every position)."""
    results = _gloo(world)["loop"]
    r = _same_tokens(results, "tokens")
    assert r["tokens"] == r["ref_tokens"]
    assert r["n_graphs"] == 2 and r["frames"]["unique_graphs"] == 2, (r["n_graphs"], r["frames"])
    assert r["kv_held"] * world == r["kv_logical"], (r["kv_held"], r["kv_logical"])
    for b in (0, 1):
        assert r["styles"][f"blocks.{b}.wk.weight"] == "colwise" and r["styles"][f"blocks.{b}.wo.weight"] == "rowwise"
    # per graph: the embedding, each block's out-projection, and the returned logits gathered (the head is
    # vocab-sharded at decode: 1/tp of its weight per rank; a sampler in the graph avoids the gather,
    # tests/test_vocab_sampling.py)
    assert r["collectives"] == [["all_gather"] + ["all_reduce"] * 3] * 2
    assert r["styles"]["head.weight"] == "colwise"
    assert r["warnings"] == []


def test_generate_of_a_sequence_parallel_model():
    """A model compiled with ``sequence_parallel=True`` (as it was trained) generates: the prompt (6
    tokens) runs token-sharded, each decode step (1 token, not divisible by tp) as plain TP with a
    TPWarning saying so; greedy tokens equal single device's, sampled ones equal across ranks."""
    results = _gloo(2)["sp"]
    r = _same_tokens(results, "tokens")
    assert r["tokens"] == r["ref_tokens"]
    _same_tokens(results, "sampled")
    kinds = [[k for k, _ in graph] for graph in r["collectives"]]
    assert "reduce_scatter" in kinds[0] and "all_gather" in kinds[0], kinds[0]  # the prompt: SP
    for graph in kinds[1:]:  # decode steps: TP's all-reduces, no SP collective
        assert graph.count("all_reduce") == 2 * LAYERS + 1 and "reduce_scatter" not in graph, graph
    assert len(r["warnings"]) == r["n_graphs"] - 1, r["warnings"]
    assert all("1 tokens per sequence" in w and "without sequence parallelism" in w for w in r["warnings"])


def test_from_pretrained_generates_the_original_tokens():
    """``tpcompile.from_pretrained(path)`` on a ``save_pretrained`` directory (several shard files +
    index) at TP=2: built on meta, planned on a synthetic batch, only this rank's slices read; in
    eval mode; greedy ``generate`` gives the original model's tokens; the parameters sharded, the LM
    head included."""
    results = _gloo(2)["pretrained"]
    r = _same_tokens(results, "tokens")
    assert r["tokens"] == r["ref_tokens"]
    assert r["training"] is False
    # every weight matrix 1/tp, the LM head too (planned under no_grad, as generate() runs); norms whole
    assert r["numel"] < 0.51 * r["full_numel"], (r["numel"], r["full_numel"])


class _Writes(__import__("torch").nn.Module):
    """A head-sharded cache (``index_copy_`` of sharded k on the positions), then a second write
    ``how`` the rules cannot shard: along the heads, or through an index on the heads."""

    def __init__(self, how: str):
        import torch

        super().__init__()
        self.k, self.o, self.how = torch.nn.Linear(32, 32, bias=False), torch.nn.Linear(32, 32, bias=False), how

    def forward(self, x, pos):
        import torch

        B, T, C = x.shape
        k = self.k(x).view(B, T, 4, 8).transpose(1, 2)
        cache = torch.zeros((B, 4, 16, 8))
        cache.index_copy_(2, pos, k)
        if self.how == "heads":
            cache.index_copy_(1, torch.tensor([0]), torch.ones(B, 1, 16, 8))
        else:
            cache[:, 0] = torch.ones(B, 16, 8)
        return self.o(cache[:, :, :T].transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("how", ["heads", "setitem"])
def test_a_write_into_a_sharded_cache_with_no_rule_is_refused(how):
    """An in-place write cannot be made whole first (it would write into a copy): refused, naming it."""
    import torch

    import tpcompile
    from fakepg import fake_group

    with fake_group(2):
        model = tpcompile.tp_compile(_Writes(how), backend="eager")
        with pytest.raises(tpcompile.TPShardingError, match="test_generate.py.*(writes along dim 1|writes into a tensor)"):
            model(torch.randn(2, 5, 32), torch.arange(5))


@pytest.mark.gpu
def test_reduce_overhead_captures_the_decode_step_in_a_cuda_graph():
    """``tp_compile(mode="reduce-overhead")`` on 2 GPUs (NCCL): the gpt-fast loop's tokens equal
    single device's and Inductor captures every graph (no cudagraph skip), collectives inside.
    Not run yet: no GPU was available where it was written."""
    import tempfile

    import torch
    import torch.multiprocessing as mp

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=G._nccl_entry, args=(r, 2, os.path.join(tmp, "store"), queue)) for r in range(2)]
        for p in procs:
            p.start()
        results = dict(queue.get(timeout=900) for _ in procs)
        for p in procs:
            p.join(timeout=60)
    for r in results.values():
        assert r["tokens"] == r["ref_tokens"]
        assert r["skips"] == 0, r["skips"]
        assert r["n_graphs"] == 2


def test_generate_of_a_moe_model_matches_single_device():
    """``generate()`` of HF Mixtral at TP=2 with its experts tensor-parallel (``"batched_mm"``: ``W[ids]`` +
    ``bmm``, the routing of each decoded token replicated): greedy tokens equal single device's on every
    rank, sampled ones equal across ranks, the KV cache head-sharded, no warning."""
    results = _gloo(2)["moe"]
    r = _same_tokens(results, "tokens")
    assert r["tokens"] == r["ref_tokens"]
    _same_tokens(results, "sampled")
    assert r["warnings"] == [], r["warnings"]
    assert r["styles"]["model.layers.0.mlp.experts.gate_up_proj"] == "expert-colwise"
    assert r["styles"]["model.layers.0.mlp.experts.down_proj"] == "expert-rowwise"
    assert r["kv_held"] * 2 == r["kv_logical"], (r["kv_held"], r["kv_logical"])
    assert r["n_graphs"] == GRAPHS[None], r["n_graphs"]
    # per graph (prompt, first decode step, dynamic decode): the embedding, o_proj, the MoE combine, and
    # the returned last position's logits of the vocab-parallel LM head
    assert [sorted(k for k, _ in g) for g in r["collectives"]] == [["all_gather"] + ["all_reduce"] * 3] * 3, \
        r["collectives"]
