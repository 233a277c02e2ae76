"""Weight sync trainer → rollout: disk and gloo (the nccl code path on CPU) against a real rollout service give
bit-identical weights; versions advance and show in samples; a restarted service is re-synced over a new group."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from rollout.api import SamplingParams
from rollout.client import HTTPRolloutClient
from rollout.weight_transfer import checksum, unique_tensors
from tests.conftest import TEST_WEIGHTS_ROOT, free_port, start_server, stop_server
from trainer.config import ConfigError, load_config
from trainer.weight_sync import DiskSync, InProcessSync, NcclSync, make_weight_sync

pytestmark = pytest.mark.slow


class Service:
    def __init__(self, model_path, log_dir):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [
            "-m",
            "rollout.server",
            "--model",
            model_path,
            "--port",
            str(self.port),
            "--threads",
            "1",
            *TEST_WEIGHTS_ROOT,
        ]
        self.log_dir, self.starts = log_dir, 0
        self.start()

    def start(self):
        self.starts += 1
        self.proc = start_server(self.args, self.url + "/health", self.log_dir / f"server-{self.starts}.log")

    def stop(self):
        stop_server(self.proc)


@pytest.fixture(scope="module")
def service(model_path, tmp_path_factory):
    s = Service(model_path, tmp_path_factory.mktemp("weight-sync"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def trainer_model(model_path):
    from rollout.loading import load_model

    torch.manual_seed(0)
    return load_model(model_path)


@pytest.fixture(scope="module")
def client(service):
    c = HTTPRolloutClient([service.url], timeout=120, recovery_s=120)
    yield c
    c.close()


@pytest.fixture(scope="module")
def nccl(client):
    sync = NcclSync(client, backend="gloo", bucket_bytes=8 << 20)  # 8 MiB: many buckets, embeddings alone
    yield sync
    sync.close()


def train_step(model) -> str:
    """Stand-in for an optimizer step: change every weight a little; returns the trainer-side checksum."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    return checksum(unique_tensors(model.state_dict()))


def versions(client) -> set[int]:
    return {c.weight_version for c in client.generate([[1, 2, 3]], SamplingParams(n=2, max_new_tokens=2))}


def test_gloo_and_disk_give_bit_identical_weights(client, nccl, trainer_model, tmp_path):
    expected = train_step(trainer_model)
    assert expected != client.weights_checksum(client.urls[0])
    assert nccl.push(trainer_model, 1) == 1
    by_gloo = client.weights_checksum(client.urls[0])
    assert by_gloo == expected and versions(client) == {1}

    disk = DiskSync(client, tmp_path / "weights")
    assert disk.push(trainer_model, 2) == 2  # the same weights again, through a safetensors folder
    assert client.weights_checksum(client.urls[0]) == by_gloo == expected
    assert versions(client) == {2}


def test_generation_never_mixes_versions_during_a_push(client, nccl, trainer_model):
    expected = train_step(trainer_model)
    seen, stop = [], threading.Event()

    def generate_while_pushing():
        while not stop.is_set():
            seen.append({c.weight_version for c in client.generate([[1, 5]], SamplingParams(n=3, max_new_tokens=3))})

    worker = threading.Thread(target=generate_while_pushing)
    worker.start()
    try:
        nccl.push(trainer_model, 3)
    finally:
        stop.set()
        worker.join(120)
    assert seen and all(len(v) == 1 and v <= {2, 3} for v in seen)
    assert client.weights_checksum(client.urls[0]) == expected and versions(client) == {3}


def umask_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def test_disk_sync_is_atomic_and_keeps_two(client, trainer_model, tmp_path):
    weights = tmp_path / "weights"
    for old in ("v1", "v2", "v3"):
        (weights / old).mkdir(parents=True)
    disk = DiskSync(client, weights)
    expected = train_step(trainer_model)
    assert disk.push(trainer_model, 4) == 4
    assert sorted(p.name for p in weights.iterdir()) == ["v3", "v4"]  # pruned, no *.tmp left behind
    assert sorted(p.name for p in (weights / "v4").iterdir()) == ["config.json", "model.safetensors"]
    assert {p.stat().st_mode & 0o777 for p in (weights / "v4").iterdir()} == {umask_file_mode()}
    assert client.weights_checksum(client.urls[0]) == expected and versions(client) == {4}


