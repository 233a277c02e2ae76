"""The policy's training forward: log-probabilities and entropy of given tokens, straight from the model.

Shared by the GRPO update and the supervised warm start. The batch is right-padded `input_ids`, `keep` (positions
whose next-token distribution is needed, counted from the end) and `targets` (the tokens at those positions + 1).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.logprobs import linear_logprobs


def token_logprobs(model: nn.Module, batch: dict[str, Any], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(target) and the policy's entropy at each kept position (fp32), without materialising the logits.

    Autocast runs only where the weights are not already in `dtype` (fp32 masters, FSDP2 shards). No attention mask:
    sequences are right-padded, so a causal mask alone is exact for every real token (pads only follow them) and
    attention takes the fused causal kernels; what pad positions compute is masked out of the loss.
    """
    device = batch["input_ids"].device
    cast = next(model.parameters()).dtype != dtype  # a compute-dtype copy (trainer/precision.py) needs no autocast
    with torch.autocast(device.type, dtype=dtype, enabled=cast), logprob_head(model, batch, dtype):
        out = model(input_ids=batch["input_ids"], logits_to_keep=batch["keep"], use_cache=False)
    return out.logits[..., 0], out.logits[..., 1]


@contextmanager
def logprob_head(model: nn.Module, batch: dict[str, Any], dtype: torch.dtype):
    """Make the output embedding return [log pi(target), entropy] per position instead of logits.

    Done inside the model's own forward so that FSDP2 has gathered the head's weight, and the weight's gradient
    flows back through the usual hooks.
    """
    head = model.get_output_embeddings()

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        logp, ent = linear_logprobs(hidden[:, :-1], head.weight, batch["targets"], dtype)
        return torch.stack([logp, ent], dim=-1)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward


def right_pad(rows: list[list], fill, dtype) -> np.ndarray:
    """Rows of unequal length → one [len(rows), longest] array, filled after each row's end.

    Filled row by row in numpy: building the batch tensors from nested Python lists took ~15 ms for a 64 x 288 batch,
    time the GPU sat idle before every micro-batch.
    """
    out = np.full((len(rows), max(map(len, rows))), fill, dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def on_device(a: np.ndarray, device) -> torch.Tensor:
    """A (possibly sliced) numpy array as a tensor on `device`."""
    return torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)
