"""Ranks and sharding. One process (no torchrun) never touches torch.distributed; under torchrun the model is
sharded with FSDP2 `fully_shard`, one unit per decoder layer and then the root.

Gradients: FSDP2 averages them over ranks, so a loss normalised by the GLOBAL token count is multiplied by the
world size before backward (see `loss_scale`), which makes the update equal to one process seeing the whole batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False  # a process group exists (launched by torchrun)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def loss_scale(self) -> float:
        """Multiply a globally normalised loss by this: FSDP averages gradients, a single process sums them."""
        return float(self.world_size)


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def init(device_preference: str = "auto") -> Dist:
    """A process group when launched by torchrun (nccl on GPU, gloo on CPU); otherwise a plain single-rank Dist."""
    if not launched_by_torchrun():
        return Dist(device=pick_device(device_preference))
    import torch.distributed as dist

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_preference, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # on CUDA also gloo for CPU tensors: the shards of train.cpu_offload live there
        dist.init_process_group(
            "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
            device_id=device if device.type == "cuda" else None,
        )
    return Dist(rank, world, local, device, True)


def close(d: Dist) -> None:
    if d.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.distributed:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(d: Dist, values: list[float]) -> list[float]:
    """Sum a few floats over ranks (float64, on the rank's device)."""
    if not d.distributed:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_object(d: Dist, obj) -> list:
    if not d.distributed:
        return [obj]
    import torch.distributed as dist

    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, found by the class names HF lists in `_no_split_modules` (LlamaDecoderLayer, ...).

    Matched along each module's class hierarchy: `fully_shard` swaps a sharded module's class for a subclass named
    `FSDP<Name>`, and the layers must still be found after sharding (to compile them)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    if not layers:
        raise ValueError(
            f"{type(model).__name__}: cannot find its decoder layers (none of the classes in _no_split_modules "
            f"{sorted(names)} is among its modules)"
        )
    return layers


def shard(model: nn.Module, d: Dist, param_dtype: torch.dtype | None = None, cpu_offload: bool = False) -> nn.Module:
    """FSDP2: one unit per decoder layer, then the root (embeddings, final norm and a tied lm_head stay together).
    `cpu_offload` keeps the shards, their gradients and so the optimizer state in (pinned) host memory."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs: dict = {}
    if param_dtype:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def full_state_dict(model: nn.Module, d: Dist) -> dict[str, torch.Tensor]:
    """Every parameter in full on every rank (HF names), for the rank's engine replica."""
    if not d.distributed:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def peak_memory_gib(d: Dist) -> float:
    """The most GPU memory this rank's tensors have held since the process started (0 on CPU)."""
    return torch.cuda.max_memory_allocated(d.device) / 2**30 if d.device.type == "cuda" else 0.0


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global grad norm (DTensor-aware under FSDP2); the norm before clipping, left on the device."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm
