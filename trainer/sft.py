"""Supervised warm start before GRPO: cross-entropy on the training split's reference solutions, written the way the
reward reads answers (calculator annotations removed, the final answer in `\\boxed{}`, then end of turn).

Why: RL alone could not move SmolLM2-135M on GSM8K (bench/RESULTS.md "Learning run": ~1.5% of samples correct, two
thirds cut at the token cap, so almost no groups carried a correctness signal). A short warm start teaches the model
to finish, box its answer and reason in GSM8K's style, and GRPO then sharpens a policy that is right often enough.

Examples use exactly the prompt ids the GRPO workflow sends to the engine (the items of the data cursor), so the
warm start trains the very prompt RL samples from. The loss is the token mean of the cross-entropy over the solution
tokens of the whole global batch (prompt tokens carry none). The warm start has its own AdamW, dropped afterwards:
GRPO starts with fresh moments, because cross-entropy gradients have another scale and direction than the policy
gradient, and their second-moment estimate would set the size of GRPO's first hundreds of steps.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer import dist
from trainer.config import ConfigError
from trainer.data import DataCursor
from trainer.dist import Dist
from trainer.policy import on_device, right_pad, token_logprobs
from trainer.precision import ComputeWeights


def make_examples(items: list[dict], texts: list[str], tokenizer, max_tokens: int) -> list[dict[str, Any]]:
    """Items with `prompt_ids` and their target `texts` (the task's demonstrations) → {"ids", "n_prompt"}; the
    target ends with the end-of-turn token (what the engine stops on). Examples over `max_tokens` are dropped rather
    than cut, so every target ends its answer."""
    targets = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    examples = [
        {"ids": list(item["prompt_ids"]) + list(target) + [eos], "n_prompt": len(item["prompt_ids"])}
        for item, target in zip(items, targets, strict=True)
    ]
    examples = [e for e in examples if len(e["ids"]) <= max_tokens]
    if not examples:
        raise ConfigError(f"sft.max_tokens={max_tokens} drops every example; raise it (99% of GSM8K train fits in 400)")
    return examples


def collate(examples: list[dict[str, Any]], pad_id: int, device) -> dict[str, Any]:
    """Right-padded ids, cut to the positions from the earliest solution token on (the only logits the loss needs).

    No attention mask: with right padding a causal mask alone is exact for every real token (pads only follow them).
    """
    ids = right_pad([e["ids"] for e in examples], pad_id, np.int64)
    is_target = right_pad(
        [[0.0] * e["n_prompt"] + [1.0] * (len(e["ids"]) - e["n_prompt"]) for e in examples], 0.0, np.float32
    )
    first = max(1, min(e["n_prompt"] for e in examples))
    return {
        "input_ids": on_device(ids, device),
        "keep": ids.shape[1] - first + 1,  # logits at positions first-1 .. length-1; the last one is dropped
        "targets": on_device(ids[:, first:], device),
        "mask": on_device(is_target[:, first:], device),
    }


def summed_loss(model: nn.Module, batch: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
    """Sum of the cross-entropy over the batch's solution tokens (float32), without materialising the logits."""
    logp, _ = token_logprobs(model, batch, dtype)
    return -(logp * batch["mask"]).sum()


def sft_step(
    weights: ComputeWeights, optimizer, examples: list[dict], mbs: int, d: Dist, dtype, grad_clip: float, pad_id
):
    """One optimizer step on this rank's slice of the global batch (forward on `weights.forward_model`, the step on
    its master); returns the global token-mean loss and more.

    Every rank runs the same number of micro-batches (FSDP collectives must match): a rank with fewer examples runs
    a no-token stand-in that adds zero loss.
    """
    examples = sorted(examples, key=lambda e: len(e["ids"]))  # similar lengths per micro-batch: less padding
    tokens = dist.all_reduce_sum(d, [sum(len(e["ids"]) - e["n_prompt"] for e in examples)])[0]
    per_rank = max(dist.all_gather_object(d, len(examples)))
    weights.forward_model.train()
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for i in range(max(1, -(-per_rank // mbs))):
        chunk = examples[i * mbs : (i + 1) * mbs] or [{"ids": [pad_id, pad_id], "n_prompt": 2}]
        loss = summed_loss(weights.forward_model, collate(chunk, pad_id, d.device), dtype) / max(tokens, 1.0)
        (loss * d.loss_scale).backward()
        weights.fold_grads()
        total += loss.item()
    grad_norm = float(dist.clip_grad_norm(weights.master, grad_clip))
    optimizer.step()
    weights.refresh()
    return {"loss": dist.all_reduce_sum(d, [total])[0], "grad_norm": grad_norm, "tokens": tokens}


def warmup_cosine(warmup: int, total: int):
    """LR factor per step: linear warm-up, then a cosine decay that reaches ~0 at the last step."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return factor


def make_optimizer(model: nn.Module, cfg):
    """The warm start's own AdamW (train.betas/weight_decay, sft.lr) and its schedule."""
    s, t = cfg.sft, cfg.train
    fused = next(model.parameters()).is_cuda or None  # one kernel for all parameters on GPU
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=t.betas, weight_decay=t.weight_decay, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(s.warmup_steps, s.steps))
    return optimizer, scheduler


def warm_start(run) -> dict[str, float]:
    """`sft.steps` supervised steps on the run's training items (a loop.Run); each is logged to metrics.jsonl at GRPO
    step 0 under `sft/*` keys. Returns the first and last loss and the stage's wall time."""
    from tqdm.auto import tqdm

    cfg, d = run.cfg, run.d
    t0 = time.perf_counter()
    items = run.cursor.items
    examples = make_examples(items, run.task.demonstrations(items), run.tokenizer, cfg.sft.max_tokens)
    cursor = DataCursor(examples, cfg.train.seed, True, d.rank, d.world_size)
    optimizer, scheduler = make_optimizer(run.model, cfg)
    pad_id = run.tokenizer.pad_token_id
    losses = []
    bar = tqdm(total=cfg.sft.steps, desc="sft", disable=not cfg.logging.progress or not d.is_main, dynamic_ncols=True)
    with bar:
        for step in range(cfg.sft.steps):
            lr = scheduler.get_last_lr()[0]
            batch = cursor.next_batch(cfg.sft.batch_size)
            stats = sft_step(
                run.learner.weights,
                optimizer,
                batch,
                cfg.sft.micro_batch_size,
                d,
                run.dtype,
                cfg.train.grad_clip,
                pad_id,
            )
            scheduler.step()
            losses.append(stats["loss"])
            run.logger.log(0, {f"sft/{k}": v for k, v in {"step": step + 1, **stats, "lr": lr}.items()})
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}")
    optimizer.zero_grad(set_to_none=True)
    out = {"sft/first_loss": losses[0], "sft/last_loss": losses[-1], "time/sft": time.perf_counter() - t0}
    out["sft/examples"] = len(examples)
    run.logger.log(0, out)
    return out
