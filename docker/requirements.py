"""Print the pip requirements of one rldock image, one per line: the single source the Dockerfiles and the
import-isolation tests both read, so an image's dependency list cannot drift from what the tests check.

    python docker/requirements.py train|scripts|eval [--pyproject pyproject.toml]

train and scripts take `[project].dependencies` from pyproject.toml (plus ruff for scripts); torch and flash-attn
come from the base image, vLLM from a layer of its own in train (VLLM_VERSION, pinned to the base's torch). eval is slim, no torch: docker/eval-requirements.txt plus
the sciworld extra (its image has the Java runtime ScienceWorld needs).
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXTRAS = {"train": [], "scripts": [], "eval": ["sciworld"]}
DEV_PICKS = {"train": [], "scripts": ["ruff"], "eval": []}


def _name(req: str) -> str:
    """Distribution name of a requirement string (`ruff>=0.6,<1` → `ruff`)."""
    for i, ch in enumerate(req):
        if not (ch.isalnum() or ch in "-_."):
            return req[:i].strip()
    return req.strip()


def eval_requirements() -> list[str]:
    lines = (HERE / "eval-requirements.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def requirements(image: str, pyproject: Path = HERE.parent / "pyproject.toml") -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    reqs = eval_requirements() if image == "eval" else list(project["dependencies"])
    for extra in EXTRAS[image]:
        reqs += optional.get(extra, [])
    reqs += [r for r in optional.get("dev", []) if _name(r) in DEV_PICKS[image]]
    return reqs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", choices=sorted(EXTRAS))
    parser.add_argument("--pyproject", type=Path, default=HERE.parent / "pyproject.toml")
    args = parser.parse_args(argv)
    print("\n".join(requirements(args.image, args.pyproject)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
