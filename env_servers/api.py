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
    """What the agent sees after reset: the task text (a prompt) and optional extras. `reward` and `score` are what
    AgentGym's servers report at reset (sciworld's opening "look around" can already score); `fields` holds the
    env's other reset fields on the wire (sciworld's task_name, var_num, task_description)."""

    text: str
    info: dict[str, Any] = field(default_factory=dict)
    reward: float = 0
    score: float = 0
    fields: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StepResult:
    """Result of one action. `reward` is the reward of this step; `done` ends the episode. `score` is the episode's
    score when the env keeps one of its own (sciworld's game score); None: the sum of the rewards so far."""

    observation: str
    reward: float
    done: bool
    info: dict[str, Any] = field(default_factory=dict)
    score: float | None = None

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
        """Actions valid now, where the env can list them (rldock's GET /available_actions)."""
        raise EnvError(f"{self.name} does not list its actions")

    def query(self, what: str) -> Any:
        """Answer an extra GET route of the env's AgentGym server (sciworld's "goals", "action_hint", ...)."""
        raise EnvError(f"{self.name} answers no {what!r} query")

    def close(self) -> None:
        """Free resources held by this slot."""
