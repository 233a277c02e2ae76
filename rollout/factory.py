"""Building a served engine from a model folder, one way for the rollout service, the eval runner and the benches
(the trainer builds its engine over the module it trains: trainer/rollout_factory.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rollout.api import ServedEngine


def model_limits(path: str) -> tuple[int, int]:
    """(vocab size, max positions) a model folder's config.json states (huge when it states none)."""
    cfg_file = Path(path) / "config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    cfg = cfg.get("text_config", cfg)
    return int(cfg.get("vocab_size", 2**31 - 1)), int(cfg.get("max_position_embeddings", 2**31 - 1))


def build_engine(
    path: str,
    backend: str = "embedded",
    device: str = "auto",
    dtype: str = "auto",
    max_batch_size: int = 64,
    seed: int = 0,
    threads: int | None = None,
    **vllm: Any,
) -> ServedEngine:
    """The engine a service or a tool runs over the model folder `path`: the embedded engine (device and dtype
    resolved by rollout.defaults), or vLLM (`vllm`: gpu_memory_utilization, tensor_parallel_size)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if backend == "vllm":
        from rollout.vllm_backend import VLLMEngine

        return VLLMEngine(path, dtype=dtype, seed=seed, max_batch_size=max_batch_size, **vllm)
    from rollout.defaults import resolve_device, resolve_dtype
    from rollout.engine import EmbeddedEngine

    where = resolve_device(device)
    if where.type == "cuda":
        where = torch.device("cuda", torch.cuda.current_device() if where.index is None else where.index)
        torch.cuda.set_device(where)  # NCCL weight sync uses the current device
    dtype_ = resolve_dtype(dtype, where)
    return EmbeddedEngine(path, device=where, dtype=dtype_, max_batch_size=max_batch_size, seed=seed)
