# rldock/eval: slim Python, no CUDA, no torch. Runs the env servers and the eval runner (HTTP mode); the modules it
# serves import no torch (tests/docker_files/test_docker_images.py checks that against eval-requirements.txt).
# BASE_IMAGE: any Debian/Ubuntu image with python3 and its venv module (python:*-slim, or docker/debian-base.sh's).
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    RLDOCK_MODELS_DIR=/workspace/models

# Java runs ScienceWorld's simulator (the sciworld env); the JRE's post-install step expects man1/ on slim images.
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && apt-get install -y --no-install-recommends tini default-jre-headless \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
COPY docker/pip-install.sh docker/add-user.sh docker/entrypoint.sh /usr/local/bin/
WORKDIR /workspace

# ---------------------------------------------------------------- dependencies (manifests only)
COPY pyproject.toml docker/requirements.py docker/eval-requirements.txt /tmp/rldock-build/
RUN --mount=type=secret,id=pip_ca --mount=type=secret,id=pip_index_url \
    --mount=type=bind,source=docker/wheels,target=/wheels \
    python /tmp/rldock-build/requirements.py eval --pyproject /tmp/rldock-build/pyproject.toml \
        > /tmp/rldock-build/requirements.txt \
    && pip-install.sh -r /tmp/rldock-build/requirements.txt

# ---------------------------------------------------------------- sources (by name: docker/wheels stays out)
COPY pyproject.toml README.md /workspace/
COPY rollout /workspace/rollout
COPY env_servers /workspace/env_servers
COPY scripts /workspace/scripts
COPY trainer /workspace/trainer
COPY configs /workspace/configs
# The sources run from /workspace as they are (no install step: nothing to build, no network needed).
ENV PYTHONPATH=/workspace

# ---------------------------------------------------------------- user (last: another uid rebuilds this alone)
ARG USER_UID=1000
RUN add-user.sh "${USER_UID}"
USER ${USER_UID}
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/entrypoint.sh"]
CMD ["python", "-m", "env_servers", "--help"]
