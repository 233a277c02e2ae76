"""Checkpoints in the layout DOCS.md describes (saves/<exp>/global_step_N/...), with and without a process group.

Model and optimizer go through torch.distributed.checkpoint (DCP): every rank writes its own shard, HF parameter
names are the keys, and a checkpoint written by W ranks loads into any other number of ranks. A checkpoint is written
as `global_step_N.tmp/` and renamed only when every rank has finished, then `latest` is replaced atomically, so a
crash mid-write leaves the previous checkpoint in charge and the `.tmp` folder is cleaned at the next start.

Integrity (trainer/manifest.py): the last file written is `manifest.json`, every file's size and sha256. Resume checks
the newest checkpoint against it; a damaged one is renamed `global_step_N.damaged` (kept, never loaded or pruned) with
one warning naming the bad file, and the one before is tried. A write that fails (a full disk) removes its `.tmp`
folder and raises CheckpointError: one line naming the folder, the bytes free and the bytes needed.
"""

from __future__ import annotations

import contextlib
import errno
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

from trainer import manifest
from trainer.dist import Dist, all_gather_object, barrier

_STEP_DIR = re.compile(r"^global_step_(\d+)$")
LATEST = "latest"
DAMAGED = ".damaged"
# What a damaged checkpoint raises while loading, when its files passed (or predate) the manifest check.
LOAD_ERRORS = (OSError, EOFError, RuntimeError, ValueError, KeyError)  # json errors are ValueErrors


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or none could be resumed from; the message is one line for the user."""


def step_of(path: Path) -> int:
    match = _STEP_DIR.match(path.name)
    if not match:
        raise ValueError(f"{path} is not a global_step_N checkpoint folder")
    return int(match.group(1))


def is_complete(path: Path) -> bool:
    """Its manifest was written (checkpoints from before manifests: their state and DCP metadata exist)."""
    if (path / manifest.MANIFEST).is_file():
        return True
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


def candidates(exp_dir: Path) -> list[Path]:
    """Complete checkpoints to resume from, best first: the one `latest` names, then the others newest first."""
    done = complete_checkpoints(exp_dir)[::-1]
    first = find_latest(exp_dir)
    return ([first] if first else []) + [p for p in done if p != first]


def verify(ckpt: Path, d: Dist) -> str | None:
    """None when every file matches the manifest (checked by all ranks, a share each), else what is wrong."""
    problem = None
    if (ckpt / manifest.MANIFEST).is_file():
        try:
            manifest.check(ckpt, d.rank, d.world_size)
        except manifest.DamagedCheckpoint as err:
            problem = str(err)
    return _first(all_gather_object(d, problem))


def quarantine(ckpt: Path) -> Path:
    """Rename a damaged checkpoint out of the way (kept for inspection, never resumed from or pruned)."""
    target = ckpt.with_name(ckpt.name + DAMAGED)
    n = 1
    while target.exists():
        target, n = ckpt.with_name(f"{ckpt.name}{DAMAGED}{n}"), n + 1
    os.replace(ckpt, target)
    return target


def load_newest_intact(exp_dir: Path, *, model, optimizer, scheduler, d: Dist, warn) -> dict | None:
    """Restore from the newest checkpoint that verifies and loads; `warn(line)` for each one skipped. None when the
    experiment has no checkpoint; CheckpointError when it has some and none is intact."""
    skipped = 0
    for ckpt in candidates(exp_dir):
        problem = verify(ckpt, d)
        if problem is None:
            try:
                return load(ckpt, model=model, optimizer=optimizer, scheduler=scheduler, d=d)
            except LOAD_ERRORS as err:
                problem = f"{ckpt} could not be loaded: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
        problem = _first(all_gather_object(d, problem))
        barrier(d)
        if d.is_main:
            moved = quarantine(ckpt)
            warn(f"checkpoint {ckpt.name} is damaged ({problem}); moved to {moved.name}, trying the one before")
        barrier(d)
        skipped += 1
    if skipped:
        raise CheckpointError(
            f"no intact checkpoint in {exp_dir} ({skipped} damaged, renamed *{DAMAGED}): restore one, or start "
            "over with checkpoint.resume=false"
        )
    return None


def _first(problems: list) -> str | None:
    return next((p for p in problems if p), None)


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
    """Write global_step_<trainer_state['step']>/ from every rank; rank 0 writes metadata and moves `latest`.

    Ranks agree after each phase (a gathered error instead of a bare barrier), so a rank that fails to write makes
    every rank raise the same CheckpointError instead of leaving the others waiting."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    exp_dir = Path(exp_dir)
    final = exp_dir / f"global_step_{trainer_state['step']}"
    tmp = final.with_name(final.name + ".tmp")
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "actor").mkdir(parents=True)
    barrier(d)

    def shards():
        with _single_process_ok():
            dcp.save(get_model_state_dict(model), checkpoint_id=tmp / "actor" / "model")
            dcp.save(get_optimizer_state_dict(model, optimizer), checkpoint_id=tmp / "actor" / "optim")
        torch.save(_rng_state(), tmp / f"rng_rank_{d.rank}.pt")

    def metadata():
        if d.is_main:
            _save_metadata(tmp, model, scheduler, tokenizer, trainer_state, d.world_size)

    try:
        _all_ranks(d, shards)
        _all_ranks(d, metadata)
        names = manifest.listed_files(tmp)
        parts = _all_ranks(d, lambda: manifest.hash_files(tmp, names, d.rank, d.world_size))
        _all_ranks(d, lambda: d.is_main and manifest.write(tmp, {k: v for p in parts for k, v in p.items()}))
    except CheckpointError as err:
        if d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_write_failure(exp_dir, final, str(err), model, optimizer, d)) from None
    if d.is_main:
        _publish(exp_dir, tmp, final)
        prune(exp_dir, keep_last)
    barrier(d)
    return final