def test_restarted_service_rejoins_the_group_and_is_resynced(service, client, nccl, trainer_model):
    expected = train_step(trainer_model)
    nccl.push(trainer_model, 5)
    old_boot = client.health(service.url)["boot_id"]
    service.stop()
    service.start()
    fresh = client.health(service.url)
    assert fresh["boot_id"] != old_boot and fresh["weight_version"] == 0
    assert versions(client) == {5}  # the client saw version 0 from a new boot id, re-synced over gloo, asked again
    assert client.weights_checksum(service.url) == expected
    assert client.metrics(service.url)["weight_updates"] == 1


def test_push_after_a_restart_rebuilds_the_group_first(service, client, nccl, trainer_model):
    service.stop()  # restarted while the trainer was busy training: no generation noticed it
    service.start()
    expected = train_step(trainer_model)
    assert nccl.push(trainer_model, 6) == 6
    assert client.weights_checksum(service.url) == expected and versions(client) == {6}


def test_inprocess_sync_and_config_wiring(model_path, trainer_model, client, tmp_path):
    from rollout.engine import EmbeddedEngine

    engine = EmbeddedEngine(model_path, max_batch_size=4)
    expected = checksum(unique_tensors(trainer_model.state_dict()))
    assert InProcessSync(engine).push(trainer_model, 7) == 7
    assert checksum(engine.model.named_parameters()) == expected
    assert {c.weight_version for c in engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))} == {7}

    def cfg(*overrides):
        return load_config(None, ["experiment_name=ws", f"checkpoint.save_dir={tmp_path}", *overrides])

    disk = make_weight_sync(cfg("rollout.backend=http", "weight_sync=disk", "weight_sync.keep=3"), client)
    assert isinstance(disk, DiskSync) and disk.dir == tmp_path / "ws" / "weights" and disk.keep == 3
    assert isinstance(make_weight_sync(cfg(), engine), InProcessSync)
    nccl = make_weight_sync(cfg("rollout.backend=http", "weight_sync=nccl", "weight_sync.bucket_mb=8"), client)
    assert isinstance(nccl, NcclSync) and nccl.bucket_bytes == 8 << 20
    nccl.close()
    # a pairing that cannot work fails when the config loads, before any model does
    with pytest.raises(ConfigError, match="inprocess does not reach rollout.backend=http: use disk or nccl"):
        cfg("rollout.backend=http")
    with pytest.raises(ConfigError, match="nccl does not reach rollout.backend=embedded"):
        cfg("weight_sync=nccl")
    engine.close()


def test_inprocess_sync_loads_the_compute_copy_of_its_dtype(model_path, trainer_model):
    """An engine in the learner's compute dtype loads the compute copy (the master rounded to bf16, one batched
    same-dtype copy); an engine of another dtype loads the fp32 master; a state dict with a parameter missing raises
    and changes no weight."""
    from rollout.engine import EmbeddedEngine
    from rollout.model import load_state
    from trainer.precision import ComputeWeights

    weights = ComputeWeights(trainer_model, torch.bfloat16, copy_weights=True)
    train_step(trainer_model)
    weights.refresh()
    copy_sum = checksum(unique_tensors(weights.forward_model.state_dict()))
    bf16 = EmbeddedEngine(model_path, max_batch_size=2, dtype=torch.bfloat16)
    fp32 = EmbeddedEngine(model_path, max_batch_size=2)
    assert InProcessSync(bf16, compute=weights.forward_model).push(trainer_model, 3) == 3
    assert checksum(bf16.model.named_parameters()) == copy_sum
    assert InProcessSync(fp32, compute=weights.forward_model).push(trainer_model, 3) == 3
    assert checksum(fp32.model.named_parameters()) == checksum(unique_tensors(trainer_model.state_dict()))
    partial = dict(trainer_model.state_dict())
    partial.pop("model.norm.weight")
    before = checksum(fp32.model.named_parameters())
    with pytest.raises(ValueError, match="missing 1 parameters"):
        load_state(fp32.model, {k: v + 1 for k, v in partial.items()})
    assert checksum(fp32.model.named_parameters()) == before
    bf16.close()
    fp32.close()
