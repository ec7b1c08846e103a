"""Models from other libraries, built from configs (random weights, no downloads), trained with no plan.

One gloo job per TP degree runs every library's cases (``models_<library>.py``: each has
``CASES = {name: (rank_fn, kwargs)}`` and ``check(name, world, results)``), so a library is
imported once per rank for all of them.
"""
from __future__ import annotations

import functools
import importlib

import pytest

from multirank import run_cases

LIBRARIES = ("timm", "litgpt", "gpt2", "torchtune")  # the case files: models_<name>.py


def _library(name: str):
    return importlib.import_module(f"models_{name}")


def _all_cases() -> list:
    return [(lib, case) for lib in LIBRARIES for case in _library(lib).CASES]


@functools.cache
def _results(world: int) -> dict:
    cases = _all_cases()
    fns = [_library(lib).CASES[case] for lib, case in cases]
    return dict(zip(cases, run_cases(world, fns)))


@pytest.mark.parametrize("world", [2, 4], ids=["tp2", "tp4"])
@pytest.mark.parametrize("lib,case", _all_cases() or [pytest.param(None, None, marks=pytest.mark.skip("no case files"))])
def test_library_model_trains_like_single_device(world, lib, case):
    _library(lib).check(case, world, _results(world)[(lib, case)])
