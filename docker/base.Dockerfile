# rldock/base: an OS image with Python, then a venv with PyTorch (and flash-attn on CUDA). train and scripts build
# FROM it. GPU flavour (the defaults): NVIDIA's CUDA devel image, PyPI's CUDA torch, flash-attn. CPU flavour: any
# Debian/Ubuntu image with python3 (docker/debian-base.sh makes one from Debian's packages), a CPU torch wheel from
# TORCH_INDEX_URL or docker/wheels/, FLASH_ATTN_VERSION empty. DOCS.md, "Images", lists every build arg.
# Each ARG is declared just before the layer that reads it, so changing one rebuilds from there on only. The version
# ARGs have no values here: docker-compose.yml states the GPU version set once (build through it: make docker-build).
ARG BASE_IMAGE
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# HOME and the caches point at places any uid can write, because compose runs as HOST_UID:HOST_GID.
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    HF_HOME=/workspace/models/.hf_cache \
    WANDB_DIR=/workspace/saves \
    MPLCONFIGDIR=/tmp/matplotlib \
    RLDOCK_MODELS_DIR=/workspace/models

# ---------------------------------------------------------------- the distribution's Python, in a venv
# python3 is the base image's own (Ubuntu 24.04: 3.12, Debian bookworm: 3.11): no PPA, nothing beyond its mirror.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
COPY docker/pip-install.sh docker/add-user.sh docker/entrypoint.sh /usr/local/bin/

# ---------------------------------------------------------------- PyTorch, pinned for every later pip call
# PIP_CONSTRAINT keeps torch at this version when train/scripts install packages that would move it (vLLM too).
# TORCH_INDEX_URL picks the build (e.g. https://download.pytorch.org/whl/cu128 or .../cpu); empty = the default
# index (PyPI: CUDA on Linux x86_64). A matching wheel in docker/wheels/ wins over both.
ARG TORCH_VERSION
ARG TORCH_INDEX_URL=
RUN --mount=type=secret,id=pip_ca --mount=type=secret,id=pip_index_url \
    --mount=type=bind,source=docker/wheels,target=/wheels \
    { [ -n "${TORCH_VERSION}" ] || { echo "TORCH_VERSION is not set: build through docker compose (make docker-build)" >&2; exit 1; }; } \
    && mkdir -p /etc/rldock && echo "torch==${TORCH_VERSION}" > /etc/rldock/constraints.txt \
    && pip-install.sh --upgrade "pip>=24" "setuptools>=70" "wheel>=0.43" "packaging>=24" "psutil>=5.9" \
    && pip-install.sh ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}"
ENV PIP_CONSTRAINT=/etc/rldock/constraints.txt

# ---------------------------------------------------------------- flash-attn (optional: empty = left out)
# Its installer fetches a prebuilt wheel matching torch/CUDA/Python when one exists, else compiles with the CUDA
# toolkit of the devel image; MAX_JOBS bounds the compile's parallelism (each job can take ~4 GB of RAM).
ARG FLASH_ATTN_VERSION
ARG MAX_JOBS=4
RUN --mount=type=secret,id=pip_ca --mount=type=secret,id=pip_index_url \
    --mount=type=bind,source=docker/wheels,target=/wheels \
    if [ -n "${FLASH_ATTN_VERSION}" ]; then \
        apt-get update && apt-get install -y --no-install-recommends python3-dev git \
        && rm -rf /var/lib/apt/lists/* \
        && pip-install.sh "ninja>=1.11" \
        && MAX_JOBS="${MAX_JOBS}" pip-install.sh --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"; \
    fi

WORKDIR /workspace
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/entrypoint.sh"]
CMD ["bash"]
