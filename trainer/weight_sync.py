"""Weight sync trainer → rollout engine (the config's `weight_sync:` section): inprocess | disk | nccl.

    sync = make_weight_sync(cfg, engine, d)   # engine: what rollout_factory.make_engine returned
    sync.push(model, version)                 # every rank, after each optimizer step; later samples carry `version`

One ABC, one factory. `push` is called on every rank: under FSDP the full state dict is gathered collectively. The
in-process sync feeds each rank's own engine; the remote ones (disk, nccl) feed the shared rollout services from
rank 0 alone (`send`, which also takes a full HF-named state dict, for tools and tests).
- inprocess: `engine.update_weights(model, version)` (an aliasing embedded engine only bumps its version).
- disk: HF safetensors written to `saves/<exp>/weights/v<N>.tmp`, renamed to `v<N>`, loaded by the engine (every
  rollout service for the HTTP client, which re-posts the newest folder to a restarted service); the newest
  `keep` versions are kept.
- nccl: a private process group between the trainer (rank 0, hosting a TCP store) and every service worker
  (rollout/weight_transfer.py); each push posts the name/shape/dtype manifest to every service over HTTP while the
  trainer broadcasts the bytes in buckets. Backend nccl on GPU; gloo runs the same code on CPU. A restarted service
  is re-synced by rebuilding the group and broadcasting the last pushed weights again (found by the client's next
  generation, or by the boot-id check before each push).
The service loads weights between generations, so no generation mixes two versions.
"""

from __future__ import annotations

import abc
import os
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from rollout import payloads as P
from rollout.api import RolloutEngine
from rollout.client import HTTPRolloutClient, ServiceError
from rollout.engine import EmbeddedEngine
from rollout.loading import umask_modes
from rollout.weight_transfer import SyncGroup, listen, send_weights, tensor_spec, unique_tensors
from trainer.config import Config
from trainer.dist import Dist, full_state_dict
from trainer.precision import ComputeWeights

Weights = nn.Module | dict[str, torch.Tensor]


class WeightSync(abc.ABC):
    def __init__(self, d: Dist | None = None):
        self.d = d or Dist()

    @abc.abstractmethod
    def push(self, model: nn.Module, version: int) -> int:
        """Every rank: hand the model's weights to the engine as `version`; returns the version it now serves."""

    def close(self) -> None:
        """Release groups and threads."""


class InProcessSync(WeightSync):
    """Each rank's embedded engine: shared memory (an aliasing engine only bumps its version). `compute`: the
    learner's compute-dtype copy of the weights (trainer/precision.py: refreshed from the master before every push)
    or None; an engine of its dtype loads from it in one batched same-dtype copy instead of casting the fp32 master
    tensor by tensor: half the bytes read, a few launches instead of one per tensor. On one process the engine gets the
    module itself and keeps how its parameters map onto the engine's between pushes (`rollout.model.LoadPlan`)."""

    def __init__(self, engine: EmbeddedEngine, d: Dist | None = None, compute: nn.Module | None = None):
        super().__init__(d)
        self.engine, self.compute = engine, compute

    def push(self, model: nn.Module, version: int) -> int:
        if self.engine.aliased:
            return self.engine.update_weights(model, version=version)
        copy = self.compute is not None and next(self.compute.parameters()).dtype == self.engine.dtype
        source = self.compute if copy else model
        weights = full_state_dict(source, self.d) if self.d.distributed else source
        return self.engine.update_weights(weights, version=version)


class RemoteSync(WeightSync):
    """Rollout services shared by every rank: all ranks gather, rank 0 sends."""

    def push(self, model: nn.Module, version: int) -> int:
        # a collective under FSDP: every rank gathers; one process sends the module itself (its config goes along)
        weights = full_state_dict(model, self.d) if self.d.distributed else model
        if self.d.is_main:
            self.send(weights, version)
        return version

    @abc.abstractmethod
    def send(self, weights: Weights, version: int) -> int:
        """Hand `weights` to the services as `version`; returns the version they now report."""


def _named(weights: Weights) -> list[tuple[str, torch.Tensor]]:
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    return unique_tensors(state)


