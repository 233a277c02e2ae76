"""The rollout contract: what every generation backend (embedded, vLLM, HTTP client) implements.

Pure Python, no torch: the eval image and the HTTP client import this module.
"""

from __future__ import annotations

import abc
import operator
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

from annotated_types import Ge, Gt, Le

FINISH_STOP = "stop"  # an EOS / stop token was sampled (it is included in token_ids)
FINISH_LENGTH = "length"  # max_new_tokens reached
FINISH_ABORT = "abort"  # generation was paused/aborted mid-way
# Above this the distribution is uniform to float32 precision: a larger value only overflows (1e39 did, as a 500).
MAX_TEMPERATURE = 100.0

# The sampling fields' bounds, written once: SamplingParams checks them, and the pydantic models of the service's
# requests and of the trainer's config declare their fields with these types (pydantic reads the same constraints).
Count = Annotated[int, Ge(1)]
Temperature = Annotated[float, Ge(0), Le(MAX_TEMPERATURE)]
TopP = Annotated[float, Gt(0), Le(1)]
TopK = Annotated[int, Ge(0)]  # 0 disables top-k
BOUNDS = {"n": Count, "temperature": Temperature, "top_p": TopP, "top_k": TopK, "max_new_tokens": Count}


_TESTS = {Ge: ("ge", ">=", operator.ge), Gt: ("gt", ">", operator.gt), Le: ("le", "<=", operator.le)}


def check_bounds(name: str, value: float) -> None:
    """ValueError naming `name` when `value` breaks its BOUNDS entry (NaN breaks every bound)."""
    for constraint in BOUNDS[name].__metadata__:
        attr, sign, test = _TESTS[type(constraint)]
        limit = getattr(constraint, attr)
        if not test(value, limit):
            raise ValueError(f"{name} must be {sign} {limit:g}, got {value}")


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
        for name in BOUNDS:
            check_bounds(name, getattr(self, name))

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


def prompt_caps(prompts: list[list[int]], params: SamplingParams, caps: list[int] | None) -> list[int]:
    """Each prompt's new-token cap: `caps` (one per prompt, each in 1..params.max_new_tokens), or
    params.max_new_tokens for all. ValueError naming `max_new_tokens` otherwise."""
    if caps is None:
        return [params.max_new_tokens] * len(prompts)
    if len(caps) != len(prompts):
        raise ValueError(f"max_new_tokens has {len(caps)} caps for {len(prompts)} prompts")
    bad = [c for c in caps if not 1 <= operator.index(c) <= params.max_new_tokens]
    if bad:
        raise ValueError(f"max_new_tokens caps must be in 1..{params.max_new_tokens}, got {bad[0]}")
    return [operator.index(c) for c in caps]


class RolloutEngine(abc.ABC):
    """A generation backend. `generate` returns `len(prompts) * params.n` completions, grouped by prompt
    (all n samples of prompt 0 first), each tagged with the weight version that produced every one of its tokens.
    `max_new_tokens`, when given, caps each prompt's samples on its own (`prompt_caps`): a batch of mixed lengths
    pays for the tokens each row may have, not for the longest row's."""

    @abc.abstractmethod
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, max_new_tokens: list[int] | None = None
    ) -> list[Completion]: ...

    @abc.abstractmethod
    def update_weights(self, source: Any, version: int | None = None) -> int:
        """Load new weights and return the new weight version.

        `source` is backend specific: a state dict / module (in-process), a safetensors folder path (disk), or a
        handle naming an NCCL broadcast. `version=None` bumps the current version by one.
        """

    @property
    @abc.abstractmethod
    def weight_version(self) -> int: ...

    def close(self) -> None:
        """Release resources (GPU memory, sockets)."""


class ServedEngine(RolloutEngine):
    """What the rollout service needs of an engine beyond generation: joining the trainer's weight-sync group,
    receiving a broadcast into it, and a checksum of the weights it serves (rollout/server.py). The embedded engine
    and the vLLM backend implement it; the HTTP client does not (it is the other end)."""

    sync_ranks: int = 1
    """Ranks this engine occupies in the weight-sync group (vLLM: one per worker)."""

    @abc.abstractmethod
    def init_weight_sync(
        self, host: str, port: int, rank_offset: int, world_size: int, backend: str, timeout_s: float
    ) -> None:
        """Join the trainer's group (its TCP store at host:port) as ranks rank_offset .. rank_offset+sync_ranks-1."""

    @abc.abstractmethod
    def receive_weights(self, manifest: list[dict], bucket_bytes: int, version: int | None) -> int:
        """Receive one broadcast of the tensors `manifest` names; returns the new weight version."""

    @abc.abstractmethod
    def close_weight_sync(self) -> None:
        """Leave the group (a no-op when not in one)."""

    @abc.abstractmethod
    def weights_checksum(self) -> str:
        """sha256 over the weights served (bit-identity checks of a sync)."""
