"""Mapping ops on 2 gloo ranks: forward and gradients against the maths, in eager,
under torch.compile (aot_eager and inductor) and through compile_fx on an FX graph.

One spawned run does every check (process start-up dominates); the tests below read
its results. Inputs are seeded per (op, rank), so the parent rebuilds every rank's data
and computes the expected values itself.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from graphs import collective_names, recording_aot_eager
from multirank import run_ranks

TP = 2
SHAPE = (2, 4, 6)  # [B, T, H]


def _data(seed: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _ops():
    from tpcompile.runtime import mappings as M

    # name -> (op(x, group_name, process_group), differentiable)
    return {
        "copy_to_tp": (lambda x, n, pg: M.copy_to_tp(x, n), True),
        "reduce_from_tp": (lambda x, n, pg: M.reduce_from_tp(x, pg), True),  # a ProcessGroup works too
        "scatter_to_tp": (lambda x, n, pg: M.scatter_to_tp(x, n), True),
        "gather_from_tp": (lambda x, n, pg: M.gather_from_tp(x, n, dim=-2), True),
        "reduce_scatter_to_tp": (lambda x, n, pg: M.reduce_scatter_to_tp(x, n), True),
        "gather_from_sp": (lambda x, n, pg: M.gather_from_sp(x, n), True),
        "reduce_scatter_to_sp": (lambda x, n, pg: M.reduce_scatter_to_sp(x, n), True),
        "scatter_to_sp": (lambda x, n, pg: M.scatter_to_sp(x, n, dim=-2), True),
        "all_to_all_h2t": (lambda x, n, pg: M.all_to_all_tp(x, n, scatter_dim=2, gather_dim=1), True),
        "all_to_all_t2b": (lambda x, n, pg: M.all_to_all_tp(x, n, scatter_dim=-2, gather_dim=0), True),
        "broadcast_from_first": (lambda x, n, pg: M.broadcast_from_first(x, n), False),
    }


OP_NAMES = list(_ops())  # importing tpcompile.runtime in the parent is cheap


def _seed(k: int, rank: int, grad: bool = False) -> int:
    return 1000 * k + 500 * grad + rank


# ---------------------------------------------------------------- the expected maths


def _chunk(t, r, d):
    return t.chunk(TP, d)[r]


def _expected(name: str, xs, gs, r: int):
    """(forward, input gradient) of op ``name`` on rank r, given all ranks' inputs and
    upstream gradients."""
    cat, total_x, total_g = torch.cat, sum(xs), sum(gs) if gs else None
    return {
        "copy_to_tp": lambda: (xs[r], total_g),
        "reduce_from_tp": lambda: (total_x, gs[r]),
        "scatter_to_tp": lambda: (_chunk(xs[r], r, -1), cat(gs, -1)),
        "gather_from_tp": lambda: (cat(xs, -2), _chunk(gs[r], r, -2)),
        "reduce_scatter_to_tp": lambda: (_chunk(total_x, r, -1), cat(gs, -1)),
        "gather_from_sp": lambda: (cat(xs, 1), _chunk(total_g, r, 1)),
        "reduce_scatter_to_sp": lambda: (_chunk(total_x, r, 1), cat(gs, 1)),
        "scatter_to_sp": lambda: (_chunk(xs[r], r, 1), cat(gs, 1)),
        "all_to_all_h2t": lambda: (
            cat([_chunk(x, r, 2) for x in xs], 1),
            cat([_chunk(g, r, 1) for g in gs], 2),
        ),
        "all_to_all_t2b": lambda: (
            cat([_chunk(x, r, 1) for x in xs], 0),
            cat([_chunk(g, r, 0) for g in gs], 1),
        ),
        "broadcast_from_first": lambda: (xs[0], None),
    }[name]()


# ---------------------------------------------------------------- rank side






def _run_ops(rank: int, backend, pg) -> dict:
    ops = _ops()
    name = pg.group_name

    def fn(*xs):
        return tuple(op(x, name, pg) for (op, _), x in zip(ops.values(), xs))

    if backend is not None:
        fn = torch.compile(fn, backend=backend, fullgraph=True)
    xs = [_data(_seed(k, rank), SHAPE).requires_grad_() for k in range(len(ops))]
    outs = fn(*xs)
    pairs = [
        (o, _data(_seed(k, rank, grad=True), o.shape))
        for k, (o, (_, diff)) in enumerate(zip(outs, ops.values()))
        if diff
    ]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return {
        op: (o.detach().numpy(), None if x.grad is None else x.grad.numpy())
        for op, o, x in zip(ops, outs, xs)
    }


def _fx_graph_module(name: str) -> torch.fx.GraphModule:
    """x -> copy_to_tp -> column linear -> relu -> row linear -> reduce_from_tp, as the
    rewrite emits it: mapping ops are call_function nodes with the group name constant."""
    from tpcompile.runtime import copy_to_tp, reduce_from_tp

    g = torch.fx.Graph()
    x, w1, w2 = g.placeholder("x"), g.placeholder("w1"), g.placeholder("w2")
    h = g.call_function(copy_to_tp, (x, name))
    h = g.call_function(F.linear, (h, w1))
    h = g.call_function(torch.relu, (h,))
    h = g.call_function(F.linear, (h, w2))
    g.output(g.call_function(reduce_from_tp, (h, name)))
    return torch.fx.GraphModule(torch.nn.Module(), g)


def _fx_data(rank: int | None):
    """x [2, 3, 4], W1 [8, 4] (column-parallel), W2 [4, 8] (row-parallel), upstream grad;
    rank None gives the full weights, else that rank's shards."""
    x, w1, w2, gy = _data(1, (2, 3, 4)), _data(2, (8, 4)), _data(3, (4, 8)), _data(4, (2, 3, 4))
    if rank is not None:
        w1, w2 = _chunk(w1, rank, 0), _chunk(w2, rank, 1)
    return x, w1, w2, gy


