"""Shared fixtures: the real SmolLM2 model (converted once into models/), free ports, subprocess servers."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Idle OpenMP workers sleep instead of spinning (as `python -m trainer` does): with several torch processes or
# threads on 2 shared cores, spinning slowed the engine's CPU generation ~10x. Set before any test imports torch;
# the servers the tests start inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# Build times, sizes and start-up times the docker tier measures (tests/docker/conftest.py), for DOCS.md's table.
# Here, not there: under pytest-xdist the tier runs in a worker, and only this conftest is loaded in the controller.
DOCKER_MEASURED: dict[str, object] = {}


def pytest_sessionfinish(session):
    if DOCKER_MEASURED and hasattr(session.config, "workeroutput"):  # a worker: hand them to the controller
        session.config.workeroutput["docker_measured"] = dict(DOCKER_MEASURED)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    DOCKER_MEASURED.update(getattr(node, "workeroutput", {}).get("docker_measured", {}))


def pytest_terminal_summary(terminalreporter):
    if DOCKER_MEASURED:
        terminalreporter.write_line(f"docker tier measured: {json.dumps(DOCKER_MEASURED)}")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.hookimpl(trylast=True)  # after tests/docker's conftest has marked its tests
def pytest_collection_modifyitems(config, items):
    _heavy_files_first(items)
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _heavy_files_first(items: list[pytest.Item]) -> None:
    """Files with docker-tier tests first, then files with slow ones, each file's tests kept together in their order:
    pytest-xdist (`make test`, --dist loadfile) hands out files in this order, so the longest start first and the
    short ones fill the gaps at the end instead of one worker finishing a long file alone."""
    order: dict[str, int] = {}
    weight: dict[str, int] = {}
    for item in items:
        file = item.path
        order.setdefault(file, len(order))
        weight[file] = min(weight.get(file, 2), 0 if "docker" in item.keywords else 1 if "slow" in item.keywords else 2)
    items.sort(key=lambda item: (weight[item.path], order[item.path]))


@pytest.fixture(scope="session")
def model_path() -> str:
    """The built-in SmolLM2-135M-Instruct as an HF folder (converted from the shipped GGUF on first use)."""
    from rollout.loading import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct", ROOT / "models")


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from rollout.loading import load_tokenizer

    return load_tokenizer(model_path)


@pytest.fixture(scope="session")
def scratch_dir(tmp_path_factory):
    """`mktemp` for GB-sized outputs (real checkpoints, full weight copies): removed at the end of the session even
    when a test failed, so a failing run does not leave gigabytes behind (pytest keeps failed runs' temp folders)."""
    made: list[Path] = []

    def make(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    """Poll `url` until it answers 200; fail early if `proc` died."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


# Test services load weights from pytest's temp folders; the default root (./saves) protects real deployments.
TEST_WEIGHTS_ROOT = ["--weights-root", tempfile.gettempdir()]


def start_server(
    args: list[str], health_url: str, log_path: Path, timeout: float = 120.0, env: dict | None = None
) -> subprocess.Popen:
    """Start `python args...` from the repo root (extra environment `env`), wait for health_url; the caller stops it
    with stop_server."""
    log = open(log_path, "w")
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_http(health_url, timeout, proc)
    except Exception:
        stop_server(proc)
        raise RuntimeError(f"server {args} failed to start; log:\n{log_path.read_text()[-3000:]}") from None
    return proc


def wait_until(pred, timeout: float = 60.0) -> None:
    """Poll `pred` every 50 ms until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def stop_server(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds: a server must not keep a test or a bench from ending."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_trainer_config(config: dict, workdir: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Write `config` to workdir/config.yaml and run `python -m trainer` on it from the repo root."""
    import yaml

    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "trainer", str(path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def tiny_llama_config(**overrides):
    """A 2-layer Llama small enough to train in milliseconds (GQA, tied embeddings); override any field."""
    from transformers import LlamaConfig

    fields = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return LlamaConfig(**{**fields, **overrides})
