"""Checkpoints in the layout DOCS.md describes (saves/<exp>/global_step_N/...), with and without a process group.

Model and optimizer go through torch.distributed.checkpoint (DCP): every rank writes its own shard, HF parameter
names are the keys, and a checkpoint written by W ranks loads into any other number of ranks. A checkpoint is written
as `global_step_N.tmp/` and renamed only when every rank has finished, then `latest` is replaced atomically, so a
crash mid-write leaves the previous checkpoint in charge and the `.tmp` folder is cleaned at the next start.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.dist import Dist, barrier

_STEP_DIR = re.compile(r"^global_step_(\d+)$")
LATEST = "latest"


def step_of(path: Path) -> int:
    match = _STEP_DIR.match(path.name)
    if not match:
        raise ValueError(f"{path} is not a global_step_N checkpoint folder")
    return int(match.group(1))


def is_complete(path: Path) -> bool:
    return (path / "trainer_state.json").is_file() and (path / "actor" / "model" / ".metadata").is_file()


def complete_checkpoints(exp_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest write first (a fresh run may write lower step numbers than an old one)."""
    found = [p for p in Path(exp_dir).glob("global_step_*") if _STEP_DIR.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: ((p / "trainer_state.json").stat().st_mtime, step_of(p)))


def find_latest(exp_dir: Path) -> Path | None:
    """The checkpoint `latest` names, or the newest complete one when the pointer is missing or stale."""
    pointer = Path(exp_dir) / LATEST
    if pointer.is_file():
        named = Path(exp_dir) / pointer.read_text().strip()
        if _STEP_DIR.match(named.name) and is_complete(named):
            return named
    done = complete_checkpoints(exp_dir)
    return done[-1] if done else None


def clean_partial(exp_dir: Path) -> list[Path]:
    """Remove half-written checkpoints (`*.tmp`) left by a crash; returns what was removed."""
    removed = [p for p in Path(exp_dir).glob("*.tmp") if p.exists()]
    for p in removed:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return removed


@contextlib.contextmanager
def _single_process_ok():
    """DCP warns on every call made without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _save_metadata(tmp: Path, model: nn.Module, scheduler, tokenizer, trainer_state: dict, world_size: int) -> None:
    actor = tmp / "actor"
    torch.save(scheduler.state_dict(), actor / "scheduler.pt")
    model.config.save_pretrained(actor)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(actor)
    tokenizer.save_pretrained(actor)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    meta = {"world_size": world_size, "dtype": dtype, "format": "dcp", "step": trainer_state["step"]}
    _write_json(actor / "meta.json", meta)
    _write_json(tmp / "trainer_state.json", trainer_state)


def _publish(exp_dir: Path, tmp: Path, final: Path) -> None:
    if final.exists():  # left by an earlier run started with checkpoint.resume=false
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer_tmp = exp_dir / (LATEST + ".tmp")
    pointer_tmp.write_text(final.name + "\n")
    os.replace(pointer_tmp, exp_dir / LATEST)


def prune(exp_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the `keep_last` most recently written checkpoints (never the one `latest` names)."""
    keep = find_latest(exp_dir)
    old = [p for p in complete_checkpoints(exp_dir)[:-keep_last] if p != keep]
    for p in old:
        shutil.rmtree(p)
    return old


def save(
    exp_dir: Path, *, model, optimizer, scheduler, tokenizer, trainer_state: dict, d: Dist, keep_last: int
) -> Path:
    """Write global_step_<trainer_state['step']>/ from every rank; rank 0 writes metadata and moves `latest`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    exp_dir = Path(exp_dir)
    final = exp_dir / f"global_step_{trainer_state['step']}"
    tmp = final.with_name(final.name + ".tmp")
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "actor").mkdir(parents=True)
    barrier(d)
    with _single_process_ok():
        dcp.save(get_model_state_dict(model), checkpoint_id=tmp / "actor" / "model")
        dcp.save(get_optimizer_state_dict(model, optimizer), checkpoint_id=tmp / "actor" / "optim")
    torch.save(_rng_state(), tmp / f"rng_rank_{d.rank}.pt")
    barrier(d)
    if d.is_main:
        _save_metadata(tmp, model, scheduler, tokenizer, trainer_state, d.world_size)
        _publish(exp_dir, tmp, final)
        prune(exp_dir, keep_last)
    barrier(d)
    return final


def load(ckpt: Path, *, model, optimizer, scheduler, d: Dist) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from `ckpt`; return its trainer_state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    ckpt = Path(ckpt)
    with _single_process_ok():
        model_sd = get_model_state_dict(model)
        dcp.load(model_sd, checkpoint_id=ckpt / "actor" / "model")
        set_model_state_dict(model, model_sd)
        optim_sd = get_optimizer_state_dict(model, optimizer)
        dcp.load(optim_sd, checkpoint_id=ckpt / "actor" / "optim")
        set_optimizer_state_dict(model, optimizer, optim_sd)
    scheduler.load_state_dict(torch.load(ckpt / "actor" / "scheduler.pt", weights_only=True))
    rng = ckpt / f"rng_rank_{d.rank}.pt"
    if rng.is_file():  # absent when resuming on more ranks than wrote the checkpoint
        _set_rng_state(torch.load(rng, weights_only=False))  # our own file: python/numpy states are not tensors
    return json.loads((ckpt / "trainer_state.json").read_text())
