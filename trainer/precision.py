"""Where the training forward gets its compute-dtype weights, and how its gradients reach the fp32 master weights.

Under torchrun FSDP2 does both (MixedPrecisionPolicy: shards cast on all-gather, gradients reduced in fp32). On one
process, `train.compute_copy` (default) keeps a compute-dtype copy of the parameters: the forward and backward run on
it as a bf16 model runs at inference (residual stream included), each micro-batch's gradients are added into the
master's fp32 gradients, and the copy is refreshed from the master after every change to it (optimizer step,
checkpoint restore, SFT step). Autocast over the fp32 weights instead casts every weight at every use in every
micro-batch, casts every weight gradient back, and keeps the residual stream and norms in fp32: a W update at
micro-batch 16 took 0.363 s that way and 0.262 s with the copy (bench/RESULTS.md). Buffers (RoPE's inv_freq) are
shared, not cast: they keep their precision.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ComputeWeights:
    """The module the training forward runs (`forward_model`) over the fp32 master module (`master`)."""

    def __init__(self, master: nn.Module, dtype: torch.dtype, copy_weights: bool):
        self.master = master
        self.forward_model = _cast_copy(master, dtype) if copy_weights else master
        self._pairs = (
            [(m, c) for m, c in zip(master.parameters(), self.forward_model.parameters(), strict=True)]
            if copy_weights
            else []
        )

    @property
    def copied(self) -> bool:
        """True when the forward runs on a separate compute-dtype copy (no autocast needed)."""
        return bool(self._pairs)

    def fold_grads(self) -> None:
        """After a micro-batch's backward: add the copy's gradients into the master's (fp32) and free them."""
        for m, c in self._pairs:
            if c.grad is None:
                continue
            if m.grad is None:
                m.grad = c.grad.to(m.dtype)
            else:
                m.grad.add_(c.grad)
            c.grad = None

    @torch.no_grad()
    def refresh(self) -> None:
        """The master changed (optimizer step, restore, warm start): cast it into the copy."""
        if self._pairs:
            torch._foreach_copy_([c for _, c in self._pairs], [m for m, _ in self._pairs])


def _cast_copy(master: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A deep copy whose parameters are new `dtype` tensors (tied ones stay tied) and whose buffers are the master's."""
    memo: dict[int, object] = {
        id(p): nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad) for p in master.parameters()
    }
    memo.update({id(b): b for b in master.buffers()})
    return copy.deepcopy(master, memo)
