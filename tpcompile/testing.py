"""Pin a model's tensor-parallel rewrite in your own test suite (golden files).

    def test_my_model_tp4():
        model, args = make_my_model()
        tpcompile.testing.assert_rewrite_matches(model, *args, world_size=4, golden="tests/golden/my_tp4.txt")

The golden text is ``Report.golden()``: plan table, collectives (phase, kind, bytes, module,
source line) and the rewritten graph of one rank. A plan that changes, or a collective
that is added, removed or moved, fails with a unified diff. Run once with
``EXPECTTEST_ACCEPT=1`` (the same switch as ``expecttest``) to write or update the file.
With ``expecttest`` you can also inline it: ``self.assertExpectedInline(report.golden(), "")``.
"""
from __future__ import annotations

import difflib
import os
from typing import Any

import torch.nn as nn

from tpcompile.explain import Report, explain


def assert_rewrite_matches(
    model: nn.Module | Report, *args: Any, golden: str | os.PathLike, world_size: int | None = None, rank: int = 0,
    **kwargs: Any,
) -> Report:
    """Fail unless the rewrite of ``model(*args, **kwargs)`` (or a ``Report``) equals ``golden``."""
    if isinstance(model, Report):
        rep = model
    else:
        if world_size is None:
            raise TypeError("assert_rewrite_matches(model, ...) needs world_size=")
        rep = explain(model, *args, world_size=world_size, rank=rank, **kwargs)
    actual = rep.golden()
    path = os.fspath(golden)
    if os.environ.get("EXPECTTEST_ACCEPT", "0") not in ("", "0"):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            f.write(actual)
        return rep
    if not os.path.exists(path):
        raise AssertionError(f"no golden file {path}; run once with EXPECTTEST_ACCEPT=1 to write it")
    with open(path) as f:
        expected = f.read()
    if actual != expected:
        diff = "".join(difflib.unified_diff(
            expected.splitlines(True), actual.splitlines(True), fromfile=f"{path} (golden)", tofile="rewrite now"
        ))
        raise AssertionError(
            f"the tensor-parallel rewrite (world_size={rep.world_size}, rank={rep.rank}) differs from {path}:\n"
            f"{diff}\nIf the change is intended, re-run with EXPECTTEST_ACCEPT=1 to update the golden file."
        )
    return rep
