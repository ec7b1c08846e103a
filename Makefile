# Two commands on a fresh clone: `make demo` and `make test`. Each does its own set-up.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: setup demo test bench clean gpu-check

$(STAMP): pyproject.toml tests/requirements-models.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first and explicitly: a bare `torch>=2.11` with no torch present pulls the CUDA build.
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test]"
	# timm, litgpt, torchtune for tests/test_models.py: --no-deps, or pip swaps in a CUDA torch
	$(BIN)/python -m pip install -q --no-deps -r tests/requirements-models.txt
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/train.py --compare-single-device --launch 2

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# The peers side by side (docs/benchmarks.md, docs/img/*.png). torch is already in the venv
# (the stamp installs it first), so the [bench] extra cannot pull another torch.
BENCH_ARGS ?= --tp 1 2 4 --sizes small medium --profile
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install -q -e ".[test,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/bench_tp.py $(BENCH_ARGS)
	# the vocab-parallel cross-entropy micro-benchmark (issue 6, item 5), once it exists
	if [ -f benchmarks/bench_cross_entropy.py ]; then $(BIN)/python benchmarks/bench_cross_entropy.py; fi

clean:
	rm -rf $(VENV) build *.egg-info

# First thing on a machine with one NVIDIA GPU (tests/gpu_check.py): the GPU-marked tests, the CE kernel
# benchmark, the GPT TP program's CUDA code, mode="reduce-overhead"; one table, non-zero exit on a failure.
# It runs under that machine's own python (a CUDA build of torch 2.11+, no network: no venv is built).
GPU_PY ?= python3
gpu-check:
	$(GPU_PY) tests/gpu_check.py
