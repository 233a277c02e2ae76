# syntax=docker/dockerfile:1.7
# rldock/base: CUDA devel + Python + PyTorch + flash-attn, non-root user. train and scripts build FROM it.
# Change a version here (or pass --build-arg / set it in .env); everything below is derived from these.
ARG CUDA_VERSION=12.8.1
ARG UBUNTU_VERSION=24.04

FROM nvidia/cuda:${CUDA_VERSION}-cudnn-devel-ubuntu${UBUNTU_VERSION}

# Python from the distribution when it ships this version (24.04: 3.12), else from the deadsnakes PPA.
ARG PYTHON_VERSION=3.12
# The torch wheel on PyPI for Linux x86_64 is built against CUDA 12.8 for 2.8; keep CUDA_VERSION's major in step.
ARG TORCH_VERSION=2.8.0
# flash-attn's installer fetches a prebuilt wheel matching torch/CUDA/Python when one exists, else compiles;
# MAX_JOBS bounds the compile's parallelism (each job can take ~4 GB of RAM).
ARG FLASH_ATTN_VERSION=2.8.3
ARG MAX_JOBS=4
ARG USER_UID=1000

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# PIP_CACHE_DIR: HOME is /tmp at run time, but the build's pip cache mounts sit in /root/.cache/pip.
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CACHE_DIR=/root/.cache/pip \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# ---------------------------------------------------------------- system packages and Python
RUN apt-get update \
    && if ! apt-cache show "python${PYTHON_VERSION}-venv" > /dev/null 2>&1; then \
        apt-get install -y --no-install-recommends software-properties-common \
        && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update; \
    fi \
    && apt-get install -y --no-install-recommends \
        "python${PYTHON_VERSION}" "python${PYTHON_VERSION}-venv" "python${PYTHON_VERSION}-dev" \
        git ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && "python${PYTHON_VERSION}" -m venv /opt/venv

# ---------------------------------------------------------------- PyTorch, pinned for every later pip call
# PIP_CONSTRAINT keeps torch at this version when train/scripts install packages that would upgrade it.
RUN mkdir -p /etc/rldock && echo "torch==${TORCH_VERSION}" > /etc/rldock/constraints.txt
ENV PIP_CONSTRAINT=/etc/rldock/constraints.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --upgrade "pip>=24" "setuptools>=70" "wheel>=0.43" \
    && pip install "torch==${TORCH_VERSION}" "packaging>=24" "ninja>=1.11" "psutil>=5.9"

# ---------------------------------------------------------------- flash-attn
RUN --mount=type=cache,target=/root/.cache/pip \
    MAX_JOBS="${MAX_JOBS}" pip install --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"

# ---------------------------------------------------------------- runtime layout and non-root user
# HOME and the caches point at places any uid can write, because compose runs as HOST_UID:HOST_GID.
ENV HOME=/tmp \
    HF_HOME=/workspace/models/.hf_cache \
    WANDB_DIR=/workspace/saves \
    MPLCONFIGDIR=/tmp/matplotlib \
    RLDOCK_MODELS_DIR=/workspace/models
COPY docker/entrypoint.sh /usr/local/bin/rldock-entrypoint
RUN (userdel --remove ubuntu 2> /dev/null || true) \
    && useradd --create-home --uid "${USER_UID}" --shell /bin/bash rldock \
    && mkdir -p /workspace/models /workspace/saves /workspace/data \
    && chown -R rldock:rldock /workspace
WORKDIR /workspace
USER ${USER_UID}
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/rldock-entrypoint"]
CMD ["bash"]
