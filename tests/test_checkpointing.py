"""Activation checkpointing (``torch.utils.checkpoint``) is rewritten inside its block.

The checkpointed blocks are sharded like any other (column/row-parallel inside), the
backward recomputes their forward ops (the ATen ops AOTAutograd tagged PREFER_RECOMPUTE
reappear in the backward graph), and no collective is re-run: the counts equal the
uncheckpointed model's, at the floor. Parity: loss within 1e-5 relative over 3 SGD steps,
gradients within 1e-5 of the single-device slice (2 gloo ranks).
"""
import functools
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import gpt
import tpcompile
from models_common import called_nodes
from multirank import run_cases
from tpcompile.passes.inline_checkpoint import CHECKPOINT, inline_checkpoints


class Checkpointed(nn.Module):
    """``module`` run under ``torch.utils.checkpoint`` (what FSDP/HF/torchtitan wrappers do)."""

    def __init__(self, module, reentrant=False, context_fn=None):
        super().__init__()
        self.module, self.reentrant, self.context_fn = module, reentrant, context_fn

    def forward(self, x):
        kw = {"context_fn": self.context_fn} if self.context_fn else {}
        return checkpoint(self.module, x, use_reentrant=self.reentrant, **kw)


def _save_matmuls(ctx, op, *args, **kwargs):  # a typical selective policy
    return CheckpointPolicy.MUST_SAVE if op is torch.ops.aten.mm.default else CheckpointPolicy.PREFER_RECOMPUTE


def checkpointed_gpt(wrap: str, **kw):
    model, args = gpt.make_model(n_layer=2, **kw)
    for i, block in enumerate(model.h):
        if wrap == "selective":
            ctx = functools.partial(create_selective_checkpoint_contexts, _save_matmuls)
            model.h[i] = Checkpointed(block, context_fn=ctx)
        elif wrap != "none":
            model.h[i] = Checkpointed(block, reentrant=wrap == "reentrant")
    return model, args


def _train(rank, world, wrap, backend, steps=3):
    import copy
    import warnings

    from parity import grad_errors

    model, (x, y) = checkpointed_gpt(wrap)
    ref = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = tpcompile.tp_compile(model, backend=backend)
        opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
        out = {"loss": [], "ref": [], "grad_err": 0.0}
        for _ in range(steps):
            loss, ref_loss = model(x, y), ref(x, y)
            loss.backward()
            ref_loss.backward()
            out["grad_err"] = max(out["grad_err"], *grad_errors(model, ref, rank).values())
            out["loss"].append(loss.item())
            out["ref"].append(ref_loss.item())
            for o in (opt, ref_opt):
                o.step()
                o.zero_grad()
    (rec,) = tpcompile.tp_state(model).records
    graphs = dict(rec.compiled_graphs)
    fwd_out = next(n for n in graphs["forward"].graph.nodes if n.op == "output")
    out["saved"] = len(fwd_out.args[0])  # outputs + tensors saved for the backward
    out["recomputed_mm"] = sum(n.meta.get("recompute") == CheckpointPolicy.PREFER_RECOMPUTE and "mm" in str(n.target)
                               for n in called_nodes(graphs["backward"]))
    out["collectives"] = Counter((c.phase, c.kind) for c in rec.collectives)
    out["floor"] = rec.floor
    out["plan"] = {f: pp.style for f, pp in tpcompile.tp_state(model).plan.items()}
    out["warnings"] = [str(w.message) for w in caught if issubclass(w.category, tpcompile.TPWarning)]
    out["regions"] = rec.regions
    return out


def _train_all(rank, world, cases):
    out = []
    for wrap, backend in cases:
        out.append(_train(rank, world, wrap, backend))
        torch._dynamo.reset()
    return out


CASES = [("none", "aot_eager"), ("plain", "aot_eager"), ("reentrant", "aot_eager"), ("plain", "inductor"),
         ("selective", "aot_eager")]


@functools.cache
def _gloo() -> list:
    """Every gloo case of this file in one 2-rank job: the CASES, then the dropout replays."""
    return run_cases(2, [(_train_all, (CASES,))] + [(_dropout_run, (b,)) for b in DROPOUT_BACKENDS])


@pytest.fixture(scope="module")
def trained():
    by_rank = _gloo()[0]
    return {case: [r[i] for r in by_rank] for i, case in enumerate(CASES)}