def _all_ranks(d: Dist, fn):
    """fn() on every rank; its results gathered, or CheckpointError(the first rank's error) on every rank."""
    result, error = None, None
    try:
        result = fn()
    except Exception as err:  # any failed write (the tokenizer's Rust writer raises a bare Exception when full)
        error = _reason(err)
    errors = all_gather_object(d, error)
    if _first(errors):
        raise CheckpointError(_first(errors))
    return all_gather_object(d, result)


def _reason(err: BaseException) -> str:
    """Disk full, however it surfaced (OSError ENOSPC from DCP; torch.save's 'file write failed'), or the error."""
    text = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    full = getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err) or "write failed" in str(err)
    return "disk full" if full else text[:300]


def _write_failure(exp_dir: Path, final: Path, reason: str, model, optimizer, d: Dist) -> str:
    free = shutil.disk_usage(exp_dir).free
    last = find_latest(exp_dir)
    kept = f"; {last.name} is intact and is where a restart resumes" if last else ""
    return (
        f"could not write checkpoint {final} ({reason}): {free:,} bytes free there, about "
        f"{_checkpoint_bytes(exp_dir, model, optimizer, d):,} needed{kept}"
    )


def _checkpoint_bytes(exp_dir: Path, model, optimizer, d: Dist) -> int:
    """The size of the last checkpoint, else of what this rank holds (model + optimizer state) times the ranks."""
    last = find_latest(exp_dir)
    if last is not None and (last / manifest.MANIFEST).is_file():
        return sum(f["size"] for f in manifest.read(last).values())
    from torch.distributed.tensor import DTensor

    tensors = list(model.state_dict().values())
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    tensors = [t.to_local() if isinstance(t, DTensor) else t for t in tensors if torch.is_tensor(t)]
    local = sum(t.numel() * t.element_size() for t in tensors)
    return local * d.world_size


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
