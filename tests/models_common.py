"""Train a model beside its untouched single-device copy on one gloo rank: the parity tests' one loop.

The library case files of ``tests/test_models.py`` (``models_<library>.py``),
``parity.train_beside_reference`` (the examples) and ``hf_models.train_hf_beside_reference``
(Hugging Face) each build a model (random weights, no downloads), batches and a loss function;
``train_beside`` runs the user's loop on both copies: ``tp_compile``, SGD steps, ``loss.backward()``.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Callable

import torch
from torch._dynamo.utils import counters

import tpcompile
from parity import grad_errors, local_numel
from tpcompile.passes.regional import is_region


def called_nodes(gm: torch.fx.GraphModule) -> list:
    """The nodes of ``gm`` with each compile region's (``invoke_subgraph``) body in place of its call, once
    per call: what runs, whole-graph or regional (a checkpointed block's recomputed ops live in its region)."""
    out = []
    for n in gm.graph.nodes:
        out += called_nodes(getattr(gm, n.args[0].target)) if is_region(n) else [n]
    return out


def train_beside(rank: int, world: int, model: torch.nn.Module, batches: list, loss_fn: Callable,
                 steps: int | None = None, lr: float = 0.1, autocast: bool = False,
                 report: Callable | None = None, optimizer: Callable = torch.optim.SGD,
                 clip: float | None = None, backward_context: Callable | None = None, **tp_kwargs) -> dict:
    """``len(batches)`` SGD steps (or ``steps``, cycling) of ``tp_compile(model, **tp_kwargs)`` and of
    a deep copy made before it: the one training loop of the parity tests.

    ``loss_fn(model, batch)`` returns the loss, or an output with ``.loss`` (and ``.logits``,
    then compared too). Both copies draw the same random numbers (dropout) at every step.
    ``autocast``: both forwards under CPU bf16 autocast. ``optimizer(params, lr=lr)`` steps both
    copies; ``clip``: ``clip_grad_norm_`` to it before each step (both norms recorded, the tp one
    a DTensor's). ``backward_context()``: entered around both backwards (``loss_parallel``
    needs its backward inside it too). ``report(tp, ref, out)`` may add to or
    reshape the result. Returns per-step losses of both, the largest gradient error (each rank's
    DTensor gradient against the same cut of the single-device one), the plan, the collectives
    and floor per graph and phase, element counts, graph count and tpcompile's warnings."""
    ref = copy.deepcopy(model)
    tp_kwargs.setdefault("backend", "aot_eager")
    cache = dict(counters["inductor"])  # FX-graph cache hits / misses of this job (a pool rank runs many)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tp = tpcompile.tp_compile(model, **tp_kwargs)
        opt, ref_opt = (optimizer(m.parameters(), lr=lr) for m in (tp, ref))
        out = {"loss": [], "ref_loss": [], "grad_err": 0.0, "norm": [], "ref_norm": []}
        for step in range(steps or len(batches)):
            batch = batches[step % len(batches)]
            res = []
            for m in (tp, ref):
                torch.manual_seed(1000 + step)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    res.append(loss_fn(m, batch))
            if hasattr(res[0], "logits"):
                err = (res[0].logits.float() - res[1].logits.float()).abs().max().item()
                out["logits_err"] = max(out.get("logits_err", 0.0), err)
            loss, ref_loss = (getattr(r, "loss", r) for r in res)
            with backward_context() if backward_context is not None else contextlib.nullcontext():
                loss.backward()
                ref_loss.backward()
            out["grad_err"] = max(out["grad_err"], max(grad_errors(tp, ref, rank).values()))
            if clip is not None:
                out["norm"].append(torch.nn.utils.clip_grad_norm_(tp.parameters(), clip).full_tensor().item())
                out["ref_norm"].append(torch.nn.utils.clip_grad_norm_(ref.parameters(), clip).item())
            out["loss"].append(loss.item())
            out["ref_loss"].append(ref_loss.item())
            for o in (opt, ref_opt):
                o.step()
                o.zero_grad()
    st = tpcompile.tp_state(tp)
    out["local_numel"] = local_numel(tp)
    out["full_numel"] = sum(p.numel() for p in ref.parameters())
    out["plan"] = {fqn: (pp.style, pp.dim, pp.chunks) for fqn, pp in st.plan.items()}
    out["collectives"] = [(r_i, c.phase, c.kind) for r_i, r in enumerate(st.records) for c in r.collectives]
    out["floor"] = [{ph: sum(why.values()) for ph, why in r.floor.items()} for r in st.records]
    out["n_graphs"] = len(st.records)
    out["regions"] = [r.regions for r in st.records]  # subgraph -> block prefix per call (regional compilation)
    out["warnings"] = [str(w.message) for w in caught if issubclass(w.category, tpcompile.TPWarning)]
    out["fx_cache"] = {k: counters["inductor"][k] - cache.get(k, 0) for k in ("fxgraph_cache_miss", "fxgraph_cache_hit")}
    if report is not None:
        report(tp, ref, out)
    return out


def assert_parity(results: list, rel: float = 1e-4, grad_atol: float = 1e-5) -> dict:
    """Every rank: the loss at every step within ``rel`` of single device's, the same loss as rank 0,
    every gradient within ``grad_atol``. Returns rank 0's result."""
    for rank, r in enumerate(results):
        assert r["loss"], "no step ran"
        for step, (a, b) in enumerate(zip(r["loss"], r["ref_loss"])):
            assert abs(a - b) <= rel * abs(b), f"rank {rank} step {step}: tp {a} vs single device {b}"
        assert r["loss"] == results[0]["loss"], f"rank {rank} reports another loss than rank 0"
        assert r["grad_err"] <= grad_atol, f"rank {rank}: a gradient is off by {r['grad_err']}"
    return results[0]


def assert_at_floor(result: dict) -> None:
    """Per graph and phase, exactly as many collectives as the plan's floor (DESIGN.md)."""
    for i, floor in enumerate(result["floor"]):
        for ph, n in floor.items():
            have = sum(1 for g, p, _ in result["collectives"] if g == i and p == ph)
            assert have == n, f"graph {i} {ph}: {have} collectives against a floor of {n}"
