"""The rollout contract: what every generation backend (embedded, vLLM, HTTP client) implements.

Pure Python, no torch: the eval image and the HTTP client import this module.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, field
from typing import Any

FINISH_STOP = "stop"  # an EOS / stop token was sampled (it is included in token_ids)
FINISH_LENGTH = "length"  # max_new_tokens reached
FINISH_ABORT = "abort"  # generation was paused/aborted mid-way
# Above this the distribution is uniform to float32 precision: a larger value only overflows (1e39 did, as a 500).
MAX_TEMPERATURE = 100.0


@dataclass
class SamplingParams:
    """How to sample. `n` completions are drawn per prompt (the GRPO group)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    max_new_tokens: int = 256
    stop_token_ids: list[int] = field(default_factory=list)  # added to the model's EOS ids
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:  # NaN fails this too
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE:g}] (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Completion:
    """One sampled continuation of one prompt.

    `logprobs[i]` is the log-probability of `token_ids[i]` under the sampling distribution's *unmodified* policy
    (temperature 1, no top-p/top-k truncation), i.e. the behaviour policy GRPO's importance ratio needs.
    """

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    weight_version: int
    prompt_index: int = 0  # which prompt of the request this answers (requests expand each prompt to n)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Completion:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class RolloutEngine(abc.ABC):
    """A generation backend. `generate` returns `len(prompts) * params.n` completions, grouped by prompt
    (all n samples of prompt 0 first), each tagged with the weight version that produced every one of its tokens."""

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]: ...

    @abc.abstractmethod
    def update_weights(self, source: Any, version: int | None = None) -> int:
        """Load new weights and return the new weight version.

        `source` is backend specific: a state dict / module (in-process), a safetensors folder path (disk), or a
        handle naming an NCCL broadcast. `version=None` bumps the current version by one.
        """

    @property
    @abc.abstractmethod
    def weight_version(self) -> int: ...

    def pause(self) -> None:
        """Stop admitting new generations (in-flight ones finish or abort). Default: nothing to do."""

    def resume(self) -> None:
        """Admit generations again after `pause`."""

    def close(self) -> None:
        """Release resources (GPU memory, sockets)."""