@pytest.mark.parametrize("case", CASES[1:], ids=["-".join(c) for c in CASES[1:]])
def test_checkpointed_blocks_are_sharded_recomputed_and_match_single_device(trained, case):
    base = trained[("none", "aot_eager")][0]
    for r in trained[case]:
        for a, b in zip(r["loss"], r["ref"]):
            assert abs(a - b) <= 1e-5 * abs(b)
        assert r["grad_err"] <= 1e-5
        plan = {f.replace(".module.", "."): style for f, style in r["plan"].items()}
        assert plan == base["plan"]  # sharded inside the blocks exactly as without checkpointing
        assert plan["h.0.attn.q_proj.weight"] == plan["h.1.mlp.fc.weight"] == "colwise"
        assert plan["h.0.attn.o_proj.weight"] == plan["h.1.mlp.proj.weight"] == "rowwise"
        # recomputation: q/k/v and the MLP up-projection of each block (2 layers) are re-run in the
        # backward instead of saved; no collective is re-run (same counts, at the floor)
        assert r["recomputed_mm"] >= 4, r["recomputed_mm"]
        assert r["collectives"] == base["collectives"]
        assert r["collectives"][("backward", "all_reduce")] == sum(r["floor"]["backward"].values())
        if case[1] == "aot_eager":
            assert r["saved"] < base["saved"], (r["saved"], base["saved"])
        if case[0] == "selective":
            # one per checkpointed block
            assert len(r["warnings"]) == 2 and all("is not honoured" in m for m in r["warnings"]), r["warnings"]
        else:
            assert r["warnings"] == []


class DropBlock(nn.Module):
    """Dropout on the column-parallel hidden (independent masks per rank) and after the
    row-parallel reduction (same mask on every rank), inside a checkpointed block."""

    def __init__(self, ckpt):
        super().__init__()
        self.ckpt, self.up, self.down = ckpt, nn.Linear(16, 64), nn.Linear(64, 16)

    def block(self, x):
        h = F.dropout(F.gelu(self.up(x)), 0.5, self.training)
        return F.dropout(self.down(h), 0.3, self.training)

    def forward(self, x):
        y = checkpoint(self.block, x, use_reentrant=False) if self.ckpt else self.block(x)
        return (x + y).pow(2).mean()


def _dropout_run(rank, world, backend):
    out = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = tpcompile.tp_compile(DropBlock(ckpt), backend=backend)
        x = torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(5)
        loss = model(x)
        loss.backward()
        out.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
        torch._dynamo.reset()
    (l0, g0), (l1, g1) = out
    return l0, l1, max((a - b).abs().max().item() for a, b in zip(g0, g1))


DROPOUT_BACKENDS = ["aot_eager", "inductor"]


@pytest.mark.parametrize("backend", DROPOUT_BACKENDS)
def test_recomputed_dropout_replays_the_forward_masks(backend):
    """The backward's recomputation draws the masks the forward drew: the checkpointed model's
    loss and gradients equal the uncheckpointed one's bitwise, with the same seed."""
    for loss, loss_ckpt, grad_diff in _gloo()[1 + DROPOUT_BACKENDS.index(backend)]:
        assert loss == loss_ckpt
        assert grad_diff == 0.0


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def inner(self, h):
        return F.gelu(h)

    def outer(self, x):
        return self.down(checkpoint(self.inner, self.up(x), use_reentrant=False))

    def forward(self, x):
        return checkpoint(self.outer, x, use_reentrant=False).sum()


def test_inline_pass_tags_every_op_of_nested_blocks():
    """The pass alone: no checkpoint op is left, every op of the blocks carries the recompute tag,
    the nested block keeps its own id, and the graph computes what it did."""
    seen = {}

    def backend(gm, example_inputs):
        seen["before"] = gm.forward(*example_inputs)
        seen["blocks"] = inline_checkpoints(gm)
        seen["gm"] = gm
        seen["after"] = gm.forward(*example_inputs)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(Nested(), backend=backend)(torch.randn(2, 8))
    gm = seen["gm"]
    assert [sac for _, sac in seen["blocks"]] == [False, False]
    assert not any(n.target is CHECKPOINT for n in gm.graph.nodes)
    ops = {str(n.target).split(".")[-1].split(" ")[-1]: n.meta.get("ac_graph_id")
           for n in gm.graph.nodes if n.op == "call_function"}
    tagged = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is not torch.Tensor.sum
              and n.meta.get("recompute") == CheckpointPolicy.PREFER_RECOMPUTE]
    assert len(tagged) == 3, ops  # up, gelu, down
    ids = {n.meta["ac_graph_id"] for n in tagged}
    assert len(ids) == 2  # the nested block keeps its own id
    assert torch.equal(seen["before"][0], seen["after"][0])