def write_weights(weights: Weights, folder: Path) -> Path:
    """Write an HF safetensors folder (model.safetensors + config.json when known) atomically: `<folder>.tmp` first."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in _named(weights)}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = getattr(weights, "config", None)
    if hasattr(config, "to_json_file"):
        config.to_json_file(str(tmp / "config.json"))
    umask_modes(tmp)
    shutil.rmtree(folder, ignore_errors=True)  # the same version pushed again (e.g. after a resume)
    os.replace(tmp, folder)
    return folder


class DiskSync(RemoteSync):
    def __init__(self, engine: RolloutEngine, weights_dir: str | Path, keep: int = 2, d: Dist | None = None):
        super().__init__(d)
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.engine, self.dir, self.keep = engine, Path(weights_dir), keep

    def send(self, weights: Weights, version: int) -> int:
        folder = write_weights(weights, self.dir / f"v{version}")
        version = self.engine.update_weights(str(folder.resolve()), version)
        self.prune()
        return version

    def versions(self) -> list[int]:
        found = (re.fullmatch(r"v(\d+)", p.name) for p in self.dir.iterdir()) if self.dir.is_dir() else ()
        return sorted(int(m.group(1)) for m in found if m)

    def prune(self) -> None:
        for v in self.versions()[: -self.keep]:
            shutil.rmtree(self.dir / f"v{v}", ignore_errors=True)


class NcclSync(RemoteSync):
    """Broadcast weights to every service of an HTTPRolloutClient (see the module docstring)."""

    def __init__(
        self,
        client: HTTPRolloutClient,
        host: str = "127.0.0.1",
        port: int = 0,
        backend: str = "auto",
        bucket_bytes: int = 256 << 20,
        timeout_s: float = 600.0,
        d: Dist | None = None,
    ):
        super().__init__(d)
        self.client, self.host, self.port = client, host, port
        self.backend = ("nccl" if torch.cuda.is_available() else "gloo") if backend == "auto" else backend
        self.bucket_bytes, self.timeout_s = bucket_bytes, timeout_s
        self.group: SyncGroup | None = None
        self._members: list[str] = []  # boot ids of the services in the group
        self._last: tuple[Weights, int] | None = None
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(len(client.urls) + 1, thread_name_prefix="weight-sync")
        client.resync = self.resync

    def _open(self) -> None:
        """Open the store, tell every service its ranks, and rendezvous (all sides block until everyone joined)."""
        health = [self.client.health(url) for url in self.client.urls]
        ranks = [h["sync_ranks"] for h in health]
        world = 1 + sum(ranks)
        store = listen(self.host, self.port, world, self.timeout_s)
        offsets = [1 + sum(ranks[:i]) for i in range(len(ranks))]
        futures = [
            self._pool.submit(self._post, url, "/init_weight_sync", self._init_body(store.port, off, world))
            for url, off in zip(self.client.urls, offsets, strict=True)
        ]
        try:
            self.group = SyncGroup(store, 0, world, self.backend, self.timeout_s)
        finally:
            errors = [f.exception() for f in futures]
        if any(errors):
            self.close_group()
            raise ServiceError(
                f"a rollout service could not join the weight-sync group: {next(e for e in errors if e)}"
            )
        self._members = [h["boot_id"] for h in health]

    def _members_changed(self) -> bool:
        """A member restarted since the group formed: broadcasting now would wait for a rank that is gone."""
        return [self.client.health(url)["boot_id"] for url in self.client.urls] != self._members

    def _init_body(self, port: int, rank_offset: int, world: int) -> dict:
        return P.init_sync_body(self.host, port, rank_offset, world, self.backend, self.timeout_s)

    def _post(self, url: str, route: str, body: dict) -> dict:
        # no retries: a re-sent group call would wait for a rendezvous or broadcast that never comes
        return self.client.request("POST", url, route, body, timeout=self.timeout_s + 30, retry=False)

    def send(self, weights: Weights, version: int) -> int:
        with self._lock:
            if self.group is not None and self._members_changed():
                self.close_group()
            if self.group is None:
                self._open()
            named = _named(weights)
            body = P.nccl_update_body([tensor_spec(n, t) for n, t in named], self.bucket_bytes, version)
            futures = [self._pool.submit(self._post, url, "/update_weights", body) for url in self.client.urls]
            try:
                send_weights(self.group, named, self.bucket_bytes)
                answers = [f.result() for f in futures]
            except Exception:
                self.close_group()  # a half-done broadcast leaves the group unusable; the next push reopens it
                raise
            self._last = (weights, version)
            self.client.mark_synced(None, version, answers)
            return version

    def resync(self, url: str) -> None:
        """A service restarted: rebuild the group with it and broadcast the last pushed weights to everyone."""
        with self._lock:
            if self._last is None:
                return
            self.close_group()
            self.send(*self._last)

    def close_group(self) -> None:
        with self._lock:
            for url in self.client.urls:
                try:
                    self.client.request("POST", url, "/close_weight_sync", timeout=30.0, retry=False)
                except ServiceError:
                    pass  # a dead service has no group to close
            if self.group is not None:
                self.group.close()
                self.group = None

    def close(self) -> None:
        self.close_group()
        self._pool.shutdown(wait=False)


def make_weight_sync(
    cfg: Config, engine: RolloutEngine, d: Dist | None = None, weights: ComputeWeights | None = None
) -> WeightSync:
    """The sync `cfg.weight_sync` names, for the engine rollout_factory made (the config checked the pairing);
    `weights`: the learner's, whose compute copy an in-process engine may load from."""
    ws = cfg.weight_sync
    if ws.kind == "inprocess":
        return InProcessSync(engine, d, weights.forward_model if weights is not None and weights.copied else None)
    if ws.kind == "disk":
        return DiskSync(engine, cfg.exp_dir / "weights", keep=ws.keep, d=d)
    kwargs = dict(
        host=ws.host, port=ws.port, backend=ws.backend, bucket_bytes=ws.bucket_mb << 20, timeout_s=ws.timeout_s
    )
    return NcclSync(engine, d=d, **kwargs) if (d or Dist()).is_main else _Gatherer(d)


class _Gatherer(RemoteSync):
    """The nccl sync on ranks other than 0: they only take part in the gather (rank 0 owns the group)."""

    def send(self, weights: Weights, version: int) -> int:
        return version
