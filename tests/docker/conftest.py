"""The docker tier's stack: a real engine, compose v2, the four images built from scratch (CPU flavour) in a copy of
the checkout, under a tag and a compose project of this run's own, all removed at the end.

It skips, with one line of why, when no engine or no compose v2 is reachable, or when it cannot get a base image or
a CPU torch wheel; RLDOCK_REQUIRE_DOCKER=1 (set by .ci/run) turns those skips into failures. On a host that reaches
no registry it makes its own base image from Debian's packages (docker/debian-base.sh), unless
RLDOCK_TEST_BASE_IMAGE names one (any Debian/Ubuntu image with python3 and venv; it then serves base and eval).
Torch comes from RLDOCK_TEST_TORCH_INDEX_URL + RLDOCK_TEST_TORCH_VERSION when set, else from a CPU torch wheel for
Python 3.11 found in pip's find-links (this machine's) or named by RLDOCK_TEST_TORCH_WHEEL.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import DOCKER_MEASURED as MEASURED
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ("base", "train", "scripts", "eval")
# Containers run as this uid when the suite is root, so ownership checks mean something (root would own anything).
TEST_UID = 1234


def pytest_collection_modifyitems(items):
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.docker)


def run(args: list[str], *, env: dict | None = None, cwd: Path = ROOT, timeout: float = 600, **kw):
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw)


def unavailable(why: str):
    if os.environ.get("RLDOCK_REQUIRE_DOCKER") == "1":
        pytest.fail(f"docker tier required (RLDOCK_REQUIRE_DOCKER=1) but {why}", pytrace=False)
    pytest.skip(why)


def engine_problem() -> str | None:
    if shutil.which("docker") is None:
        return "no docker CLI on PATH"
    try:
        out = run(["docker", "version", "--format", "{{.Server.Version}}"], timeout=30)
    except subprocess.TimeoutExpired:
        return "the Docker engine did not answer within 30 s"
    if out.returncode != 0:
        return f"no Docker engine reachable ({(out.stderr.strip().splitlines() or ['?'])[-1][:120]})"
    if run(["docker", "compose", "version", "--short"], timeout=30).returncode != 0:
        return "docker compose v2 is not installed (the compose plugin; .ci/run installs it)"
    return None


def torch_source() -> dict[str, str] | str:
    """Build args for a CPU torch, plus the wheel to put into docker/wheels/ when one is used; or why there is none."""
    if os.environ.get("RLDOCK_TEST_TORCH_INDEX_URL"):
        return {
            "TORCH_INDEX_URL": os.environ["RLDOCK_TEST_TORCH_INDEX_URL"],
            "TORCH_VERSION": os.environ.get("RLDOCK_TEST_TORCH_VERSION", "2.13.0+cpu"),
        }
    wheel = os.environ.get("RLDOCK_TEST_TORCH_WHEEL")
    if not wheel:
        dirs = os.environ.get("PIP_FIND_LINKS", "").split()
        out = run(["pip", "config", "get", "global.find-links"], timeout=30) if shutil.which("pip") else None
        dirs += out.stdout.split() if out and out.returncode == 0 else []
        found = [p for d in dirs for p in sorted(Path(d.removeprefix("file://")).glob("torch-*+cpu-cp311-*.whl"))]
        wheel = str(found[-1]) if found else None
    if not wheel:
        return "no CPU torch source: set RLDOCK_TEST_TORCH_WHEEL (a cp311 CPU wheel) or RLDOCK_TEST_TORCH_INDEX_URL"
    version = re.match(r"torch-([^-]+)-", Path(wheel).name).group(1)
    return {"TORCH_VERSION": version, "wheel": wheel}


def host_ca_bundle() -> str | None:
    for candidate in (
        os.environ.get("PIP_CERT"),
        os.environ.get("REQUESTS_CA_BUNDLE"),
        "/etc/ssl/certs/ca-certificates.crt",
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@dataclass
class Stack:
    """A copy of the checkout plus the variables every make/compose call of the tier uses."""

    root: Path
    env: dict[str, str]
    tag: str
    uid: int
    timings: dict[str, object] = field(default_factory=lambda: MEASURED)

    @property
    def project(self) -> str:
        return self.env["COMPOSE_PROJECT_NAME"]

    def make(self, *args: str, timeout: float = 900, input: str | None = None, **extra: str):
        env = dict(self.env, **extra)
        return run(
            ["make", "-s", "--no-print-directory", *args, "GPU=0"],
            env=env,
            cwd=self.root,
            timeout=timeout,
            input=input if input is not None else "",
        )

    def must(self, *args: str, **kw) -> subprocess.CompletedProcess:
        out = self.make(*args, **kw)
        assert out.returncode == 0, (
            f"make {' '.join(args)} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        )
        return out

    def image(self, name: str, tag: str | None = None) -> dict:
        out = run(["docker", "image", "inspect", f"rldock/{name}:{tag or self.tag}"], timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)[0]

    def project_objects(self, kind: str) -> list[str]:
        """Containers (`ps -a`) or networks of this run's compose project."""
        label = f"label=com.docker.compose.project={self.project}"
        cmd = ["docker", "ps", "-a", "-q"] if kind == "container" else ["docker", "network", "ls", "-q"]
        return run([*cmd, "--filter", label], timeout=60).stdout.split()


