"""The trainer's contract: trajectories and the workflows that produce them. GRPO only ever sees trajectories."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Protocol

from rollout.api import RolloutEngine


@dataclass
class Trajectory:
    """One sampled episode, flattened to tokens.

    `loss_mask[i]` is 1 where `token_ids[i]` was produced by the model (trained on), 0 on prompt and environment
    observation tokens. `logprobs[i]` is the behaviour policy's log-prob of `token_ids[i]` (0 where the mask is 0).
    """

    token_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float]
    reward: float
    weight_version: int
    group_id: int = 0  # trajectories sharing a group_id are normalised together (same prompt)
    info: dict[str, Any] = field(default_factory=dict)  # e.g. correct, format_ok, num_rounds, finish_reason

    def __post_init__(self) -> None:
        if not (len(self.token_ids) == len(self.loss_mask) == len(self.logprobs)):
            raise ValueError(
                f"trajectory lengths differ: tokens {len(self.token_ids)}, mask {len(self.loss_mask)}, "
                f"logprobs {len(self.logprobs)}"
            )

    @property
    def num_model_tokens(self) -> int:
        return sum(self.loss_mask)


class Workflow(abc.ABC):
    """Turns a batch of data items into trajectories with the engine (and environments).

    Each item yields `n` trajectories sharing the item's group id. Batched so that one engine call serves every
    prompt of a round. A None in the result rejects that trajectory; GRPO never sees it.
    """

    @abc.abstractmethod
    def run(
        self, engine: RolloutEngine, items: list[dict[str, Any]], group_ids: list[int]
    ) -> list[Trajectory | None]: ...

    @abc.abstractmethod
    def reseed(self, seed: int) -> None:
        """The sampling seed of the next `run` (the trainer derives it from the step, so a resumed run samples as
        an unbroken one). It rebinds attributes, never mutates shared ones: the async source runs each call on a
        shallow copy taken right after the reseed (trainer/async_rollout.py)."""


class BatchSource(Protocol):
    """Where the trainer takes each step's trajectories from: generated now (synchronous) or ahead of time by a
    producer thread within the staleness bound (trainer/async_rollout.py)."""

    def next_batch(self, version: int) -> list[Trajectory | None]: ...

    def close(self) -> None: ...
