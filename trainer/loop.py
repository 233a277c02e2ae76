"""The GRPO loop: data cursor → workflow rollout → reward → group advantages → micro-batched update → weight sync →
log → periodic eval → periodic checkpoint. `train(cfg)` is the whole run; each stage is one function below.

Precision: master weights and optimizer state are float32; `model.dtype` (auto: bfloat16 on GPU, float32 on CPU) is
the compute dtype of the rollout engine and of the forward pass (a compute copy, trainer/precision.py, or FSDP2's
param dtype).
Several ranks (torchrun): every rank walks the same data cursor and rolls out its own slice of each batch (whole
groups, so advantages need no communication); losses are normalised by the global token/sequence count.
"""

from __future__ import annotations

import gc
import itertools
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rollout.api import RolloutEngine
from trainer import checkpoint, dist, sft
from trainer.api import BatchSource, Trajectory
from trainer.config import Config, ConfigError, save_config
from trainer.data import DataCursor, num_steps
from trainer.dist import Dist
from trainer.learner import Learner
from trainer.metrics import MetricsLogger, bar_postfix, progress_bar, read_metrics, summary_table
from trainer.precision import ComputeWeights
from trainer.rollout_factory import compute_dtype, make_engine
from trainer.tasks import Task, make_task
from trainer.weight_sync import WeightSync, make_weight_sync


@dataclass
class Run:
    """Everything one training run holds; `step` is the number of optimizer steps taken."""

    cfg: Config
    d: Dist
    model: nn.Module
    tokenizer: Any  # a Hugging Face tokenizer
    engine: RolloutEngine
    learner: Learner
    cursor: DataCursor
    eval_items: list[dict]
    total_steps: int
    dtype: torch.dtype
    task: Task | None = None
    logger: MetricsLogger | None = None
    source: BatchSource | None = None
    sync: WeightSync | None = None
    step: int = 0
    version: int = 0  # weight version the engine serves (the trainer's count: a remote engine may not report it)
    group_items: dict[int, int] = field(default_factory=dict)  # group id → data item index, until trained
    last_eval: int = -1
    last_save: int = -1
    start_step: int = 0
    sft_done: bool = False  # the supervised warm start has run (checkpointed: a resumed run never repeats it)
    clock_start: float = field(default_factory=time.perf_counter)  # this process's start, for train.time_limit_s
    elapsed_before: float = 0.0  # training seconds spent by the processes this run resumed from

    @property
    def exp_dir(self) -> Path:
        return self.cfg.exp_dir


def train(cfg: Config) -> dict:
    """Run (or resume) the experiment `cfg.experiment_name`; returns a summary of the final state."""
    t0 = time.perf_counter()
    d = dist.init(cfg.train.device)
    run = None
    try:
        run = build(cfg, d)
        run.clock_start = t0  # the time limit counts model loading too
        resumed = restore(run)
        start_logging(run, resumed)
        if cfg.sft.steps and not run.sft_done and run.step == 0:
            warm_start(run)
        run.source = make_rollout_source(run)
        if run.step == 0 and cfg.eval.every and cfg.eval.at_start:
            say(
                run,
                f"eval before training: {len(run.eval_items)} items, greedy, up to {cfg.eval.max_new_tokens} tokens",
            )
            record_eval(run)
            say(run, "eval: " + " ".join(f"{k}={v:.3f}" for k, v in run.logger.latest.items() if k.startswith("eval/")))
        bar = progress_bar(run.total_steps, run.step, cfg.logging.progress, d.rank)

        def on_phase(phase: str) -> None:  # the bar says which phase a step is in: on a CPU a step can take minutes
            bar.set_postfix({**bar_postfix(run.logger.latest), "now": phase})

        with bar:
            first = True
            while run.step < run.total_steps and not out_of_time(run):
                try:
                    stats = train_step(run, on_phase)
                except SERVICE_DOWN as err:
                    raise ServiceDown(stop_with_checkpoint(run, err)) from None
                after_step(run, stats, bar)
                if first:
                    settle_gc()
                    first = False
        finish(run)
        return summary(run)
    finally:
        gc.unfreeze()  # what settle_gc froze is collectable again once this run's objects go
        shutdown(run)
        dist.close(d)


class ServiceDown(RuntimeError):
    """A rollout service or env server stayed down past train.recovery_s; the message is one line, written after a
    checkpoint."""


def _service_errors() -> tuple[type[Exception], ...]:
    from env_servers.client import EnvServerError
    from rollout.client import ServiceUnavailable

    return ServiceUnavailable, EnvServerError