def copy_checkout(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files: what a clone of this working tree would hold."""
    files = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], timeout=60).stdout
    for name in filter(None, files.split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def make_base_image(name: str) -> str | None:
    """docker/debian-base.sh NAME; None, or why it could not run."""
    if os.getuid() != 0 or shutil.which("debootstrap") is None:
        return "no base image: set RLDOCK_TEST_BASE_IMAGE, or run as root with debootstrap installed"
    out = run([str(ROOT / "docker/debian-base.sh"), name], timeout=900)
    return None if out.returncode == 0 else f"docker/debian-base.sh failed: {out.stderr.strip()[-300:]}"


@pytest.fixture(scope="session")
def stack(model_path):
    problem = engine_problem()
    if problem:
        unavailable(problem)
    torch = torch_source()
    if isinstance(torch, str):
        unavailable(torch)
    run_id = uuid.uuid4().hex[:8]
    made_base = None
    base = os.environ.get("RLDOCK_TEST_BASE_IMAGE")
    top = Path(tempfile.mkdtemp(prefix="rldock-docker-tier-"))
    tag = f"test-{run_id}"
    uid = TEST_UID if os.getuid() == 0 else os.getuid()
    env = dict(os.environ)
    for var in ("COMPOSE_FILE", "COMPOSE_PROFILES", "DOCKER_DEFAULT_PLATFORM", "TRAIN_ARGS", "ARGS"):
        env.pop(var, None)
    stack = None
    try:
        if not base:
            base = made_base = f"rldock-test/debian-python:{run_id}"
            t0 = time.monotonic()
            why = make_base_image(base)
            if why:
                made_base = None
                unavailable(why)
            MEASURED["debian_base_s"] = round(time.monotonic() - t0)
        root = top / "rldock"
        root.mkdir()
        copy_checkout(root)
        if "wheel" in torch:
            shutil.copy2(torch.pop("wheel"), root / "docker" / "wheels")
        models = root / "models"
        shutil.copytree(model_path, models / Path(model_path).name)
        for name in ("saves", "data"):
            (root / name).mkdir(exist_ok=True)
        if os.getuid() == 0:
            for path in [root, *root.rglob("*")]:
                os.lchown(path, uid, uid)
        env.update(
            torch,
            TAG=tag,
            COMPOSE_PROJECT_NAME=f"rldock-test-{run_id}",
            HOST_UID=str(uid),
            HOST_GID=str(uid),
            BASE_IMAGE=base,
            EVAL_BASE_IMAGE=base,
            FLASH_ATTN_VERSION="",
            VLLM_VERSION="",
            ROLLOUT_PORT=str(free_port()),
            ENV_PORT=str(free_port()),
            # A real index, passed as a secret: the layers must not hold it (test_secrets_stay_out_of_the_layers).
            PIP_INDEX_URL="https://pypi.org/simple",
        )
        if host_ca_bundle():
            env["PIP_CA_BUNDLE"] = host_ca_bundle()
        stack = Stack(root=root, env=env, tag=tag, uid=uid, timings=MEASURED)
        yield stack
    finally:
        _teardown(stack, made_base, top, tag)


def _teardown(stack: Stack | None, made_base: str | None, top: Path, tag: str) -> None:
    if stack is not None:
        for t in (tag, f"{tag}-root"):
            stack.make("docker-clean", TAG=t, timeout=300)
    if made_base:
        run(["docker", "image", "rm", made_base], timeout=120)
    # Build cache of the removed images (their layers, pip's downloads): without this each run leaves GBs behind.
    run(["docker", "builder", "prune", "-f"], timeout=300)
    shutil.rmtree(top, ignore_errors=True)
