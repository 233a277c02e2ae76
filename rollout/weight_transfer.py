"""Weights in flight between the trainer and rollout workers: a private process group, bucketed broadcast, checksums.

Both ends run this same code: trainer/weight_sync.py sends, the rollout service (or each vLLM worker) receives.

The group is a standalone gloo/NCCL backend over its own TCP store, not `init_process_group`: a trainer launched
with torchrun already owns the default group, and `new_group` can only take ranks of that group, never an outside
process. Each parameter travels as raw bytes (a uint8 view), so dtypes such as bfloat16 arrive bit-identical.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

from rollout.payloads import plan_buckets, tensor_nbytes

STORE_PREFIX = "rldock-weight-sync"


class SyncGroup:
    """A process group of `world_size` ranks over `store`; rank 0 (the trainer) hosts the store and is the root of
    every broadcast. Constructing it is the rendezvous: it returns once all ranks have joined."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, backend: str, timeout_s: float = 600.0):
        timeout = timedelta(seconds=timeout_s)
        self.store, self.rank, self.world_size, self.backend = store, rank, world_size, backend
        prefixed = dist.PrefixStore(STORE_PREFIX, store)
        if backend == "gloo":
            self.pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
            self.device = torch.device("cpu")
        elif backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")

    @classmethod
    def join(cls, host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float = 600.0):
        """A worker's side: connect to the trainer's store at host:port and rendezvous."""
        store = dist.TCPStore(host, port, world_size, False, timeout=timedelta(seconds=timeout_s))
        return cls(store, rank, world_size, backend, timeout_s)

    def broadcast(self, buffer: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        opts.rootTensor = 0
        self.pg.broadcast([buffer], opts).wait()
        if buffer.is_cuda:
            torch.cuda.current_stream().synchronize()

    def close(self) -> None:
        shutdown = getattr(self.pg, "shutdown", None)  # NCCL frees its communicators; gloo has nothing to free
        if shutdown is not None:
            shutdown()
        self.pg = None


def listen(host: str, port: int, world_size: int, timeout_s: float = 600.0) -> dist.TCPStore:
    """The trainer's store, opened before the workers are told where it is (port 0 = any free port, see .port).
    The master does not wait for workers here: SyncGroup's constructor is the rendezvous."""
    timeout = timedelta(seconds=timeout_s)
    return dist.TCPStore(host, port, world_size, True, timeout=timeout, wait_for_workers=False)


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of the tensor's data (a contiguous copy first when needed)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def tensor_spec(name: str, tensor: torch.Tensor) -> dict:
    return {"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}


def unique_tensors(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """State-dict entries with tied duplicates dropped (the first name wins, as in HF safetensors files)."""
    seen: set[tuple] = set()
    out = []
    for name, tensor in state.items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            out.append((name, tensor))
    return out


def send_weights(group: SyncGroup, named: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> None:
    """Broadcast `named` from rank 0 as uint8 buckets, in manifest order (`[tensor_spec(n, t) for n, t in named]`)."""
    manifest = [tensor_spec(n, t) for n, t in named]
    for bucket in plan_buckets(manifest, bucket_bytes):
        parts = [as_bytes(named[i][1]).to(group.device) for i in bucket]
        group.broadcast(parts[0] if len(parts) == 1 else torch.cat(parts))


def receive_weights(group: SyncGroup, manifest: list[dict], bucket_bytes: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Receive what send_weights broadcasts; yields (name, tensor) views into each bucket as it arrives."""
    for bucket in plan_buckets(manifest, bucket_bytes):
        sizes = [tensor_nbytes(manifest[i]) for i in bucket]
        buffer = torch.empty(sum(sizes), dtype=torch.uint8, device=group.device)
        group.broadcast(buffer)
        offset = 0
        for i, size in zip(bucket, sizes, strict=True):
            spec = manifest[i]
            raw = buffer[offset : offset + size]
            yield spec["name"], raw.view(getattr(torch, spec["dtype"])).view(spec["shape"])
            offset += size


def checksum(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes, in name order: equal only for bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named, key=lambda item: item[0]):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(as_bytes(tensor.cpu()).numpy())
    return digest.hexdigest()
