"""The GRPO learner: one policy update from a batch of trajectories. Group advantages → micro-batched PPO-clip loss
with gradient accumulation → clip → AdamW step, on this rank's model (plain or FSDP2-sharded).

It holds explicit parts (model, optimizer, scheduler, the GRPO and train settings), not the whole run. Metrics stay on
the device until the update is done: one host sync per update instead of one per micro-batch. Several ranks: every
rank runs the same number of micro-batches (FSDP collectives must match) and losses are normalised by the global
token/sequence count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer import dist
from trainer.api import Trajectory
from trainer.config import Config, GRPOConfig
from trainer.dist import Dist
from trainer.grpo import group_advantages, groups_with_spread, loss_norms, masked_mean, policy_loss
from trainer.policy import on_device, right_pad, token_logprobs
from trainer.precision import ComputeWeights


@dataclass
class Learner:
    weights: ComputeWeights
    """The fp32 master model and the module its forward runs (trainer/precision.py)."""
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a torch LR scheduler
    d: Dist
    dtype: torch.dtype
    """The forward pass's compute dtype (the compute copy's, autocast's, or FSDP2's param dtype)."""
    grpo: GRPOConfig
    micro_batch_size: int
    grad_clip: float
    max_new_tokens: int
    """The longest completion (the "seq-mean-token-sum-norm" loss normaliser)."""
    pad_id: int
    ref_model: nn.Module | None = None

    @classmethod
    def for_config(cls, cfg: Config, weights: ComputeWeights, optimizer, scheduler, d: Dist, dtype: torch.dtype,
                   pad_id: int, ref_model: nn.Module | None = None) -> Learner:  # fmt: skip
        """The learner a run's config describes, over its weights and optimizer."""
        t = cfg.train
        return cls(weights, optimizer, scheduler, d, dtype, cfg.grpo, t.micro_batch_size, t.grad_clip,
                   cfg.rollout.max_new_tokens, pad_id, ref_model)  # fmt: skip

    def update(self, trajectories: list[Trajectory]) -> dict[str, float]:
        """One optimizer step on `trajectories` (this rank's share); the metrics are reduced over ranks."""
        trajectories, adv = self.advantages(trajectories)
        lengths = [
            n for part in dist.all_gather_object(self.d, [t.num_model_tokens for t in trajectories]) for n in part
        ]
        if not lengths:  # nothing left on any rank (every group dropped): no step, same on all ranks
            return {"skipped_update": 1.0}
        norms = loss_norms(lengths, self.grpo.loss_agg, self.max_new_tokens)
        order = sorted(range(len(trajectories)), key=lambda i: len(trajectories[i].token_ids))  # less padding
        trajectories, adv = [trajectories[i] for i in order], adv[order]
        mbs = self.micro_batch_size
        self.weights.forward_model.train()
        self.optimizer.zero_grad(set_to_none=True)
        parts = []
        for i in range(self._chunks(len(trajectories))):
            chunk = trajectories[i * mbs : (i + 1) * mbs] or [self._padding()]
            parts.append(self.micro_step(chunk, adv[i * mbs : (i + 1) * mbs], norms))
        grad_norm = dist.clip_grad_norm(self.weights.master, self.grad_clip)
        self.optimizer.step()
        self.weights.refresh()
        self.scheduler.step()
        parts, grad_norm = to_host(parts, grad_norm)
        return {**self.combine(parts), "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0]}

    def advantages(self, trajectories: list[Trajectory]) -> tuple[list[Trajectory], torch.Tensor]:
        """Group-normalised advantages; groups with no reward spread are dropped when grpo.drop_zero_adv_groups."""
        if self.grpo.drop_zero_adv_groups:
            keep = groups_with_spread([t.group_id for t in trajectories], [t.reward for t in trajectories])
            trajectories = [t for t, k in zip(trajectories, keep, strict=True) if k]
        if not trajectories:
            return [], torch.zeros(0)
        rewards = torch.tensor([t.reward for t in trajectories], dtype=torch.float32)
        gids = torch.tensor([t.group_id for t in trajectories])
        return trajectories, group_advantages(rewards, gids, scale=self.grpo.scale_rewards)

    def micro_step(
        self, chunk: list[Trajectory], adv: torch.Tensor, norms: dict[str, float]
    ) -> dict[str, torch.Tensor]:
        """Forward + loss + backward on one micro-batch; gradients accumulate (the normaliser is the whole batch's)."""
        g = self.grpo
        batch = collate(chunk, adv, self.pad_id, self.d.device)
        logp, entropy = token_logprobs(self.weights.forward_model, batch, self.dtype)
        ref_logp = None
        if self.ref_model is not None:
            with torch.no_grad():
                ref_logp = token_logprobs(self.ref_model, batch, self.dtype)[0]
        loss, metrics = policy_loss(
            logp, batch["old_logp"], batch["adv"], batch["mask"], g.clip_eps, g.clip_eps_high, g.loss_agg,
            ref_logp, g.beta, **norms, sync=False,
        )  # fmt: skip
        (loss * self.d.loss_scale).backward()
        self.weights.fold_grads()
        metrics["entropy"] = masked_mean(entropy, batch["mask"].bool())
        metrics["loss"] = loss.detach()
        return metrics

    def _chunks(self, n: int) -> int:
        """Micro-batches every rank runs: the most any rank needs (FSDP collectives must match across ranks)."""
        return int(max(dist.all_gather_object(self.d, -(-n // self.micro_batch_size))))

    def _padding(self) -> Trajectory:
        """A no-token stand-in for a rank with fewer micro-batches: zero loss, but it joins the collectives."""
        return Trajectory([self.pad_id, self.pad_id], [0, 0], [0.0, 0.0], 0.0, 0)

    def combine(self, parts: list[dict[str, float]]) -> dict[str, float]:
        """Micro-batch metrics → step metrics over all ranks: token-weighted means, max of maxima, sum of losses."""
        everything = [m for rank_parts in dist.all_gather_object(self.d, parts) for m in rank_parts]
        tokens = sum(m["num_tokens"] for m in everything) or 1.0
        out = {"loss": sum(m["loss"] for m in everything)}  # each part is normalised by the global batch already
        out["ratio_max"] = max(m["ratio_max"] for m in everything)
        for key in ("clip_frac", "approx_kl", "ratio_mean", "entropy", "kl_ref"):
            if key in everything[0]:
                out[key] = sum(m[key] * m["num_tokens"] for m in everything) / tokens
        return out


def to_host(parts: list[dict[str, torch.Tensor]], grad_norm: torch.Tensor) -> tuple[list[dict[str, float]], float]:
    """Every micro-batch metric and the grad norm as Python floats, in one device-to-host copy."""
    keys = list(parts[0])
    device = parts[0][keys[0]].device  # the grad norm is on the host when train.cpu_offload keeps the gradients there
    flat = torch.stack(
        [p[k].float().reshape(()) for p in parts for k in keys] + [grad_norm.float().reshape(()).to(device)]
    )
    values = flat.tolist()
    rows = [values[i * len(keys) : (i + 1) * len(keys)] for i in range(len(parts))]
    return [dict(zip(keys, row, strict=True)) for row in rows], values[-1]


def collate(trajectories: list[Trajectory], adv: torch.Tensor, pad_id: int, device) -> dict[str, Any]:
    """Right-padded tensors, cut to the positions from the earliest model token on (the only logits we need)."""
    ids = right_pad([t.token_ids for t in trajectories], pad_id, np.int64)
    mask = right_pad([t.loss_mask for t in trajectories], 0, np.int64)
    old = right_pad([t.logprobs for t in trajectories], 0.0, np.float32)
    n, length = ids.shape
    starts = mask.argmax(axis=1)  # first model token of each row (0 when a row has none)
    first = max(int(min(s if mask[i, s] else length - 1 for i, s in enumerate(starts))), 1)
    adv = adv if len(adv) == n else torch.zeros(n)
    return {
        "input_ids": on_device(ids, device),
        "keep": length - first + 1,  # logits at positions first-1 .. length-1; the last one is dropped
        "targets": on_device(ids[:, first:], device),
        "mask": on_device(mask[:, first:], device),
        "old_logp": on_device(old[:, first:], device),
        "adv": adv.to(device, torch.float32),
    }
