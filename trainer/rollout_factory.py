"""Which rollout engine the trainer talks to, and how new weights reach it.

Embedded (default): one process shares the trainer's live parameters with the engine when dtype and device match
(fp32 on CPU: no copy, a sync only bumps the version); otherwise — bf16 rollout on GPU, an FSDP-sharded model, async
rollout that must not see half-applied optimizer steps — every rank keeps its own replica, refreshed from a full
state dict. `rollout.backend=http` talks to rollout services; their weights travel through `trainer.weight_sync`.
"""

from __future__ import annotations

import torch
from torch import nn

from rollout.api import RolloutEngine
from trainer.config import Config, ConfigError
from trainer.dist import Dist, full_state_dict


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """model.dtype resolved: auto = bfloat16 on GPU, float32 on CPU."""
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.model.dtype)


def stop_ids(model: nn.Module, tokenizer) -> list[int]:
    """The model's EOS ids plus the tokenizer's (a chat model's end-of-turn token may only be named there)."""
    ids: list[int] = []
    for cfg in (getattr(model, "generation_config", None), model.config):
        eos = getattr(cfg, "eos_token_id", None)
        ids += [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))


def make_engine(cfg: Config, model: nn.Module, tokenizer, d: Dist | None = None, model_path: str | None = None):
    """The engine for this rank. `model` is the trainer's HF model (before sharding: the engine is built first)."""
    d = d or Dist()
    if cfg.rollout.backend == "http":
        from rollout.client import HTTPRolloutClient

        return HTTPRolloutClient(cfg.rollout.urls)
    if cfg.rollout.backend == "vllm":
        raise ConfigError("rollout.backend=vllm runs inside the rollout service: use rollout.backend=http")
    from rollout.engine import EmbeddedEngine

    kwargs = dict(
        device=d.device,
        dtype=compute_dtype(cfg, d.device),
        max_batch_size=cfg.rollout.max_batch_size,
        cuda_graphs=cfg.rollout.cuda_graphs,
        seed=cfg.train.seed + d.rank,
        eos_token_ids=stop_ids(model, tokenizer),
    )
    engine = EmbeddedEngine.from_module(model, **kwargs)
    if engine.aliased and (d.distributed or cfg.rollout.max_staleness > 0):
        engine.update_weights(model.state_dict(), version=0)  # a private copy: see the module docstring
    return engine


def sync_weights(engine: RolloutEngine, model: nn.Module, d: Dist, version: int) -> int:
    """Hand the trainer's current weights to the engine as `version`; every rank calls this."""
    from rollout.engine import EmbeddedEngine

    if isinstance(engine, EmbeddedEngine):
        source = model if getattr(engine, "aliased", False) else full_state_dict(model, d)
        return engine.update_weights(source, version=version)
    from trainer.weight_sync import push_weights

    return push_weights(engine, model, d, version)
