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
# ...and into the venv's own folder: torch's default (~/.cache/torch_extensions) is shared by
# every venv on the machine, and a second venv's build there makes the first rebuild (35-85 s
# under a lock, in every engine a test builds) the next time it runs.
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions

.PHONY: help setup prepare pretrain test test-fast test-fakegpu test-gpu gpu-bundle gpu-snapshot gpu-check faults lint docs bench ablate ladder slurm-local clean clean-runs
.DEFAULT_GOAL := help

# The list is every target line with a `## ` description, so a new target documents itself.
help: ## List the targets (this text; a bare `make` prints it)
	@echo "usage: make TARGET [CONFIG=configs/tiny.yaml] [ARGS='key=value ...']"
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-13s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(STAMP) ## Create .venv and install the pinned dependencies (again only when pyproject.toml changes)

# torch is installed first and pinned: the CPU wheel on this disk satisfies it, while an
# unpinned resolve would pull a multi-GB CUDA build. PYTHONWARNINGS hides setuptools' 10-line
# note that an editable install uses a meta path finder (information only, on every install).
# DeepSpeed JIT-builds its CPU shared-memory comm op on a CPU machine's first run (about a
# minute); building it here, once, keeps that out of every run and test (and out of a
# test's timeout, where a killed build leaves its lock behind and later runs wait on it).
# (Comments inside a recipe are echoed by make; these stay outside it.)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install -q -e '.[dev]'
	$(BIN)/python -c "import torch; from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; \
	    torch.cuda.is_available() or B().load()"
	touch $(STAMP)

# Tokenizer + token shards for CONFIG, with WORKERS processes (default: all CPUs). Resumable.
# `make pretrain` prepares what is missing by itself; cluster recipes expect this to run first.
WORKERS ?= 0
prepare: setup ## Train the tokenizer and write the token shards for CONFIG with WORKERS processes (resumable)
	$(BIN)/python -m trainer.prepare $(CONFIG) $(ARGS) --workers $(WORKERS)

pretrain: setup ## Train CONFIG (default configs/tiny.yaml, on CPU); rerunning resumes
	$(BIN)/python -m trainer.train $(CONFIG) $(ARGS)

# The suite runs on TEST_WORKERS pytest-xdist workers (default 2, the CI machine's cores), each
# test process on one OpenMP thread so two workers do not oversubscribe the cores. A module runs
# on one worker (--dist loadfile): its module fixtures (a shared reference run) run once, and
# each SLURM test module's jobs never queue behind each other. (loadgroup would do it per mark,
# but it stops grouping on pytest 9.2: pytest-xdist issue #1386.) TEST_WORKERS=0: in-process.
# TORCHINDUCTOR_COMPILE_THREADS=1: the compile tests' ranks compile in-process, without a pool of
# compile workers that each import torch first (on 2 cores the pool only adds that start-up).
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
test: setup ## Run the whole suite: tests/unit, integration, cluster and gpu (CPU, gloo, fp32)
	OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1 $(BIN)/python -m pytest -q $(XDIST) $(PYTEST_ARGS)

test-fast: setup ## Run the unit tier tests/unit: in-process, no trainer subprocess (under a minute)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(XDIST) tests/unit $(PYTEST_ARGS)

# The fakegpu tier (marker `fakegpu`, in `make test` too): step, eval, metrics and collectives
# against the meta device on CPU, so a CPU tensor meeting a device tensor fails as on CUDA.
test-fakegpu: setup ## Run the fakegpu tier: step, eval and metrics on the meta device
	$(BIN)/python -m pytest -q -m fakegpu $(PYTEST_ARGS)

# The GPU suite (tests/gpu, marker `gpu`): bf16 on 1 GPU, and on 2 where present. Without
# CUDA every test is skipped; `make test` collects them too.
test-gpu: setup ## Run the GPU suite tests/gpu (every test skips without CUDA)
	$(BIN)/python -m pytest -q -m gpu tests/gpu $(PYTEST_ARGS)

# The project's GPU test machine (one H200, CPython 3.12, torch 2.11, no network) lacks
# DeepSpeed and a few of its needs: gpu-bundle writes their wheels (cp312 manylinux) into the
# ignored .gpu-bundle/, which travels with the working tree, and checks offline that they
# resolve against what that machine has. It runs here, where pip reaches PyPI.
gpu-bundle: setup ## Download the wheels the offline GPU machine lacks into .gpu-bundle/
	$(BIN)/python -m benchmarks.gpu_bundle

# The committed HEAD plus the bundle, as an ignored folder .gpu-snapshot/ with its commit in
# COMMIT: what to send to the GPU machine when the working tree has edits in flight.
gpu-snapshot: gpu-bundle ## Write .gpu-snapshot/: HEAD (git archive) + .gpu-bundle/, to run gpu-check from
	rm -rf .gpu-snapshot && mkdir .gpu-snapshot && git archive HEAD | tar -x -C .gpu-snapshot
	cp -r .gpu-bundle .gpu-snapshot/ && git rev-parse HEAD > .gpu-snapshot/COMMIT

