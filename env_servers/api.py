"""The environment contract. Pure Python, no torch: env servers and the eval image import only this side.

An `Env` instance is one episode slot: `reset(idx)` loads item `idx` of its dataset, `step(action)` applies the
agent's text action. The FastAPI app (`env_servers.app`) and the in-process adapter wrap any `Env`.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Observation:
    """What the agent sees after reset: the task text (a prompt) and optional extras."""

    text: str
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StepResult:
    """Result of one action. `reward` is the reward of this step; `done` ends the episode."""

    observation: str
    reward: float
    done: bool
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EnvError(ValueError):
    """Bad input from the agent or the client (unknown idx, step after done…): servers answer 4xx with this text."""


class Env(abc.ABC):
    """One environment slot. Implementations must be safe to use from a worker thread (no signal-based timeouts)."""

    name: str = "env"

    @abc.abstractmethod
    def reset(self, idx: int) -> Observation: ...

    @abc.abstractmethod
    def step(self, action: str) -> StepResult: ...

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of dataset items `reset` accepts (0 .. len-1)."""

    def observation(self) -> str:
        """The current observation text (AgentGym's GET /observation)."""
        raise EnvError("no observation: call reset first")

    def available_actions(self) -> list[str]:
        """Actions valid now, where the env can list them (AgentGym's /available_actions)."""
        raise EnvError(f"{self.name} does not list its actions")

    def close(self) -> None:
        """Free resources held by this slot."""
