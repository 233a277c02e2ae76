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

# name → (module, wire protocol; see env_servers.protocol)
ENVS: dict[str, tuple[str, str]] = {
    "gsm8k": ("env_servers.gsm8k", "agentgym"),
    "gsm8k_tools": ("env_servers.gsm8k_tools", "agentgym"),
    "babyai": ("env_servers.babyai", "agentgym"),
    "sciworld": ("env_servers.sciworld", "agentgym"),
    "searchqa": ("env_servers.searchqa", "searchqa"),
}


class EnvUnavailable(EnvError):
    """The env's optional dependencies (a package, Java) are missing here."""


def check_name(name: str) -> None:
    if name not in ENVS:
        raise EnvError(f"unknown env {name!r}; valid names: {', '.join(ENVS)}")


def protocol_of(name: str) -> str:
    check_name(name)
    return ENVS[name][1]


def make_factory(name: str, data: str | None = None, **options: Any) -> Callable[[], Env]:
    """The slot constructor of env `name`; `data` overrides its dataset; options go to its factory (checked)."""
    check_name(name)
    module = importlib.import_module(ENVS[name][0])
    accepted = inspect.signature(module.factory).parameters
    unknown = sorted(k for k, v in options.items() if v is not None and k not in accepted)
    if unknown:
        raise EnvError(f"env {name!r} takes no option(s) {', '.join(unknown)}")
    return module.factory(data, **{k: v for k, v in options.items() if v is not None})
