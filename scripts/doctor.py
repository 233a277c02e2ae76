"""`make doctor`: is this machine ready for rldock's Docker stack? One line per check: `ok` or what to do.

Checks, through the docker CLI (standard library only: it runs before any venv exists): the daemon answers,
compose v2 is there, the NVIDIA runtime is installed (or CPU mode, --cpu), containers see GPUs, the rldock images of
TAG are built, the published ports are free (or held by rldock's own containers), and the mounted folders are
writable by the uid the containers run as. Nothing is left behind (the GPU probe runs with --rm).
Exit code: 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from scripts.docker_cli import IMAGES, docker, error_line, image_ref, not_built
from scripts.local_stack import port_free

ROOT = Path(__file__).resolve().parent.parent
VOLUMES = ("models", "saves", "data")


@dataclass
class Check:
    ok: bool
    text: str

    def line(self) -> str:
        return f"{'ok ' if self.ok else 'FIX'}  {self.text}"


def setting(name: str, default: str) -> str:
    """A variable as compose sees it: the shell first, then .env, then the default."""
    if os.environ.get(name):
        return os.environ[name]
    from scripts.local_stack import load_dotenv

    return load_dotenv(ROOT / ".env").get(name) or default


# ---------------------------------------------------------------- checks that need no daemon


def check_ports(ports: dict[str, int], held_by_rldock: dict[int, str]) -> list[Check]:
    """`ports`: variable name → port. A port held by one of rldock's containers counts as fine."""
    out = []
    for var, port in ports.items():
        if port in held_by_rldock:
            out.append(Check(True, f"port {port} ({var}) is served by container {held_by_rldock[port]}"))
        elif port_free(port):
            out.append(Check(True, f"port {port} ({var}) is free on 127.0.0.1"))
        else:
            out.append(Check(False, f"port {port} ({var}) is taken by another program: stop it or set {var} in .env"))
    return out


def check_volumes(root: Path, uid: int, gid: int) -> list[Check]:
    """The bind-mounted folders must exist (Docker would create them owned by root) and belong to uid."""
    out = []
    for name in VOLUMES:
        path = root / name
        if not path.is_dir():
            out.append(Check(False, f"{name}/ is missing: mkdir {name} (Docker would create it owned by root)"))
        elif path.stat().st_uid != uid:
            owner = path.stat().st_uid
            out.append(
                Check(
                    False, f"{name}/ belongs to uid {owner}, containers run as {uid}: sudo chown -R {uid}:{gid} {name}"
                )
            )
        else:
            out.append(Check(True, f"{name}/ is writable by uid {uid}"))
    return out


# ---------------------------------------------------------------- checks through the docker CLI


def check_daemon() -> tuple[list[Check], bool]:
    """(checks, whether the daemon answers)."""
    if shutil.which("docker") is None:
        return [Check(False, "docker CLI not on PATH: install Docker Engine (docker-ce or docker.io)")], False
    out = docker("version", "--format", "{{.Server.Version}}")
    if out.returncode != 0:
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        why = error_line(out.stderr)
        fix = (
            "sudo usermod -aG docker $USER, then log in again"
            if "permission denied" in why.lower()
            else (
                "start Docker (sudo systemctl start docker; WSL2: Docker Desktop's WSL integration) or set DOCKER_HOST"
            )
        )
        return [Check(False, f"Docker daemon not reachable at {where} ({why}): {fix}")], False
    checks = [Check(True, f"Docker daemon {out.stdout.strip()} reachable")]
    compose = docker("compose", "version", "--short")
    if compose.returncode == 0:
        checks.append(Check(True, f"docker compose {compose.stdout.strip()} (v2)"))
    else:
        checks.append(
            Check(False, "docker compose v2 missing: install the compose plugin (docker-compose-plugin) (DOCS.md, CI)")
        )
    return checks, True


def check_nvidia(cpu: bool) -> tuple[list[Check], bool]:
    """(checks, whether containers can ask for GPUs). With cpu=True a missing runtime is only reported."""
    runtimes = docker("info", "--format", "{{json .Runtimes}}").stdout
    if "nvidia" in runtimes or shutil.which("nvidia-container-runtime-hook"):
        return [Check(True, "NVIDIA container runtime present")], True
    if cpu:
        return [Check(True, "no NVIDIA runtime: CPU mode (GPU=0), the GPU services run on the CPU")], False
    return [
        Check(
            False,
            "no NVIDIA runtime, so the GPU services (train, rollout) cannot start: install nvidia-container-toolkit "
            "and run sudo nvidia-ctk runtime configure --runtime=docker, or use CPU mode: make docker-… GPU=0",
        )
    ], False


def check_images(tag: str) -> list[Check]:
    missing = not_built([image_ref(n, tag) for n in IMAGES])
    if missing:
        return [Check(False, f"images not built: {', '.join(missing)}: make docker-build TAG={tag}")]
    return [Check(True, f"images rldock/{{{','.join(IMAGES)}}}:{tag} built")]


def check_gpus(tag: str) -> list[Check]:
    """nvidia-smi -L in the base image with every GPU requested, as compose's reservations would; --rm: no leftover."""
    image = image_ref("base", tag)
    if not_built([image]):
        return [Check(False, f"GPUs not tested: {image} is needed to run nvidia-smi: make docker-build-base")]
    out = docker("run", "--rm", "--gpus", "all", "--entrypoint", "nvidia-smi", image, "-L", timeout=120)
    if out.returncode != 0:
        return [Check(False, f"containers see no GPU ({error_line(out.stderr)}): check nvidia-smi on the host")]
    gpus = [line for line in out.stdout.splitlines() if line.startswith("GPU ")]
    return [Check(bool(gpus), f"{len(gpus)} GPU(s) visible in containers" + (f": {gpus[0]}" if gpus else ""))]


def rldock_ports() -> dict[int, str]:
    """Host ports published by running rldock containers (any compose project named rldock*)."""
    out = docker("ps", "--filter", "name=rldock", "--format", "{{.Names}}\t{{.Ports}}").stdout
    held = {}
    for line in out.splitlines():
        name, _, ports = line.partition("\t")
        for port in re.findall(r":(\d+)->", ports):
            held[int(port)] = name
    return held


def run(cpu: bool) -> int:
    checks, up = check_daemon()
    if not up:  # everything else would only repeat it
        print(checks[0].line())
        return 1
    tag = setting("TAG", "latest")
    uid, gid = int(setting("HOST_UID", str(os.getuid()))), int(setting("HOST_GID", str(os.getgid())))
    ports = {"ROLLOUT_PORT": int(setting("ROLLOUT_PORT", "8000")), "ENV_PORT": int(setting("ENV_PORT", "36001"))}
    nvidia, gpus_possible = check_nvidia(cpu)
    checks += nvidia + check_images(tag) + (check_gpus(tag) if gpus_possible else [])
    checks += check_ports(ports, rldock_ports()) + check_volumes(ROOT, uid, gid)
    for check in checks:
        print(check.line())
    return 0 if all(c.ok for c in checks) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="CPU mode (make … GPU=0): no NVIDIA runtime is fine")
    return run(parser.parse_args(argv).cpu)


if __name__ == "__main__":
    sys.exit(main())