# Runs ON the GPU machine, from a copy of the repo holding .gpu-bundle/: installs the wheels
# offline into that machine's python3 (--no-deps: its torch is never touched), then the
# 1-GPU tests, a 1B-width probe and one eval + growth in one budget (benchmarks/gpu_check.py).
GPU_CHECK_OUT ?= benchmarks/results/gpu_check.json
GPU_CHECK_ARGS ?=
gpu-check: ## On the GPU machine: install .gpu-bundle/ offline, then the 1-GPU checks
	@test -d .gpu-bundle || { echo "gpu-check: no .gpu-bundle/ here; run 'make gpu-bundle' on a machine with network first" >&2; exit 2; }
	$(PY) -c "import deepspeed, omegaconf" 2>/dev/null || \
	    $(PY) -m pip install -q --no-index --no-deps --no-cache-dir .gpu-bundle/*.whl
	GPU_CHECK_OUT=$(GPU_CHECK_OUT) $(PY) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

faults: setup ## Run the fault-injection suite alone (kill -9, corrupt checkpoints, signals, NaNs, a hung rank)
	$(BIN)/python -m pytest -q -m faults tests/cluster $(PYTEST_ARGS)

lint: setup ## Run ruff over model, trainer, tests and benchmarks
	$(BIN)/ruff check model trainer tests benchmarks

docs: setup ## Regenerate docs/config.md's config-key table from trainer/config.py's dataclasses
	$(BIN)/python -c "from pathlib import Path; from trainer.config import with_key_table; \
	    p = Path('docs/config.md'); p.write_text(with_key_table(p.read_text()))"

bench: setup ## Run every benchmark in benchmarks/ and write benchmarks/results/
	$(BIN)/python -m benchmarks.run_all

# The full protocol (hours on 2 cores); finished runs are skipped, so rerun it to continue.
# One one-thread run per core (JOBS=1 leaves the other cores free).
JOBS ?= $(shell nproc)
ABLATE_ARGS ?= --seeds 2 --lrs 1.5e-3,3e-3,6e-3 --extend-edges 1 --sources shakespeare,embedded --settings default,deep --jobs $(JOBS)
ablate: setup ## Run (or continue) the ablation protocol (hours on 2 cores)
	$(BIN)/python -m benchmarks.ablate $(ABLATE_ARGS) $(ARGS)

# The option ladder (benchmarks/ladder/run.py): builds the corpus if missing, then
# trains every pending (arm, size, LR, seed) as one one-thread run, JOBS at a time (default 2
# here, whatever ablate's default; JOBS=... on the command line wins), and appends one row per
# run to benchmarks/results/ladder_runs.jsonl. Resumable: rerun to continue. Refuses a dirty
# git tree. ARGS adds flags, e.g. ARGS='--dry-run' or ARGS='--settings width,depth'.
# The corpus is defined by the packages and versions in benchmarks/results/ladder_corpus.json,
# and a fresh `make setup` may resolve newer versions of unpinned transitive dependencies
# (idna, regex...): those the record names at another version are installed at its version
# first, or the build would differ and every row would be keyed to a new corpus.
LADDER_JOBS := $(if $(filter command line environment,$(origin JOBS)),$(JOBS),2)
ladder: setup ## Run (or continue) the option ladder (hours; ARGS='--dry-run' prints the plan)
	@pins=$$($(BIN)/python -m benchmarks.ladder.corpus --pins) && { [ -z "$$pins" ] || \
	    { echo "installing the ladder corpus's recorded package versions: $$pins"; $(BIN)/pip install -q --no-deps $$pins; }; }
	$(BIN)/python -m benchmarks.ladder.run --jobs $(LADDER_JOBS) $(ARGS)

# A real SLURM cluster on this machine (Debian slurm-wlm + munge), idempotent. NODES=2 brings
# up a separate two-node cluster (n1, n2) beside the one-node one and prints SLURM_CONF=<path>.
NODES ?= 1
slurm-local: ## Bring up a real SLURM cluster on this machine (NODES=2 for two nodes)
	bash slurm/local_cluster.sh --nodes $(NODES)

# Build artefacts and caches only: never runs/ (trained runs and the data cache), nor .venv.
clean: ## Remove caches and build artefacts (__pycache__, .pytest_cache, .ruff_cache, build/, *.egg-info)
	rm -rf .pytest_cache .ruff_cache build *.egg-info
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# Deleting trained runs is its own target, and asks: at a terminal it waits for a yes; without
# one (a script, CI) it refuses unless FORCE=1.
clean-runs: ## Delete runs/ (every run, checkpoint and the data cache) after asking; FORCE=1 skips the question
	@if [ ! -d runs ]; then echo "clean-runs: no runs/ here"; \
	elif [ "$(FORCE)" = 1 ]; then rm -rf runs && echo "clean-runs: deleted runs/"; \
	elif [ -t 0 ]; then \
	    printf 'delete runs/ (%s run dirs, %s, with every checkpoint and the data cache runs/.cache)? [y/N] ' \
	        "$$(ls runs | wc -l)" "$$(du -sh runs | cut -f1)"; \
	    read answer; case "$$answer" in [yY]|[yY][eE][sS]) rm -rf runs && echo "clean-runs: deleted runs/";; \
	        *) echo "clean-runs: kept runs/";; esac; \
	else echo "clean-runs: stdin is not a terminal; run 'make clean-runs FORCE=1' to delete runs/ without asking" >&2; \
	    exit 2; fi
