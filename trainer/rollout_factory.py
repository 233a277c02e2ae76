"""Which rollout engine the trainer talks to, and how new weights reach it.

Embedded (default): one process shares the trainer's live parameters with the engine when dtype and device match
(fp32 on CPU: no copy, a sync only bumps the version); otherwise — bf16 rollout on GPU, an FSDP-sharded model, async
rollout that must not see half-applied optimizer steps — every rank keeps its own replica, refreshed from a full
state dict. `rollout.backend=http` talks to rollout services; rank 0 pushes the gathered weights to them through
`trainer.weight_sync` (disk or nccl, `train.weight_sync`).
"""

from __future__ import annotations

import torch
from torch import nn

from rollout.api import RolloutEngine
from rollout.defaults import eos_ids_of_module, resolve_dtype
from trainer.config import Config, ConfigError
from trainer.dist import Dist, full_state_dict


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """model.dtype resolved for `device` (rollout.defaults: auto = bfloat16 on GPU, float32 on CPU)."""
    return resolve_dtype(cfg.model.dtype, device)


def make_engine(cfg: Config, model: nn.Module, tokenizer, d: Dist | None = None, model_path: str | None = None):
    """The engine for this rank. `model` is the trainer's HF model (before sharding: the engine is built first)."""
    d = d or Dist()
    if cfg.rollout.backend == "http":
        from rollout.auth import admin_token
        from rollout.client import HTTPRolloutClient

        return HTTPRolloutClient(cfg.rollout.urls, cfg.rollout.timeout_s, cfg.train.recovery_s, token=admin_token())
    if cfg.rollout.backend == "vllm":
        raise ConfigError("rollout.backend=vllm runs inside the rollout service: use rollout.backend=http")
    from rollout.engine import EmbeddedEngine

    kwargs = dict(
        device=d.device,
        dtype=compute_dtype(cfg, d.device),
        max_batch_size=cfg.rollout.max_batch_size,
        cuda_graphs=cfg.rollout.cuda_graphs,
        seed=cfg.train.seed + d.rank,
        eos_token_ids=eos_ids_of_module(model, tokenizer),
    )
    engine = EmbeddedEngine.from_module(model, **kwargs)
    if engine.aliased and (d.distributed or cfg.rollout.max_staleness > 0):
        engine.update_weights(model.state_dict(), version=0)  # a private copy: see the module docstring
    return engine


class WeightPusher:
    """Hands the trainer's current weights to the engine as a given version; every rank calls `push`."""

    def __init__(self, cfg: Config, engine: RolloutEngine, d: Dist):
        from rollout.engine import EmbeddedEngine

        self.engine, self.d = engine, d
        self.embedded = isinstance(engine, EmbeddedEngine)
        if self.embedded and cfg.train.weight_sync != "inprocess":
            raise ConfigError("rollout.backend=embedded syncs in-process: set train.weight_sync=inprocess")
        self.remote = None
        if not self.embedded:
            from trainer.weight_sync import make_weight_sync

            self.remote = make_weight_sync(cfg, engine) if d.is_main else None

    def push(self, model: nn.Module, version: int) -> int:
        if self.embedded:  # every rank feeds its own replica (or only bumps the version of an aliasing engine)
            source = model if self.engine.aliased else full_state_dict(model, self.d)
            return self.engine.update_weights(source, version=version)
        weights = full_state_dict(model, self.d)  # a collective under FSDP: every rank gathers
        if self.remote is not None:
            self.remote.push(weights, version)  # the services are shared: rank 0 alone pushes
        return version

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()
