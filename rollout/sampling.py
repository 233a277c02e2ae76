"""Token sampling on logits: greedy, temperature, top-k, top-p; plus the behaviour logprob GRPO needs.

Every op here is shape-static and sync-free, so a decode step that calls `sample` can be captured as a CUDA graph
(the random numbers come from a generator registered with the graph).
"""

from __future__ import annotations

import torch


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor | float,
    top_p: torch.Tensor | float,
    top_k: int,
    greedy: bool,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of fp32 `logits` [B, V]; return (tokens [B], logprobs [B]).

    The logprob is that of the drawn token under the *unmodified* policy (temperature 1, no truncation):
    log_softmax(logits)[token]. That is the behaviour policy GRPO's importance ratio compares against, whatever
    temperature / top-p / top-k shaped the draw.
    """
    if greedy:
        tokens = logits.argmax(-1)
    else:
        probs = torch.softmax(truncate(logits / temperature, top_p, top_k), dim=-1)
        # exponential race (Gumbel-max): argmax p_i / E_i with E_i ~ Exp(1) is a draw from p, with no host sync
        noise = torch.empty_like(probs).exponential_(generator=generator)
        tokens = (probs / noise).argmax(-1)
    logprobs = logits.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
    return tokens, logprobs


def truncate(scaled: torch.Tensor, top_p: torch.Tensor | float, top_k: int) -> torch.Tensor:
    """Temperature-scaled logits with everything outside the top-k / top-p set at -inf (no-op when both are off)."""
    if top_k > 0:
        kth = torch.topk(scaled, min(top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if not isinstance(top_p, float) or top_p < 1.0:
        scaled = _top_p(scaled, top_p)
    return scaled


def _top_p(scaled: torch.Tensor, top_p: torch.Tensor | float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (always at least one)."""
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before > top_p, float("-inf"))
    return torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)
