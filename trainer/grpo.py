"""GRPO math as pure functions over tensors: group advantages, the PPO-clip token loss, k3 KL.

No model, no I/O. Shapes: N sequences (trajectories), T token positions (right-padded), V vocabulary.

Micro-batching: `policy_loss` divides the summed token losses by a normaliser that describes the WHOLE batch
(`norm_tokens` / `norm_seqs`, see `loss_norms`). Passing the same normaliser to every micro-batch makes the sum of
the micro-batch losses (and hence the accumulated gradient) equal to the loss of the full batch computed at once.
Without a normaliser the call's own micro-batch is taken as the whole batch.
Under data parallelism where gradients are AVERAGED over W ranks, either pass rank-local normalisers (each rank's
mean; exact when ranks hold equal token counts) or global ones and multiply the loss by W.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "token_sum_norm")

# exp() of a log-ratio beyond this overflows float32 in k3; the clamp only touches absurd (diverged) tokens.
_MAX_LOG_RATIO = 20.0


def groups_with_spread(group_ids: Sequence[int], rewards: Sequence[float]) -> list[bool]:
    """Per sample: whether its group's rewards differ. A group with one reward has advantage 0 for every sample,
    so it carries no learning signal (DAPO's dynamic sampling drops such groups)."""
    spread: dict[int, set[float]] = {}
    for g, r in zip(group_ids, rewards, strict=True):
        spread.setdefault(g, set()).add(r)
    return [len(spread[g]) > 1 for g in group_ids]


def group_advantages(rewards: Tensor, group_ids: Tensor, scale: bool = True, eps: float = 1e-6) -> Tensor:
    """A_i = r_i - mean(r over i's group), divided by (std + eps) of the group when `scale` (False = Dr.GRPO).

    The std is the population std (unbiased=False): a group is all the samples drawn for a prompt, so a group of
    rewards {1, 0} gets advantages {+1, -1} (up to eps), and a group of one has std 0 instead of NaN.
    Groups whose rewards are all equal get exactly 0 (not a rounding residue), so they carry no gradient.
    Group ids may be any integers, in any order.
    """
    r = rewards.to(torch.float64)
    _, inv = torch.unique(group_ids, return_inverse=True)
    g = int(inv.max()) + 1 if inv.numel() else 0
    count = torch.zeros(g, dtype=r.dtype, device=r.device).index_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros_like(count).index_add_(0, inv, r) / count
    centred = r - mean[inv]
    if scale:
        var = torch.zeros_like(count).index_add_(0, inv, centred**2) / count
        centred = centred / (var.sqrt()[inv] + eps)
    hi = torch.full_like(count, -torch.inf).scatter_reduce(0, inv, r, "amax")
    lo = torch.full_like(count, torch.inf).scatter_reduce(0, inv, r, "amin")
    flat = (hi == lo)[inv]
    return torch.where(flat, torch.zeros_like(centred), centred).to(rewards.dtype)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x where mask is true (over `dim`, or everything). An empty mask gives 0, not NaN."""
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp_min(1)
    return (x * m).sum(dim) / m.sum(dim).clamp_min(1)


def kl_k3(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi || ref) from samples of pi: exp(d) - d - 1 with d = logp_ref - logp.

    Always >= 0, unbiased, low variance (Schulman's "k3"). d is clamped to +-20 so a diverged token cannot overflow.
    """
    d = (logp_ref - logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return torch.exp(d) - d - 1


def loss_norms(tokens_per_seq: Sequence[int], agg: str, max_new_tokens: int | None = None) -> dict[str, float]:
    """The full-batch normaliser(s) for `policy_loss`, from the model-token count of every sequence in the batch.

    Pass the result as `**kwargs` to `policy_loss` for each micro-batch of that batch.
    token_mean: total model tokens; seq_mean_token_mean: number of sequences; token_sum_norm: N x max_new_tokens.
    """
    if agg == "token_mean":
        return {"norm_tokens": float(max(sum(tokens_per_seq), 1))}
    if agg == "seq_mean_token_mean":
        return {"norm_seqs": float(max(len(tokens_per_seq), 1))}
    if agg == "token_sum_norm":
        if max_new_tokens is None:
            raise ValueError("token_sum_norm needs max_new_tokens")
        return {"norm_tokens": float(max(len(tokens_per_seq), 1) * max_new_tokens)}
    raise ValueError(f"unknown loss aggregation {agg!r}; one of {AGGREGATIONS}")


def aggregate(token_loss: Tensor, mask: Tensor, agg: str, norm_tokens=None, norm_seqs=None) -> Tensor:
    """Token losses [N, T] -> scalar, per `agg` (see `policy_loss`). Masked positions never contribute."""
    m = mask.to(token_loss.dtype)
    total = (token_loss * m).sum()
    if agg == "token_mean":
        return total / (norm_tokens if norm_tokens is not None else m.sum().clamp_min(1))
    if agg == "seq_mean_token_mean":
        per_seq = (token_loss * m).sum(-1) / m.sum(-1).clamp_min(1)
        return per_seq.sum() / (norm_seqs if norm_seqs is not None else max(token_loss.shape[0], 1))
    if agg == "token_sum_norm":
        if norm_tokens is None:
            raise ValueError("token_sum_norm needs norm_tokens (batch size x max_new_tokens, see loss_norms)")
        return total / norm_tokens
    raise ValueError(f"unknown loss aggregation {agg!r}; one of {AGGREGATIONS}")


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    clip_eps_high: float | None = None,
    agg: str = "token_mean",
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
    norm_tokens: float | None = None,
    norm_seqs: float | None = None,
    sync: bool = True,
) -> tuple[Tensor, dict[str, float]]:
    """PPO-clip loss with the engine's behaviour logprobs as the old policy, plus beta * k3 KL to a reference.

    logp [N, T] (current policy, carries grad), old_logp [N, T] (behaviour), advantages [N] (one per sequence, every
    token inherits it), mask [N, T] (1 on model tokens), ref_logp [N, T] or None.
    Per token: max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps_high)) + beta * k3(logp, ref_logp).
    Aggregation `agg`:
      token_mean           sum over all tokens / norm_tokens (default: this call's token count)
      seq_mean_token_mean  sum over sequences of (their token mean) / norm_seqs (default: this call's N)
      token_sum_norm       sum over all tokens / norm_tokens (required: N x max_new_tokens of the batch, Dr.GRPO)
    Metrics are token means over THIS call's masked tokens (weight them by `num_tokens` to combine micro-batches):
    clip_frac, approx_kl (k3 of the behaviour policy vs the current one), ratio_mean, ratio_max, kl_ref (if ref).
    With sync=False they stay 0-dim tensors on the device (no host sync; the caller converts them in bulk).
    """
    m = mask.bool()
    high = clip_eps if clip_eps_high is None else clip_eps_high
    logp = logp.float()  # ratios in bf16 would be too coarse for a 0.2 clip
    # padded positions may hold anything (even -inf); zero their log-ratio so they stay finite
    log_ratio = torch.where(m, logp - old_logp.float(), torch.zeros_like(logp))
    ratio = torch.exp(log_ratio)
    adv = advantages.float().unsqueeze(-1)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_eps, 1 + high)
    token_loss = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped > unclipped).float(), m),
            "approx_kl": masked_mean(ratio - 1 - log_ratio, m),
            "ratio_mean": masked_mean(ratio, m),
            "ratio_max": ratio.masked_fill(~m, 0.0).max(),
            "num_tokens": m.sum().float(),
        }
    if ref_logp is not None:
        kl = kl_k3(logp, torch.where(m, ref_logp.float(), logp.detach()))
        stats["kl_ref"] = masked_mean(kl.detach(), m)
        if beta:
            token_loss = token_loss + beta * kl
    loss = aggregate(token_loss, m, agg, norm_tokens, norm_seqs)
    if not sync:
        return loss, stats
    # one device sync for all the metrics instead of one per value
    return loss, dict(zip(stats, torch.stack(list(stats.values())).tolist(), strict=True))
