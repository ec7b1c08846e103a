"""The parameter model users' code sees: DTensor parameters on the TP mesh, bound per call.

One process on the fake group for the facts about objects; gloo ranks where numbers matter.
"""
import copy
import functools

import pytest
import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

import gpt
import tpcompile
from fakepg import fake_group
from multirank import run_cases


@functools.cache
def _gloo() -> dict:
    """The gloo cases of this file, in one 2-rank job: {name: [result of rank 0, rank 1]}."""
    names = ["two_instances", "hooks", "pieces"]
    results = run_cases(2, [(_two_instances, ()), (_hooks_after_tp_compile, ()), (_unequal_pieces, ())])
    return dict(zip(names, results))


def test_parameters_are_dtensors_on_the_tp_mesh_and_keep_their_identity():
    """Replicate DTensors right after tp_compile, the planned shard after the first call, the same
    Parameter objects throughout (an optimizer built right after tp_compile steps the shards)."""
    with fake_group(2, rank=1):
        model, (x, y) = gpt.make_model()
        model = tpcompile.tp_compile(model, backend="eager")
        before = dict(model.named_parameters())
        assert all(isinstance(p, DTensor) and isinstance(p, nn.Parameter) for p in before.values())
        assert all(p.placements[0].is_replicate() for p in before.values())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(x, y)
        after = dict(model.named_parameters())
        assert all(after[n] is p for n, p in before.items())
        q = after["h.0.attn.q_proj.weight"]
        assert q.placements[0].is_shard(0) and tuple(q.shape) == (64, 64) and tuple(q.to_local().shape) == (32, 64)
        assert after["h.0.attn.o_proj.weight"].placements[0].is_shard(1)
        assert after["ln_f.weight"].placements[0].is_replicate()
        assert opt.param_groups[0]["params"][0] is after["wte.weight"]


def test_an_optimizer_built_before_tp_compile_is_an_error_not_a_model_that_never_trains():
    with fake_group(2):
        model, (x, y) = gpt.make_model()
        opt = torch.optim.AdamW(model.parameters())
        model = tpcompile.tp_compile(model, backend="eager")
        model(x, y).backward()
        with pytest.raises(tpcompile.TPParameterError, match="built before tp_compile"):
            opt.step()
        torch.optim.AdamW(model.parameters()).step()  # built after: fine


def test_a_parameter_replaced_after_tp_compile_is_an_error_not_a_stale_binding():
    with fake_group(2):
        model, (x, y) = gpt.make_model()
        model = tpcompile.tp_compile(model, backend="eager")
        model(x, y)
        model.h[1].mlp.fc.weight = nn.Parameter(torch.zeros(256, 64))
        with pytest.raises(tpcompile.TPParameterError, match=r"h\.1\.mlp\.fc\.weight"):
            model(x, y)


def _two_instances(rank, world):
    import tpcompile
    from test_graph_breaks import LoopBreakGPT

    out = []
    for glue_inside in (False, True):
        torch.manual_seed(0)
        a = LoopBreakGPT(glue_inside)
        torch.manual_seed(1)
        b = LoopBreakGPT(glue_inside)
        refs = [copy.deepcopy(a), copy.deepcopy(b)]
        tps = [tpcompile.tp_compile(m, backend="aot_eager") for m in (a, b)]
        x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
        for _ in range(2):  # alternate: each call must run with its own instance's weights
            for m, r in zip(tps, refs):
                out.append((m(x, x).item(), r(x, x).item()))
    return out


def test_two_instances_of_one_class_never_share_weights():
    """Dynamo compiles a frame once per code object: two tp-compiled instances of the same class,
    called alternately (with a graph break in the block loop, so frames are reused), each give
    their own single-device loss."""
    for r in _gloo()["two_instances"]:
        for tp_loss, ref_loss in r:
            assert abs(tp_loss - ref_loss) <= 1e-5 * abs(ref_loss), r
        assert len({round(ref, 4) for _, ref in r}) >= 2  # the instances do differ


def _unequal_pieces(rank, world):
    import spellings
    import tpcompile

    model, x = spellings.make(spellings.FusedQKVGQA)
    ref = copy.deepcopy(model)
    model = tpcompile.tp_compile(model, backend="aot_eager")
    model(x).backward()
    ref(x).backward()
    w = model.qkv.weight
    try:
        w.redistribute(w.device_mesh, [torch.distributed.tensor.Replicate()])
        refused = ""
    except tpcompile.TPShardingError as e:
        refused = str(e)
    return {"pieces": tpcompile.tp_state(model).plan["qkv.weight"].pieces,
            "weight": (w.full_tensor() - ref.qkv.weight).abs().max().item(),
            "grad": (w.grad.full_tensor() - ref.qkv.weight.grad).abs().max().item(),
            "bias_grad": (model.qkv.bias.grad.full_tensor() - ref.qkv.bias.grad).abs().max().item(),
            "refused": refused}


def test_full_tensor_of_unequal_fused_pieces_is_the_true_full_tensor():
    """q | k | v of 16 | 8 | 8 rows, each split over tp on its own: no DTensor placement says so,
    so the parameter and its gradient carry their layout: ``full_tensor()`` puts the pieces back
    (a plain ``Shard(0)`` gather would give [q0 k0 v0 q1 k1 v1]) and ``redistribute`` refuses."""
    for r in _gloo()["pieces"]:
        assert r["pieces"] == (16, 8, 8)
        assert r["weight"] == 0.0 and r["grad"] <= 1e-6 and r["bias_grad"] <= 1e-6, r
        assert "unequal fused pieces" in r["refused"]


def _hooks_after_tp_compile(rank, world):
    import tpcompile
    from parity import grad_errors

    model, (x, y) = gpt.make_model(n_layer=3)
    ref = copy.deepcopy(model)
    model = tpcompile.tp_compile(model, backend="aot_eager")
    model(x, y)  # compiled and planned before the hooks exist
    seen = {"tp": [], "ref": []}
    for m, key in ((model, "tp"), (ref, "ref")):
        m.h[1].mlp.register_forward_hook(lambda mod, args, out, key=key: seen[key].append(out.abs().sum().item()))
        m.h[2].attn.register_forward_hook(lambda mod, args, out: out * 0.5)  # changes the output
    loss, ref_loss = model(x, y), ref(x, y)
    loss.backward()
    ref_loss.backward()
    return loss.item(), ref_loss.item(), seen, max(grad_errors(model, ref, rank).values())


def test_hooks_registered_after_tp_compile_run_and_count():
    """A forward hook registered on a submodule after tp_compile (logging, or one that changes the
    output) runs on the user's module, as without tpcompile; loss and gradients follow it."""
    for loss, ref_loss, seen, err in _gloo()["hooks"]:
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
        assert len(seen["tp"]) == 1 and abs(seen["tp"][0] - seen["ref"][0]) <= 1e-4 * seen["ref"][0]
        assert err <= 1e-5