def _run_compile_fx(rank: int, name: str) -> dict:
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    graphs: dict = {}

    def inner(gm, example_inputs, **kwargs):
        graphs["bw" if kwargs.get("is_backward") else "fw"] = collective_names(gm)
        return compile_fx_inner(gm, example_inputs, **kwargs)

    x, w1, w2, gy = _fx_data(rank)
    inputs = [t.clone().requires_grad_() for t in (x, w1, w2)]
    compiled = compile_fx(_fx_graph_module(name), inputs, inner_compile=inner)
    y = compiled(*inputs)
    y = y[0] if isinstance(y, (tuple, list)) else y
    y.backward(gy)
    return {"y": y.detach().numpy(), "grads": [t.grad.numpy() for t in inputs], "graphs": graphs}


def _worker(rank: int, world_size: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from tpcompile.runtime import mappings as M

    pg = dist.group.WORLD
    name = pg.group_name
    res: dict = {"eager": _run_ops(rank, None, pg)}
    graphs: dict = {}
    res["aot_eager"] = _run_ops(rank, recording_aot_eager(graphs), pg)
    res["aot_graphs"] = graphs
    torch._dynamo.reset()
    res["inductor"] = _run_ops(rank, "inductor", pg)
    res["compile_fx"] = _run_compile_fx(rank, name)

    # Group forms and helpers.
    mesh = init_device_mesh("cpu", (world_size,))
    x = _data(7, (2, 4))
    res["groups"] = {
        "names": [M.group_name(g) for g in (name, pg, mesh)],
        "size": M.group_size(name),
        "rank": M.group_rank(mesh),
        "mesh_scatter": M.scatter_to_tp(x, mesh).numpy(),
    }
    # Identity forward is a view, not a copy.
    leaf = torch.ones(3, requires_grad=True)
    res["copy_is_view"] = M.copy_to_tp(leaf, name).data_ptr() == leaf.data_ptr()
    # Non-divisible dims raise ValueError naming size, dim and tp.
    errors = {}
    odd = torch.ones(2, 3, 5)
    for label, call in {
        "scatter_to_tp": lambda: M.scatter_to_tp(odd, name),
        "scatter_to_sp": lambda: M.scatter_to_sp(odd, name),
        "reduce_scatter_to_tp": lambda: M.reduce_scatter_to_tp(odd, name),
        "reduce_scatter_to_sp": lambda: M.reduce_scatter_to_sp(odd, name),
        "all_to_all_tp": lambda: M.all_to_all_tp(odd, name, scatter_dim=-1, gather_dim=0),
    }.items():
        try:
            call()
            errors[label] = None
        except ValueError as e:
            errors[label] = str(e)
    res["errors"] = errors
    return res


@pytest.fixture(scope="module")
def results():
    return run_ranks(_worker, TP)


# ---------------------------------------------------------------- tests


def _inputs_and_grads(k: int, shapes):
    xs = [_data(_seed(k, r), SHAPE) for r in range(TP)]
    gs = [_data(_seed(k, r, grad=True), shapes[r]) for r in range(TP)]
    return xs, gs


@pytest.mark.parametrize("mode", ["eager", "aot_eager", "inductor"])
@pytest.mark.parametrize("op", OP_NAMES)
def test_op_forward_and_grad(results, mode, op):
    k = OP_NAMES.index(op)
    shapes = [tuple(results[r][mode][op][0].shape) for r in range(TP)]
    xs, gs = _inputs_and_grads(k, shapes)
    for r in range(TP):
        out, grad = results[r][mode][op]
        want_out, want_grad = _expected(op, xs, gs, r)
        torch.testing.assert_close(torch.from_numpy(out), want_out, rtol=1e-6, atol=1e-6)
        if want_grad is None:
            assert grad is None
        else:
            torch.testing.assert_close(torch.from_numpy(grad), want_grad, rtol=1e-6, atol=1e-6)


def test_aot_graphs_hold_collectives_on_the_right_side(results):
    for r in range(TP):
        graphs = results[r]["aot_graphs"]
        assert len(graphs["fw"]) == 1 and len(graphs["bw"]) == 1
        fw, bw = sorted(graphs["fw"][0]), sorted(graphs["bw"][0])
        # fw: g; gather_from_tp, gather_from_sp; reduce-scatter x2; all-to-all x2; broadcast.
        want_fw = ["all_reduce"] + ["all_gather_into_tensor"] * 2 + ["reduce_scatter_tensor"] * 2
        want_fw += ["all_to_all_single"] * 2 + ["broadcast"]
        # bw: f; all-gathers for the splits and reduce-scatters; RS for gather_from_sp; all-to-all x2.
        want_bw = ["all_reduce"] + ["all_gather_into_tensor"] * 4 + ["reduce_scatter_tensor"]
        want_bw += ["all_to_all_single"] * 2
        for got, want in ((fw, want_fw), (bw, want_bw)):
            assert [c for c in got if c != "wait_tensor"] == sorted(want)
            assert got.count("wait_tensor") == len(want)


def test_compile_fx_on_fx_graph_with_group_name_constant(results):
    x, w1, w2, gy = _fx_data(None)
    xr, w1r, w2r = (t.clone().requires_grad_() for t in (x, w1, w2))
    y = F.linear(torch.relu(F.linear(xr, w1r)), w2r)
    y.backward(gy)
    for r in range(TP):
        res = results[r]["compile_fx"]
        assert [c for c in res["graphs"]["fw"] if c != "wait_tensor"] == ["all_reduce"]
        assert [c for c in res["graphs"]["bw"] if c != "wait_tensor"] == ["all_reduce"]
        torch.testing.assert_close(torch.from_numpy(res["y"]), y.detach(), rtol=1e-5, atol=2e-6)
        gx, gw1, gw2 = (torch.from_numpy(g) for g in res["grads"])
        torch.testing.assert_close(gx, xr.grad, rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(gw1, _chunk(w1r.grad, r, 0), rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(gw2, _chunk(w2r.grad, r, 1), rtol=1e-5, atol=2e-6)


def test_group_forms_and_helpers(results):
    x = _data(7, (2, 4))
    for r in range(TP):
        g = results[r]["groups"]
        assert len(set(g["names"])) == 1 and isinstance(g["names"][0], str)
        assert (g["size"], g["rank"]) == (TP, r)
        torch.testing.assert_close(torch.from_numpy(g["mesh_scatter"]), _chunk(x, r, -1))
        assert results[r]["copy_is_view"]


def test_non_divisible_dim_raises(results):
    want = {
        "scatter_to_tp": "size 5 of dim 2",
        "scatter_to_sp": "size 3 of dim 1",
        "reduce_scatter_to_tp": "size 5 of dim 2",
        "reduce_scatter_to_sp": "size 3 of dim 1",
        "all_to_all_tp": "size 5 of dim 2",
    }
    for r in range(TP):
        for op, msg in want.items():
            got = results[r]["errors"][op]
            assert got is not None and msg in got and "tp=2" in got, (op, got)
