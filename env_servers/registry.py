"""Names of the environments and how to build them. Modules are imported only when their env is asked for.

Each env module defines `factory(data=None, **options) -> Callable[[], Env]`: it loads shared data once and returns
a constructor of env slots.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from env_servers.api import Env, EnvError
from env_servers.protocol import RLDOCK_WIRE, Wire

# name → module; a module defines `factory` and may define `WIRE` (its AgentGym server's answer shapes)
ENVS: dict[str, str] = {
    "gsm8k": "env_servers.gsm8k",
    "gsm8k_tools": "env_servers.gsm8k_tools",
    "babyai": "env_servers.babyai",
    "sciworld": "env_servers.sciworld",
    "searchqa": "env_servers.searchqa",
    "textcraft": "env_servers.textcraft",
}


class EnvUnavailable(EnvError):
    """The env's optional dependencies (a package, Java) are missing here."""


def check_name(name: str) -> None:
    if name not in ENVS:
        raise EnvError(f"unknown env {name!r}; valid names: {', '.join(ENVS)}")


def wire_of(name: str) -> Wire:
    """How env `name`'s AgentGym server shapes its answers (rldock's own envs: `RLDOCK_WIRE`)."""
    check_name(name)
    return getattr(importlib.import_module(ENVS[name]), "WIRE", RLDOCK_WIRE)


def make_factory(name: str, data: str | None = None, **options: Any) -> Callable[[], Env]:
    """The slot constructor of env `name`; `data` overrides its dataset; options go to its factory (checked)."""
    check_name(name)
    module = importlib.import_module(ENVS[name])
    accepted = inspect.signature(module.factory).parameters
    unknown = sorted(k for k, v in options.items() if v is not None and k not in accepted)
    if unknown:
        raise EnvError(f"env {name!r} takes no option(s) {', '.join(unknown)}")
    return module.factory(data, **{k: v for k, v in options.items() if v is not None})
