"""The docker CLI as the scripts that run before any venv exists use it (`make doctor`, `make docker-bundle`):
standard library only, and the one list of rldock's images and their names."""

from __future__ import annotations

import subprocess

IMAGES = ("base", "train", "scripts", "eval")


def image_ref(name: str, tag: str) -> str:
    return f"rldock/{name}:{tag}"


def docker(*args: str, timeout: float | None = 120) -> subprocess.CompletedProcess:
    """Run `docker ARGS`, capturing its output; FileNotFoundError when there is no docker CLI."""
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def not_built(refs: list[str]) -> list[str]:
    """The image references of `refs` the engine does not have."""
    return [ref for ref in refs if docker("image", "inspect", ref).returncode != 0]


def error_line(text: str) -> str:
    """The line of docker's stderr that says what went wrong (the last one), whole: no cut mid-word."""
    return (text.strip().splitlines() or ["no output"])[-1]
