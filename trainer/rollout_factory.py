"""Which rollout engine the trainer talks to (how new weights reach it: trainer/weight_sync.py).

Embedded (default): one process shares the trainer's live parameters with the engine when dtype and device match
(fp32 on CPU: no copy, a sync only bumps the version); otherwise — bf16 rollout on GPU, an FSDP-sharded model, async
rollout that must not see half-applied optimizer steps — every rank keeps its own replica, refreshed from a full
state dict. `rollout.backend=http` talks to rollout services (which run the embedded engine or vLLM); rank 0 pushes
the gathered weights to them (the config's `weight_sync`: disk or nccl).
"""

from __future__ import annotations

import torch
from torch import nn

from rollout.defaults import eos_ids_of_module, resolve_dtype
from trainer.config import Config
from trainer.dist import Dist


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
