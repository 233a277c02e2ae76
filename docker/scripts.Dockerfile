# syntax=docker/dockerfile:1.7
# rldock/scripts: base + what the model merger, hub upload and formatter need (no vLLM).
ARG BASE_IMAGE=rldock/base:latest
FROM ${BASE_IMAGE}

# Same uid as the base image's rldock user (compose passes one USER_UID to every build).
ARG USER_UID=1000

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
USER 0

# ---------------------------------------------------------------- dependencies (manifests only)
COPY pyproject.toml docker/requirements.py /tmp/rldock-build/
RUN --mount=type=cache,target=/root/.cache/pip \
    python /tmp/rldock-build/requirements.py scripts --pyproject /tmp/rldock-build/pyproject.toml \
        > /tmp/rldock-build/requirements.txt \
    && pip install -r /tmp/rldock-build/requirements.txt

# ---------------------------------------------------------------- sources
COPY . /workspace
RUN pip install --no-cache-dir --no-deps -e /workspace

USER ${USER_UID}
CMD ["bash"]
