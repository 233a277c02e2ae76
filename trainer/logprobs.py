"""Token log-probabilities and entropies straight from the last hidden states and the output embedding.

The logits are the largest tensor of a GRPO update: 64 sequences x 288 tokens x 49,152 vocabulary is 3.6 GB in
fp32, read several times by log-softmax, entropy and their backward. `linear_logprobs` never holds more than one
chunk of rows of them: the forward keeps only each row's log-sum-exp, and the backward recomputes the chunk's logits
(one extra [rows, H] x [H, V] GEMM, cheaper than writing and re-reading fp32 logits). Pure tensor code; no model.
"""

from __future__ import annotations

import torch
from torch import Tensor

# fp32 elements of one chunk of logits: 2^28 x 4 B = 1 GiB, a few temporaries of it at a time
CHUNK_ELEMENTS = 1 << 28


def chunk_rows(vocab: int, budget: int = CHUNK_ELEMENTS) -> int:
    """Rows per chunk so that one fp32 [rows, vocab] block holds at most `budget` elements."""
    return max(1, budget // vocab)


def _chunk_forward(z: Tensor, targets: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(log p(target), entropy, log-sum-exp) of one chunk of logits, summed in `acc`."""
    z = z.to(acc)
    lse = torch.logsumexp(z, dim=-1)
    picked = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    p = torch.exp(z - lse.unsqueeze(-1))
    return picked, lse - (p * z).sum(-1), lse


def _chunk_grad(z: Tensor, targets: Tensor, lse: Tensor, grad: Tensor) -> Tensor:
    """d(sum grad * log p(target)) / d logits = grad * (onehot(target) - softmax), in the logits' dtype."""
    dz = torch.exp(z.to(lse.dtype) - lse.unsqueeze(-1)).mul_(-grad.unsqueeze(-1))
    return dz.scatter_add_(-1, targets.unsqueeze(-1), grad.unsqueeze(-1)).to(z.dtype)


_COMPILED: dict = {}


def _kernel(fn, device: torch.device):
    """fn itself on CPU; on CUDA fn compiled once, so each chunk's casts, exp and sums are one or two fused passes
    over the logits instead of one pass per op."""
    if device.type != "cuda":
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, rows: int, dtype: torch.dtype):
        h, w = hidden.to(dtype), weight.to(dtype)
        n, acc = h.shape[0], torch.promote_types(dtype, torch.float32)
        logp, ent, lse = (torch.empty(n, device=h.device, dtype=acc) for _ in range(3))
        chunk_forward = _kernel(_chunk_forward, h.device)
        for s in range(0, n, rows):
            z = h[s : s + rows] @ w.T
            logp[s : s + rows], ent[s : s + rows], lse[s : s + rows] = chunk_forward(z, targets[s : s + rows], acc)
        ctx.save_for_backward(h, w, targets, lse)
        ctx.rows, ctx.dtypes = rows, (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp: Tensor, _grad_ent: Tensor):
        h, w, targets, lse = ctx.saved_tensors
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(w.shape, device=w.device, dtype=lse.dtype)
        grad_logp = grad_logp.to(lse.dtype)
        chunk_grad = _kernel(_chunk_grad, h.device)
        for s in range(0, h.shape[0], ctx.rows):
            hs = h[s : s + ctx.rows]
            dz = chunk_grad(hs @ w.T, targets[s : s + ctx.rows], lse[s : s + ctx.rows], grad_logp[s : s + ctx.rows])
            grad_h[s : s + ctx.rows] = dz @ w
            grad_w += dz.T @ hs
        return grad_h.to(ctx.dtypes[0]), grad_w.to(ctx.dtypes[1]), None, None, None


def linear_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, dtype: torch.dtype | None = None, rows: int | None = None
) -> tuple[Tensor, Tensor]:
    """log softmax(hidden @ weight.T)[target] and the entropy of that softmax, per row (fp32, or fp64 for fp64).

    hidden [..., H], weight [V, H] (the output embedding), targets [...] token ids. The GEMMs run in `dtype`
    (default: hidden's), softmax sums in fp32. Gradients flow to hidden and weight through the log-probabilities;
    the entropy is a metric and carries none.
    """
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    rows = rows or chunk_rows(weight.shape[0])
    logp, ent = _LinearLogprobs.apply(h, weight, targets.reshape(-1), rows, dtype or hidden.dtype)
    return logp.reshape(shape), ent.reshape(shape)
