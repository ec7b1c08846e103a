# Two commands on a fresh clone: `make demo` and `make test`. Each does its own set-up.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: setup demo test test-latest lock bench clean gpu-check

# Every install below takes its versions from constraints.txt: the set the suite was last green with.
PIN     := -c constraints.txt

$(STAMP): pyproject.toml tests/requirements-models.txt constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first and explicitly: a bare `torch>=2.11` with no torch present pulls the CUDA build.
	$(BIN)/python -m pip install -q $(PIN) $(TORCH)
	$(BIN)/python -m pip install -q $(PIN) -e ".[test]"
	# timm, litgpt, torchtune for tests/test_models.py: --no-deps, or pip swaps in a CUDA torch
	$(BIN)/python -m pip install -q $(PIN) --no-deps -r tests/requirements-models.txt
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/train.py --compare-single-device --launch 2

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# The newest releases of what users bring, in a venv of their own: transformers (and what it pulls:
# kernels, huggingface_hub, tokenizers, safetensors), accelerate, trl, datasets, triton, timm, litgpt, torchtune,
# torchao; then the tests of third-party models (Hugging Face families, KV cache, generate, MoE, timm, litgpt,
# torchtune, explain at the floor) and of the Trainer. A release that breaks one is a tpcompile bug to fix, or an upper bound
# written below with its reason (docs/models.md). Upper bounds: torchao<0.14 (torchtune 0.6.1, its newest
# release, imports torchao.dtypes.nf4tensor, gone from 0.14 on).
LATEST        := .venv-latest
LATEST_PKGS   := transformers kernels huggingface_hub tokenizers safetensors accelerate triton
LATEST_MODELS := timm litgpt torchtune 'torchao<0.14' trl datasets
LATEST_TESTS  := tests/test_hf_models.py tests/test_hf_outputs.py tests/test_generate.py tests/test_models.py \
                 tests/test_expert_parallel.py tests/test_eager_frames.py tests/test_explain.py tests/test_hf_trainer.py
test-latest:
	test -x $(LATEST)/bin/python || $(PY) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q $(TORCH)
	# --upgrade of the named packages only: their requirements (torch among them) upgrade only if needed
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy only-if-needed -e ".[test]" $(LATEST_PKGS)
	$(LATEST)/bin/python -m pip install -q --no-deps -r tests/requirements-models.txt
	$(LATEST)/bin/python -m pip install -q --no-deps --upgrade $(LATEST_MODELS)
	$(LATEST)/bin/python -m pip list 2>/dev/null | grep -iE "^(torch|transformers|kernels|huggingface.hub|tokenizers|safetensors|accelerate|trl|datasets|triton|timm|litgpt|torchtune|torchao) "
	$(LATEST)/bin/python -m pytest -q $(LATEST_TESTS)

# After a green `make test-latest`: take its versions as the new pinned set (then run `make test`).
lock:
	{ grep '^#' constraints.txt; $(LATEST)/bin/python -m pip freeze --exclude-editable 2>/dev/null \
	  | grep -viE '^(torch|tpcompile|pip|setuptools|wheel)==' | sort -f; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

# The peers side by side (docs/benchmarks.md, docs/img/*.png). torch is already in the venv
# (the stamp installs it first), so the [bench] extra cannot pull another torch.
BENCH_ARGS ?= --tp 1 2 4 --sizes small medium --profile
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install -q $(PIN) -e ".[test,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/bench_tp.py $(BENCH_ARGS)
	# the vocab-parallel cross-entropy micro-benchmark (issue 6, item 5), once it exists
	if [ -f benchmarks/bench_cross_entropy.py ]; then $(BIN)/python benchmarks/bench_cross_entropy.py; fi

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info

# First thing on a machine with one NVIDIA GPU (tests/gpu_check.py): the GPU-marked tests, the CE kernel
# benchmark, the GPT TP program's CUDA code, mode="reduce-overhead"; one table, non-zero exit on a failure.
# It runs under that machine's own python (a CUDA build of torch 2.11+, no network: no venv is built).
GPU_PY ?= python3
gpu-check:
	$(GPU_PY) tests/gpu_check.py