SERVICE_DOWN = _service_errors()


def stop_with_checkpoint(run: Run, err: Exception) -> str:
    """Save what the run has (unless this step is saved already) and say which service stopped it."""
    path = save(run) if run.last_save != run.step else checkpoint.find_latest(run.exp_dir)
    where = f"checkpoint {path.name} is saved: the same command resumes" if path else "no checkpoint yet"
    return f"{str(err).splitlines()[0]}; {where} once the service is back"


# ---------------------------------------------------------------------------------------------------------- setup


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build(cfg: Config, d: Dist) -> Run:
    """Model, engine, optimizer, data and workflows for this rank; the resolved config is saved first."""
    if cfg.train.cpu_offload and not (d.distributed and d.device.type == "cuda"):
        raise ConfigError(
            "train.cpu_offload needs CUDA and torchrun (FSDP2 offloads the shards): on one GPU run "
            "`torchrun --nproc_per_node 1 -m trainer ...`"
        )
    if d.is_main:
        cfg.exp_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, cfg.exp_dir / "config.yaml")
    torch.set_num_threads(cpu_threads(cfg))
    seed_everything(cfg.train.seed)
    dtype = compute_dtype(cfg, d.device)
    model, tokenizer, path = load_policy(cfg, d)
    engine = make_engine(cfg, model, tokenizer, d, path)  # before sharding: it may alias the full parameters
    if d.distributed:
        dist.shard(model, d, None if dtype == torch.float32 else dtype, cfg.train.cpu_offload)
    weights = compute_weights(cfg, model, d, dtype)
    optimizer, scheduler = make_optimizer(cfg, model)
    task = make_task(cfg, tokenizer)
    items, eval_items = task.items()
    cursor = DataCursor(items, cfg.train.seed, cfg.data.shuffle, d.rank, d.world_size)
    total = cfg.train.total_steps or num_steps(len(items), cfg.train.batch_size, cfg.data.epochs)
    ref_model = load_reference(cfg, path, d, dtype) if cfg.grpo.beta > 0 else None
    learner = Learner.for_config(cfg, weights, optimizer, scheduler, d, dtype, tokenizer.pad_token_id, ref_model)
    run = Run(cfg, d, model, tokenizer, engine, learner, cursor, eval_items, total, dtype)
    run.task = task
    run.sync = make_weight_sync(cfg, engine, d, weights)
    return run


def cpu_threads(cfg: Config) -> int:
    """train.threads, else torch's default; with train.cpu_offload the AdamW step runs on the host, so each rank takes
    its share of the cores (torchrun sets OMP_NUM_THREADS=1, which made a 7 B step take minutes)."""
    if cfg.train.threads:
        return cfg.train.threads
    if cfg.train.cpu_offload:
        return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return torch.get_num_threads()


def load_policy(cfg: Config, d: Dist):
    """The trainable HF model (float32 master weights on this rank's device) and its tokenizer."""
    from transformers.utils import logging as hf_logging

    from rollout.loading import ModelNotFoundError, load_model, load_tokenizer, resolve_model_path

    hf_logging.disable_progress_bar()  # the step bar is the one progress bar of a run

    try:
        path = resolve_model_path(cfg.model.path, cfg.model.models_dir)
    except ModelNotFoundError as err:
        raise ConfigError(f"model.path: {err}") from None
    tokenizer = load_tokenizer(path)
    model = load_model(path, dtype=torch.float32, device=str(d.device))
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model.train(), tokenizer, path


def compute_weights(cfg: Config, model: nn.Module, d: Dist, dtype: torch.dtype) -> ComputeWeights:
    """The module the training forward runs over `model` (a compute-dtype copy on one process, trainer/precision.py),
    its decoder layers compiled where `train.compile` applies."""
    copy_weights = cfg.train.compute_copy and not d.distributed and dtype != torch.float32
    weights = ComputeWeights(model, dtype, copy_weights)
    if cfg.train.compile and d.device.type == "cuda" and not cfg.model.gradient_checkpointing:
        compile_layers(weights.forward_model)
    return weights


def compile_layers(model: nn.Module) -> None:
    """torch.compile each decoder layer in place (parameter names unchanged, so checkpoints and weight sync are not
    affected). Dynamic shapes from the start: every step has new sequence lengths."""
    for layer in dist.decoder_layers(model):
        layer.compile(dynamic=True)


