# rldock/scripts: base + what the model merger, hub upload and formatter need (no vLLM).
ARG BASE_IMAGE=rldock/base:latest
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# ---------------------------------------------------------------- dependencies (manifests only)
COPY pyproject.toml docker/requirements.py /tmp/rldock-build/
RUN --mount=type=secret,id=pip_ca --mount=type=secret,id=pip_index_url \
    --mount=type=bind,source=docker/wheels,target=/wheels \
    python /tmp/rldock-build/requirements.py scripts --pyproject /tmp/rldock-build/pyproject.toml \
        > /tmp/rldock-build/requirements.txt \
    && pip-install.sh -r /tmp/rldock-build/requirements.txt

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
