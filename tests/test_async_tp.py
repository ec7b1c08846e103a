"""Graphs ready for async TP, and nothing that needs not run (issue 17, items 3 and 4).

With ``sequence_parallel=True`` every all-gather -> matmul and matmul -> reduce-scatter of a
transformer layer must be in the form Inductor's micro-pipeline pass fuses (gathered tokens the
left operand of a bias-free ``mm``, ``reshape -> mm -> reshape`` at most, the mm's output used
only by the reduce-scatter), forward and backward. The pass's own finders
(``torch/_inductor/fx_passes/micro_pipeline_tp.py``) run on Inductor's post-grad graphs of the
example GPT and Llama under the fake group; the fusion itself needs CUDA + NCCL + symmetric
memory (the GPU-marked test, and ``make gpu-check``).

Post-grad graphs without C++ code generation: Inductor's ``compile_fx`` (its decompositions,
partitioner, post-grad passes, our ``options=`` custom pass) runs as for real, but the inner
compile stops after the post-grad passes and runs the graph eagerly: what the fusion pass sees,
at a fraction of the compile time.
"""
import contextlib
import warnings
from collections import Counter

import pytest
import torch
import torch.distributed as dist
from torch._inductor import config as inductor_config
from torch._inductor.fx_passes import micro_pipeline_tp as mp

import gpt
import llama
import tpcompile
from fakepg import fake_group


def _fusable(graph: torch.fx.Graph) -> dict:
    """What the micro-pipeline pass would fuse in ``graph`` (its finders, its conditions)."""
    ags = mp.find_all_gather_patterns(graph)
    rss = mp.find_reduce_scatter_patterns(graph)

    def ag_fuses(a) -> bool:  # fuse_all_gather_matmul: consumer mms with the gathered tokens as left operand
        return any(a.res_node not in m.arg_ancestor_nodes for m in mp._find_consumer_matmuls(a.res_node))

    def rs_fuses(r) -> bool:  # fuse_matmul_reduce_scatter: a producer mm whose output only the RS reads
        nodes = r.match.nodes if hasattr(r.match, "nodes") else r.match
        return mp._find_producer_matmul(r.input_node) is not None and (
            len(r.input_node.users) == 1 or all(u in nodes for u in r.input_node.users))

    return {"all_gather": (len(ags), sum(map(ag_fuses, ags))), "reduce_scatter": (len(rss), sum(map(rs_fuses, rss)))}


@contextlib.contextmanager
def _post_grad_only():
    """Inductor's ``compile_fx_inner`` replaced by: its post-grad passes, then run the graph as is."""
    import torch._inductor.compile_fx as cfx
    from functorch.compile import make_boxed_func
    from torch._inductor.fx_passes.post_grad import view_to_reshape
    from torch._inductor.virtualized import V

    def inner(gm, example_inputs, **kwargs):
        graph = torch.fx.Graph()
        graph.output(graph.graph_copy(gm.graph, {}))
        copy = torch.fx.GraphModule(gm, graph)
        view_to_reshape(copy)
        with torch.no_grad():
            fake_mode = cfx.fake_tensor_prop(copy, example_inputs)
        with V.set_fake_mode(fake_mode):
            cfx._recursive_post_grad_passes(copy, is_inference=kwargs.get("is_inference", False))
        return make_boxed_func(gm.forward)

    saved = cfx.compile_fx_inner
    cfx.compile_fx_inner = inner
    try:
        yield
    finally:
        cfx.compile_fx_inner = saved


@pytest.mark.parametrize("make, layers_kw", [(gpt.make_model, "n_layer"), (llama.make_model, "n_layers")])
def test_sp_graphs_are_in_the_micro_pipeline_form(make, layers_kw):
    """Per layer, each way: 2 all-gathers -> mm (attention q/k/v as one mm, MLP fc / w1+w3 as one)
    and 2 mm -> reduce-scatters (o_proj, down projection) forward; backward the reduce-scatters'
    all-gathers feed the row-parallel dgrad mms and the column-parallel dgrad (one mm: the merged
    q/k/v) feeds the all-gathers' reduce-scatters. Outside the layers: the embedding's
    reduce-scatter (a masked gather, no mm), the loss statistics' all-gather, and the LM head,
    whose 2-D logits feed the vocab-parallel loss (Inductor folds ``reshape -> mm -> reshape``
    to ``reshape -> mm`` there: not a form the pass matches). A column linear with its bias (``addmm``)
    or q/k/v as three mms would show here: before the SP pass emitted this form, forward matched
    0 of 6 all-gathers and backward 2 of 5 reduce-scatters (GPT, 2 layers)."""
    L, seen = 2, []
    with fake_group(2), _post_grad_only():
        model, args = make(**{layers_kw: L})
        model = tpcompile.tp_compile(model, sequence_parallel=True,
                                     options={"post_grad_custom_post_pass": lambda g: seen.append(_fusable(g))})
        model(*args).backward()
    fwd, bwd = seen
    pos = 1 if make is gpt.make_model else 0  # GPT's learned position embedding: its sliced gradient is gathered
    assert fwd == {"all_gather": (2 * L + 2, 2 * L), "reduce_scatter": (2 * L + 1, 2 * L)}
    assert bwd == {"all_gather": (2 * L + 1 + pos, 2 * L), "reduce_scatter": (2 * L + 1, 2 * L)}


