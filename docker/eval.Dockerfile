# syntax=docker/dockerfile:1.7
# rldock/eval: slim Python, no CUDA, no torch. Runs the env servers and the eval runner (HTTP mode); the
# modules it serves import no torch (tests/test_docker_images.py checks that against eval-requirements.txt).
ARG PYTHON_VERSION=3.12
FROM python:${PYTHON_VERSION}-slim

ARG USER_UID=1000

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# PIP_CACHE_DIR: HOME is /tmp at run time, but the build's pip cache mounts sit in /root/.cache/pip.
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CACHE_DIR=/root/.cache/pip \
    HOME=/tmp \
    RLDOCK_MODELS_DIR=/workspace/models

# Java runs ScienceWorld's simulator (the sciworld env); the JRE's post-install step expects man1/ on slim images.
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && apt-get install -y --no-install-recommends tini default-jre-headless \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid "${USER_UID}" --shell /bin/bash rldock \
    && mkdir -p /workspace/models /workspace/saves /workspace/data \
    && chown -R rldock:rldock /workspace

# ---------------------------------------------------------------- dependencies (manifests only)
COPY pyproject.toml docker/requirements.py docker/eval-requirements.txt /tmp/rldock-build/
RUN --mount=type=cache,target=/root/.cache/pip \
    python /tmp/rldock-build/requirements.py eval --pyproject /tmp/rldock-build/pyproject.toml \
        > /tmp/rldock-build/requirements.txt \
    && pip install -r /tmp/rldock-build/requirements.txt

# ---------------------------------------------------------------- sources
COPY docker/entrypoint.sh /usr/local/bin/rldock-entrypoint
COPY . /workspace
RUN pip install --no-cache-dir --no-deps -e /workspace

WORKDIR /workspace
USER ${USER_UID}
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/rldock-entrypoint"]
CMD ["python", "-m", "env_servers", "--help"]
