# Two commands for a fresh machine: `make run` and `make test`. Both build .venv first.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
MODEL ?= builtin
PROMPT ?= Once upon a time, in a small village by the sea,
export MODEL PROMPT  # reach the recipes as environment variables: quotes in a prompt stay intact

.PHONY: setup run lint test fuzz bench bench-avx2-peer clean

# The runtime (what `make run` needs) and the test/bench extras (transformers, llama-cpp-python,
# which builds llama.cpp from source) are separate steps, so `make run` needs no compiler.
$(VENV)/.done: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# The pinned CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(VPY) -m pip install -q $(TORCH_PIN)
	$(VPY) -m pip install -q -e '.[hub]'
	# the int4/int8 VNNI kernel, compiled for this machine (no compiler: the PyTorch fallback runs)
	$(VPY) -m slmkit.kernels
	touch $@

# llama-cpp-python (the parity reference) builds llama.cpp for this CPU (-march=native). Its AMX
# kernels crash with SIGILL at their first tile instruction (tilezero) on AMX Xeons, here too
# (upstream llama.cpp PR #26954, open): on x86-64 it is built without AMX; CMAKE_ARGS= overrides.
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS ?= -DCMAKE_C_FLAGS="$(NO_AMX)" -DCMAKE_CXX_FLAGS="$(NO_AMX)"
endif

$(VENV)/.test: $(VENV)/.done
	CMAKE_ARGS="$${CMAKE_ARGS-$(subst ",\",$(LLAMA_CMAKE_ARGS))}" $(VPY) -m pip install -q -e '.[test,hub,bench]'
	touch $@

setup: $(VENV)/.test

# main job: an answer from the built-in model (Gemma 3 270M base, offline); MODEL= and PROMPT= to change
run: $(VENV)/.done
	$(VENV)/bin/slm run "$$MODEL" "$$PROMPT" --max-tokens 64 --verbose

# ruff (lint + import order) and mypy (src/slmkit), both configured in pyproject.toml
lint: $(VENV)/.test
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

test: lint
	$(VPY) -m pytest tests

# the generated-input tests (pytest -m fuzz) at length: minutes. `make test` runs them bounded.
# SLMKIT_FUZZ_EXAMPLES= inputs per test (default 20000), SLMKIT_FUZZ_SEED= another seed.
fuzz: $(VENV)/.test
	SLMKIT_FUZZ_EXAMPLES=$${SLMKIT_FUZZ_EXAMPLES:-20000} $(VPY) -m pytest -m fuzz tests

bench: $(VENV)/.test  # minutes: builds 7.6 GB of random weights; run it on an idle machine
	$(VPY) benchmarks/gemv.py
	$(VPY) benchmarks/decode.py
	$(VPY) benchmarks/gguf_load.py
	$(VPY) benchmarks/qgemv.py
	$(VPY) benchmarks/quant.py
	$(VPY) benchmarks/quality.py
	$(VPY) benchmarks/decoding.py
	$(VPY) benchmarks/serve.py
	$(VPY) benchmarks/avx2.py  # the llama.cpp column needs `make bench-avx2-peer` first

# llama.cpp's llama-bench built for AVX2 only (GGML_NATIVE=OFF, AVX512 off), for benchmarks/avx2.py: minutes
bench-avx2-peer: $(VENV)/.test
	PY=$(abspath $(VPY)) benchmarks/build_llama_avx2.sh

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