def test_async_tp_turns_on_the_inductor_pass():
    """``async_tp=True`` reaches Inductor as ``_micro_pipeline_tp`` (forward and backward); on a
    group that is not NCCL it warns that nothing fuses; without SP it is refused."""
    flags = []
    with fake_group(2):
        model, args = gpt.make_model(n_layer=1)
        with pytest.warns(tpcompile.TPWarning, match="async TP needs CUDA and NCCL"):
            model = tpcompile.tp_compile(model, sequence_parallel=True, async_tp=True, options={
                "post_grad_custom_post_pass": lambda g: flags.append(inductor_config._micro_pipeline_tp)})
        with _post_grad_only():
            model(*args).backward()
    assert flags == [True, True]
    with fake_group(2):
        with pytest.raises(ValueError, match=r"async_tp=True\) needs sequence_parallel=True"):
            tpcompile.tp_compile(gpt.make_model()[0], async_tp=True)


def test_one_rank_runs_no_collective():
    """TP=1 is torch.compile: no collective in the graphs, none around them (input check, replica
    check), and the numbers are single device's (the fake group's collectives would be no-ops,
    so a wrong program could not hide behind them)."""
    calls = Counter()
    real = {n: getattr(dist, n) for n in ("all_gather", "all_reduce", "broadcast", "all_gather_into_tensor")}

    def counting(name):
        def f(*a, **k):
            calls[name] += 1
            return real[name](*a, **k)
        return f

    for sp in (False, True):
        torch._dynamo.reset()
        ref, args = gpt.make_model(n_layer=1)
        ref_loss = ref(*args)
        ref_loss.backward()
        with fake_group(1), pytest.MonkeyPatch.context() as mp_:
            for n in real:
                mp_.setattr(dist, n, counting(n))
            model, _ = gpt.make_model(n_layer=1)
            model = tpcompile.tp_compile(model, sequence_parallel=sp, backend="aot_eager")
            for _ in range(2):
                model.zero_grad()
                loss = model(*args)
                loss.backward()
            records = tpcompile.tp_state(model).records
            assert [c for r in records for c in r.collectives] == []
            assert "tpcompile_runtime" not in records[0].graph_code
            assert records[0].floor == {"forward": {}, "backward": {}}
            assert torch.equal(loss, ref_loss)
            for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
                torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=0, atol=0, msg=name)
    assert calls == {}


@pytest.mark.gpu
def test_async_tp_fuses_on_cuda(monkeypatch):
    """On one GPU (a 1-rank NCCL group, the TP rewrite kept with TPCOMPILE_TP1_REWRITE=1):
    Inductor's generated code calls the fused symmetric-memory ops with ``async_tp=True`` and not
    without, and the loss and gradients are the same both ways."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setenv("TPCOMPILE_TP1_REWRITE", "1")
    if not dist.is_initialized():
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    results = []
    for async_tp in (False, True):
        torch._dynamo.reset()
        model, (x, y) = gpt.make_model(device="cuda", n_embd=1024, n_head=8, n_layer=1, block_size=64)
        model = tpcompile.tp_compile(model, sequence_parallel=True, async_tp=async_tp)
        loss, code = run_and_get_code(model, x, y)
        loss.backward()
        results.append((loss.detach(), [p.grad.full_tensor() for p in model.parameters()], "\n".join(code)))
    assert "fused_all_gather_matmul" in results[1][2] and "fused_matmul_reduce_scatter" in results[1][2]
    assert "fused_all_gather_matmul" not in results[0][2]
    torch.testing.assert_close(results[1][0], results[0][0])
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b)


def test_one_rank_does_not_warn_about_fallbacks():
    """A construct kept replicated with a TPWarning at TP=2 (an einsum with a 3-D weight) says nothing
    at TP=1, where nothing is sharded and no collective runs; the record still lists it."""

    class Heads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 8, 8))

        def forward(self, x):
            return torch.einsum("bi,hij->bhj", x, self.w).sum()

    x = torch.randn(3, 8)
    for world, warns in ((2, True), (1, False)):
        torch._dynamo.reset()
        with fake_group(world), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = tpcompile.tp_compile(Heads(), backend="aot_eager")
            model(x)
        got = [w for w in caught if issubclass(w.category, tpcompile.TPWarning)]
        assert bool(got) == warns, (world, [str(w.message) for w in got])
        assert tpcompile.tp_state(model).records[0].fallbacks, world
