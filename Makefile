# retrace: `make dataset` and `make test` do all the set-up they need themselves.
#
#   make dataset                 venv + install + embedded model + the whole default pipeline
#   make test                    venv + dev install + the test suite
#   make sample filter           one target per stage (runs what it needs first, cached stages skip)
#   make dataset CONFIG=configs/paper.yaml ARGS="--set run.seed=1"
#   make push REPO_ID=you/retrace-bsafe ARGS=--dry-run
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
STAGES := sources sample filter inject rewrite format blend publish train

.PHONY: setup model dataset $(STAGES) push status show test bench lint clean

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

push: setup
	@test -n "$(REPO_ID)" || { echo "usage: make push REPO_ID=owner/name [ARGS=--dry-run]" >&2; exit 2; }
	$(RETRACE) push --config $(CONFIG) --repo-id $(REPO_ID) $(ARGS)

status: setup
	$(RETRACE) status --config $(CONFIG)

show: setup
	$(RETRACE) show --config $(CONFIG) $(ARGS)

test: $(VENV)/.dev
	$(BIN)/pytest -q $(ARGS)

bench: $(VENV)/.dev model
	@for script in scripts/bench_*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

lint: $(VENV)/.dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf runs
