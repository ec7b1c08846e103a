"""Train a tp-compiled model beside its single-device copy, on one rank; report what differs.

Shared by the parity tests; runs inside a gloo rank (see ``multirank.run_ranks``).
"""
from __future__ import annotations

import importlib

import torch

import tpcompile


def train_beside_reference(rank: int, world: int, model_name: str, steps: int = 5, lr: float = 0.1,
                           backend: str = "inductor", plan: dict | None = None, sequence_parallel: bool = False,
                           regional: bool | None = None, **overrides) -> dict:
    """``steps`` SGD steps of tp and single-device copies of ``examples/<model_name>.py``
    (``models_common.train_beside``) on random batches of the example's shapes.

    The plan comes back as styles, the collectives as ``(phase, kind)`` and the warnings as the
    plan's fallbacks; ``expected_numel`` is what this rank should hold under that plan."""
    from models_common import train_beside

    mod = importlib.import_module(model_name)
    model, (x, y) = mod.make_model(**overrides)
    vocab = int(x.max()) + 1 if not hasattr(model, "config") else getattr(model.config, "vocab_size")
    g = torch.Generator().manual_seed(1234)
    batches = [(torch.randint(0, vocab, x.shape, generator=g), torch.randint(0, vocab, y.shape, generator=g))
               for _ in range(steps)]

    def report(tp, ref, out):
        st = tpcompile.tp_state(tp)
        out["expected_numel"] = sum(p.numel() // world if st.plan[fqn].style != "replicate" else p.numel()
                                    for fqn, p in ref.named_parameters())
        out["plan"] = {fqn: pp.style for fqn, pp in st.plan.items()}
        out["collectives"] = [(phase, kind) for _, phase, kind in out["collectives"]]
        out["warnings"] = [m for r in st.records for m in r.fallbacks]
        out["regions"] = [r.regions for r in st.records]  # subgraph -> block prefix per call (regional compilation)

    return train_beside(rank, world, model, batches, lambda m, b: m(*b), lr=lr, report=report,
                        backend=backend, plan=plan, sequence_parallel=sequence_parallel, regional=regional)


def stored_slice(model, fqn: str, full: torch.Tensor, rank: int) -> torch.Tensor:
    """The part of a single-device tensor that ``fqn``'s DTensor holds on this rank (its layout's cut)."""
    pp = tpcompile.tp_state(model).plan.get(fqn)
    return pp.stored(full, rank) if pp is not None and pp.sharded else full


def grad_errors(model, ref, rank: int) -> dict:
    """Per parameter, the largest |local gradient - the same part of the single-device gradient|.

    Each gradient is a DTensor like its parameter; its local tensor is compared with the slice
    of the reference gradient the parameter's layout gives this rank."""
    st = tpcompile.tp_state(model)
    refp = dict(ref.named_parameters())
    return {fqn: (p.grad.to_local().float() - stored_slice(model, fqn, refp[fqn].grad, rank).float()).abs().max().item()
            for fqn, p in st.params.named()}


def local_numel(model) -> int:
    """Elements this rank holds of the model's parameters."""
    return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