def load_reference(cfg: Config, path: str, d: Dist, dtype: torch.dtype) -> nn.Module:
    """The frozen reference policy for the KL term (a full copy per rank, compute dtype)."""
    from rollout.loading import load_model

    ref = load_model(path, dtype=dtype, device=str(d.device))
    ref.requires_grad_(False)
    return ref


def make_optimizer(cfg: Config, model: nn.Module):
    """AdamW + linear warm-up to `train.lr` over `train.warmup_steps`, constant afterwards."""
    t = cfg.train
    # One kernel for all parameters instead of a chain of foreach ops; on the host only for offloaded shards (CPU
    # runs keep the foreach path their tests were written against).
    fused = next(model.parameters()).is_cuda or t.cpu_offload
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay, fused=fused or None
    )
    warmup = max(t.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    return optimizer, scheduler


def restore(run: Run) -> bool:
    """Resume from the experiment's newest intact checkpoint (unless checkpoint.resume=false); damaged ones are
    skipped with a warning (trainer/checkpoint.py)."""
    if run.d.is_main:
        checkpoint.clean_partial(run.exp_dir)
    dist.barrier(run.d)
    if not run.cfg.checkpoint.resume:
        return False
    state = checkpoint.load_newest_intact(
        run.exp_dir,
        model=run.model,
        optimizer=run.learner.optimizer,
        scheduler=run.learner.scheduler,
        d=run.d,
        warn=lambda line: say(run, f"warning: {line}"),
    )
    if state is None:
        return False
    run.learner.weights.refresh()
    try:
        run.cursor.load_state_dict(state["data"])
    except ValueError as err:
        raise ConfigError(str(err)) from None
    run.step = run.last_save = run.start_step = state["step"]
    run.sft_done, run.elapsed_before = state.get("sft_done", False), state.get("elapsed_s", 0.0)
    run.version = run.sync.push(run.model, state["weight_version"])  # the engine samples the restored policy
    return True


def warm_start(run: Run) -> None:
    """The supervised warm start (trainer/sft.py) before GRPO step 0; then the engine serves the new weights and a
    checkpoint records that it ran, so a resumed run starts at GRPO instead of repeating it."""
    result = sft.warm_start(run)
    run.sft_done = True
    run.version = run.sync.push(run.model, run.version + 1)
    save(run)
    if run.d.is_main:
        print(
            f"[rldock] SFT warm start: {run.cfg.sft.steps} steps on {result['sft/examples']} examples, loss "
            f"{result['sft/first_loss']:.3f} -> {result['sft/last_loss']:.3f}, {result['time/sft']:.0f} s",
            flush=True,
        )


def train_seconds(run: Run) -> float:
    """Training wall time of the experiment so far: earlier processes (from the checkpoint) plus this one."""
    return run.elapsed_before + time.perf_counter() - run.clock_start


def out_of_time(run: Run) -> bool:
    """train.time_limit_s is used up (on any rank: every rank must stop at the same step)."""
    limit = run.cfg.train.time_limit_s
    if not limit:
        return False
    return dist.all_reduce_sum(run.d, [float(train_seconds(run) >= limit)])[0] > 0


def start_logging(run: Run, resumed: bool) -> None:
    cfg = run.cfg
    resume_step = run.step if resumed else None
    run.logger = MetricsLogger(
        run.exp_dir, cfg.model_dump(mode="json"), cfg.logging.wandb, run.d.rank, resume_step, cfg.logging.wandb_project
    )
    how = f"resumed at step {run.step}" if resumed else "fresh start"
    say(
        run,
        f"{cfg.experiment_name}: {how}, {run.total_steps} steps, {run.d.world_size} rank(s), "
        f"device {run.d.device}, outputs in {run.exp_dir}",
    )
    if resumed and run.step >= run.total_steps:
        say(
            run,
            f"{cfg.experiment_name} already finished its {run.total_steps} steps: to go on, raise the total "
            f"(train.total_steps={2 * run.total_steps} resumes from step {run.step}); to start over, "
            "checkpoint.resume=false or another experiment_name",
        )


def make_rollout_source(run: Run):
    """The per-step batch source; sampling seeds follow the step so a resumed run samples as an unbroken one."""
    from trainer.async_rollout import make_source

    calls = itertools.count(run.step)

    def sample() -> tuple[list[dict], list[int]]:
        call = next(calls)
        items = run.cursor.next_batch(run.cfg.train.batch_size)
        run.task.workflow.reseed(
            int(np.random.SeedSequence([run.cfg.train.seed, call, run.d.rank]).generate_state(1)[0])
        )
        group_ids = [call * run.cfg.train.batch_size + i for i in range(len(items))]
        run.group_items.update(zip(group_ids, (item["index"] for item in items), strict=True))
        return items, group_ids

    r = run.cfg.rollout
    return make_source(run.engine, run.task.workflow, sample, r.max_staleness, r.async_workers)  # B: this rank's slice


# ---------------------------------------------------------------------------------------------------------- a step


def settle_gc() -> None:
    """Once the first step has built everything long-lived (model, optimizer state, compiled code, captured CUDA
    graphs): collect, then move every object alive into the collector's permanent generation, so the full
    collections that a rollout's many small objects trigger scan only what later steps create."""
    gc.collect()
    gc.freeze()


def train_step(run: Run, on_phase: Callable[[str], None] = lambda phase: None) -> dict[str, Any]:
    """One GRPO step: rollout, update, weight sync. Returns the step's metrics (already reduced over ranks)."""
    t0 = time.perf_counter()
    on_phase("rollout")
    trajectories = [t for t in run.source.next_batch(run.version) if t is not None]
    t1 = time.perf_counter()
    on_phase("update")
    stats = rollout_stats(run, trajectories)
    stats.update(run.learner.update(trajectories))
    run.step += 1
    t2 = time.perf_counter()
    on_phase("weight sync")
    run.version = stats["weight_version"] = run.sync.push(run.model, run.version + 1)
    t3 = time.perf_counter()
    stats.update({"time/rollout": t1 - t0, "time/update": t2 - t1, "time/sync": t3 - t2, "time/step": t3 - t0})
    stats.update(rank_profile(run, t1 - t0))
    stats["item_ids"] = trained_items(run, trajectories)
    return stats


def rank_profile(run: Run, rollout_s: float) -> dict[str, float]:
    """What the slowest rank did: its rollout time (the others wait for it in the update's collectives) and the
    highest per-GPU peak memory. On one rank these are rank 0's own."""
    per_rank = dist.all_gather_object(run.d, (rollout_s, dist.peak_memory_gib(run.d)))
    out = {"time/rollout_slowest": max(r for r, _ in per_rank)}
    if run.d.device.type == "cuda":
        out["memory/peak_gib"] = max(m for _, m in per_rank)
    return out


def trained_items(run: Run, trajectories: list[Trajectory]) -> list[int]:
    """Data item indices this step trained on, over all ranks, in batch order (the data-order record of a run)."""
    groups = dict.fromkeys(t.group_id for t in trajectories)
    mine = [run.group_items.pop(g) for g in groups if g in run.group_items]
    return [i for part in dist.all_gather_object(run.d, mine) for i in part]


def rollout_stats(run: Run, trajectories: list[Trajectory]) -> dict[str, float]:
    """Reward, correctness, format, length and learning-signal fractions over every rank's trajectories."""
    groups: dict[int, list[float]] = {}
    for t in trajectories:
        groups.setdefault(t.group_id, []).append(t.reward)
    sums = [
        len(trajectories),
        sum(t.reward for t in trajectories),
        sum(bool(t.info.get("correct")) for t in trajectories),
        sum(bool(t.info.get("format_ok")) for t in trajectories),
        sum(t.num_model_tokens for t in trajectories),
        sum(t.info.get("finish_reason") == "length" for t in trajectories),
        len(groups),
        sum(max(r) > min(r) for r in groups.values()),
    ]
    n, reward, correct, fmt, tokens, cut, num_groups, signal = dist.all_reduce_sum(run.d, sums)
    n, num_groups = max(n, 1), max(num_groups, 1)
    stats = {"reward": reward / n, "accuracy": correct / n, "response_length": tokens / n}
    stats.update({"truncated": cut / n, "groups_with_signal": signal / num_groups, "trajectories": n})
    if run.cfg.env.format_reward > 0:
        stats["format"] = fmt / n
    stats.update(sample_stats(run, trajectories))
    return stats


def sample_stats(run: Run, trajectories: list[Trajectory]) -> dict[str, float]:
    """Which weights produced the step's samples (async rollout trains on older ones, at most rollout.max_staleness
    versions back) and how many agent turns the episodes took."""
    mine = [(t.weight_version, t.info.get("num_rounds", 1)) for t in trajectories]
    both = [pair for part in dist.all_gather_object(run.d, mine) for pair in part]
    if not both:
        return {}
    oldest = min(v for v, _ in both)
    rounds = sum(r for _, r in both) / len(both)
    return {"sample_version": oldest, "staleness": run.version - oldest, "num_rounds": rounds}


# ---------------------------------------------------------------------------------------------- logs, eval, saves


def after_step(run: Run, stats: dict[str, Any], bar) -> None:
    cfg = run.cfg
    run.logger.log(run.step, {**stats, "time/train_s": train_seconds(run)})
    if cfg.eval.every and run.step % cfg.eval.every == 0:
        record_eval(run)
    if cfg.checkpoint.every and run.step % cfg.checkpoint.every == 0:
        save(run)
    bar.update(1)
    bar.set_postfix(bar_postfix(run.logger.latest))


def evaluate(run: Run) -> dict[str, float]:
    """Greedy accuracy on the eval subset, every rank answering its share."""
    items = run.eval_items[run.d.rank :: run.d.world_size]
    trajectories = [t for t in run.task.eval_workflow.run(run.engine, items, list(range(len(items)))) if t is not None]
    sums = [
        len(items),
        sum(bool(t.info.get("correct")) for t in trajectories),
        sum(bool(t.info.get("strict")) for t in trajectories),
        sum(bool(t.info.get("format_ok")) for t in trajectories),
        sum(t.num_model_tokens for t in trajectories),
    ]
    n, correct, strict, fmt, tokens, reward = dist.all_reduce_sum(run.d, [*sums, sum(t.reward for t in trajectories)])
    n = max(n, 1)
    out = {
        "eval/accuracy": correct / n,
        "eval/strict_accuracy": strict / n,
        "eval/format": fmt / n,
        "eval/response_length": tokens / n,
    }
    if run.task.reports_reward:  # agent envs: accuracy = episodes solved, plus the mean episode reward
        out["eval/reward"] = reward / n
    return out


def record_eval(run: Run) -> None:
    t0 = time.perf_counter()
    result = evaluate(run)
    result["time/eval"] = time.perf_counter() - t0
    run.logger.log(run.step, result)
    run.logger.plot()
    run.last_eval = run.step


def save(run: Run) -> Path:
    state = {
        "step": run.step,
        "weight_version": run.version,
        "data": run.cursor.state_dict(),
        "world_size": run.d.world_size,
        "total_steps": run.total_steps,
        "experiment_name": run.cfg.experiment_name,
        "sft_done": run.sft_done,
        "elapsed_s": round(train_seconds(run), 3),
    }
    path = checkpoint.save(
        run.exp_dir,
        model=run.model,
        optimizer=run.learner.optimizer,
        scheduler=run.learner.scheduler,
        tokenizer=run.tokenizer,
        trainer_state=state,
        d=run.d,
        keep_last=run.cfg.checkpoint.keep_last,
    )
    run.last_save = run.step
    return path


def finish(run: Run) -> None:
    """Final eval and checkpoint (unless this very step already had them, or checkpoint.at_end=false), then the
    final plot."""
    if run.step < run.total_steps and run.d.is_main:
        print(
            f"[rldock] train.time_limit_s={run.cfg.train.time_limit_s:g} reached at step {run.step} "
            f"({train_seconds(run):.0f} s); a larger limit resumes from here",
            flush=True,
        )
    if run.cfg.eval.every and run.last_eval != run.step and run.step > run.start_step:
        record_eval(run)
    if run.last_save != run.step and run.cfg.checkpoint.at_end:
        save(run)
    run.logger.plot()
    table = summary_table(read_metrics(run.logger.path)) if run.d.is_main else ""
    if table:
        say(run, f"{run.cfg.experiment_name}: step {run.step}/{run.total_steps}, first -> last:\n{table}")


def say(run: Run, text: str) -> None:
    """One status line from rank 0 (the bar is rank 0's too)."""
    if run.d.is_main:
        print(f"[rldock] {text}", flush=True)


def summary(run: Run) -> dict[str, Any]:
    latest = dict(run.logger.latest) if run.logger else {}
    return {
        "step": run.step,
        "weight_version": run.version,
        "exp_dir": str(run.exp_dir),
        "checkpoint": str(checkpoint.find_latest(run.exp_dir)),
        "train_s": round(train_seconds(run), 1),
        **{k: latest[k] for k in ("reward", "accuracy", "eval/accuracy") if k in latest},
    }


def shutdown(run: Run | None) -> None:
    if run is None:
        return
    if run.source is not None:
        run.source.close()
    if run.logger is not None:
        run.logger.close()
    if run.sync is not None:
        run.sync.close()
    run.engine.close()
