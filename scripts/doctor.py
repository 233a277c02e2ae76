"""`make doctor`: is this machine ready for rldock's Docker stack? One line per check: `ok` or what to do.

Checks, through the Docker SDK: the daemon answers, the NVIDIA runtime is installed, containers see GPUs, the
rldock images of TAG are built, the published ports are free (or held by rldock's own containers), and the mounted
folders are writable by the uid the containers run as. With no daemon it prints that in one line and stops.
Exit code: 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from scripts.local_stack import port_free

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ("base", "train", "scripts", "eval")
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


# ---------------------------------------------------------------- checks through the daemon


def _why(err: Exception) -> str:
    text = str(err)
    if "Permission denied" in text:
        return "permission denied: sudo usermod -aG docker $USER, then log in again"
    if "No such file" in text or "FileNotFoundError" in text:
        return "no socket there"
    if "Connection refused" in text or "NewConnectionError" in text:
        return "connection refused"
    return (text.strip().splitlines() or [type(err).__name__])[0][:100]


def connect():
    """A docker client, or a one-line reason why there is none."""
    try:
        import docker
    except ImportError:
        return None, "the docker Python SDK is missing: run make install"
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except Exception as err:  # the SDK raises many types (DockerException, requests errors, FileNotFoundError)
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        return None, (
            f"Docker daemon not reachable at {where} ({_why(err)}): start Docker (sudo systemctl start docker; "
            "WSL2: enable Docker Desktop's WSL integration) or set DOCKER_HOST"
        )
    return client, None


def check_daemon(client) -> list[Check]:
    version = client.version()
    out = [Check(True, f"Docker daemon {version.get('Version', '?')} reachable")]
    if shutil.which("docker") is None:
        out.append(Check(False, "docker CLI not on PATH: install docker-ce-cli and the compose plugin"))
    runtimes = client.info().get("Runtimes", {})
    if "nvidia" in runtimes or shutil.which("nvidia-container-runtime-hook"):
        out.append(Check(True, "NVIDIA container runtime present"))
    else:
        out.append(
            Check(
                False,
                "NVIDIA runtime missing: install nvidia-container-toolkit, run "
                "sudo nvidia-ctk runtime configure --runtime=docker, restart Docker",
            )
        )
    return out


def check_images(client, tag: str) -> list[Check]:
    import docker

    missing = []
    for name in IMAGES:
        try:
            client.images.get(f"rldock/{name}:{tag}")
        except docker.errors.ImageNotFound:
            missing.append(f"rldock/{name}:{tag}")
    if missing:
        return [Check(False, f"images not built: {', '.join(missing)}: make docker-build TAG={tag}")]
    return [Check(True, f"images rldock/{{{','.join(IMAGES)}}}:{tag} built")]


def check_gpus(client, tag: str) -> list[Check]:
    """Run nvidia-smi -L in the base image with every GPU requested, as compose's reservations would."""
    import docker

    image = f"rldock/base:{tag}"
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        return [Check(False, f"GPUs not tested: {image} is needed to run nvidia-smi: make docker-build-base")]
    request = docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])
    try:
        out = client.containers.run(image, ["nvidia-smi", "-L"], device_requests=[request], remove=True)
    except docker.errors.DockerException as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        return [Check(False, f"containers see no GPU ({first}): check the driver (nvidia-smi on the host) and toolkit")]
    gpus = [line for line in out.decode(errors="replace").splitlines() if line.startswith("GPU ")]
    return [Check(bool(gpus), f"{len(gpus)} GPU(s) visible in containers" + (f": {gpus[0]}" if gpus else ""))]


def rldock_ports(client) -> dict[int, str]:
    held = {}
    for container in client.containers.list():
        if not container.name.startswith("rldock"):
            continue
        for bindings in (container.ports or {}).values():
            for b in bindings or []:
                held[int(b["HostPort"])] = container.name
    return held


def run() -> int:
    client, problem = connect()
    if client is None:
        print(f"FIX  {problem}")
        return 1
    tag = setting("TAG", "latest")
    uid, gid = int(setting("HOST_UID", str(os.getuid()))), int(setting("HOST_GID", str(os.getgid())))
    ports = {"ROLLOUT_PORT": int(setting("ROLLOUT_PORT", "8000")), "ENV_PORT": int(setting("ENV_PORT", "36001"))}
    checks = check_daemon(client) + check_images(client, tag) + check_gpus(client, tag)
    checks += check_ports(ports, rldock_ports(client)) + check_volumes(ROOT, uid, gid)
    for check in checks:
        print(check.line())
    return 0 if all(c.ok for c in checks) else 1


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m scripts.doctor", description=__doc__.splitlines()[0]).parse_args(argv)
    return run()


if __name__ == "__main__":
    sys.exit(main())
