# The whole user interface. `make pretrain` and `make test` set up first when needed.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CONFIG  ?= configs/tiny.yaml
ARGS    ?=
PYTEST_ARGS ?=
# Everything runs with the venv first on PATH, so torch's extension builds (DeepSpeed's CPU
# shared-memory comm op) always use the venv's ninja and are compiled once, not per ninja.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup prepare pretrain test test-fast test-fakegpu test-gpu gpu-bundle gpu-check faults lint bench ablate slurm-local clean

setup: $(STAMP)

# torch is installed first and pinned: the CPU wheel on this disk satisfies it, while an
# unpinned resolve would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# DeepSpeed JIT-builds its CPU shared-memory comm op on a CPU machine's first run (about a
	# minute); building it here, once, keeps that out of every run and test (and out of a
	# test's timeout, where a killed build leaves its lock behind and later runs wait on it).
	$(BIN)/python -c "import torch; from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; \
	    torch.cuda.is_available() or B().load()"
	touch $(STAMP)

# Tokenizer + token shards for CONFIG, with WORKERS processes (default: all CPUs). Resumable.
# `make pretrain` prepares what is missing by itself; cluster recipes expect this to run first.
WORKERS ?= 0
prepare: setup
	$(BIN)/python -m trainer.prepare $(CONFIG) $(ARGS) --workers $(WORKERS)

pretrain: setup
	$(BIN)/python -m trainer.train $(CONFIG) $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not slurm" $(PYTEST_ARGS)

# The fakegpu tier (marker `fakegpu`, in `make test` too): step, eval, metrics and collectives
# against the meta device on CPU, so a CPU tensor meeting a device tensor fails as on CUDA.
test-fakegpu: setup
	$(BIN)/python -m pytest -q -m fakegpu $(PYTEST_ARGS)

# The GPU suite (tests/gpu, marker `gpu`): bf16 on 1 GPU, and on 2 where present. Without
# CUDA every test is skipped; `make test` collects them too.
test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu tests/gpu $(PYTEST_ARGS)

# The project's GPU test machine (one H200, CPython 3.12, torch 2.11, no network) lacks
# DeepSpeed and a few of its needs: gpu-bundle writes their wheels (cp312 manylinux) into the
# ignored .gpu-bundle/, which travels with the working tree, and checks offline that they
# resolve against what that machine has. It runs here, where pip reaches PyPI.
gpu-bundle: setup
	$(BIN)/python -m benchmarks.gpu_bundle

# Runs ON the GPU machine, from a copy of the repo holding .gpu-bundle/: installs the wheels
# offline into that machine's python3 (--no-deps: its torch is never touched), then the
# 1-GPU tests, a 1B-width probe and one eval + growth in one budget (benchmarks/gpu_check.py).
GPU_CHECK_OUT ?= benchmarks/results/gpu_check.json
GPU_CHECK_ARGS ?=
gpu-check:
	@test -d .gpu-bundle || { echo "gpu-check: no .gpu-bundle/ here; run 'make gpu-bundle' on a machine with network first" >&2; exit 2; }
	$(PY) -c "import deepspeed, omegaconf" 2>/dev/null || \
	    $(PY) -m pip install -q --no-index --no-deps --no-cache-dir .gpu-bundle/*.whl
	GPU_CHECK_OUT=$(GPU_CHECK_OUT) $(PY) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

faults: setup
	$(BIN)/python -m pytest -q -m faults $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check model trainer tests benchmarks

bench: setup
	$(BIN)/python -m benchmarks.run_all

# The full protocol (hours on 2 cores); finished runs are skipped, so rerun it to continue.
# One one-thread run per core (JOBS=1 leaves the other cores free).
JOBS ?= $(shell nproc)
ABLATE_ARGS ?= --seeds 2 --lrs 1.5e-3,3e-3,6e-3 --extend-edges 1 --sources shakespeare,embedded --settings default,deep --jobs $(JOBS)
ablate: setup
	$(BIN)/python -m benchmarks.ablate $(ABLATE_ARGS) $(ARGS)

# A real SLURM cluster on this machine (Debian slurm-wlm + munge), idempotent. NODES=2 brings
# up a separate two-node cluster (n1, n2) beside the one-node one and prints SLURM_CONF=<path>.
NODES ?= 1
slurm-local:
	bash slurm/local_cluster.sh --nodes $(NODES)

clean:
	rm -rf runs .pytest_cache
