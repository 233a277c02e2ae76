"""Trainer ↔ rollout service ↔ env server, every one a real process on 127.0.0.1, with the real SmolLM2 on CPU.

`python -m trainer` runs 2 GRPO steps of the multi-turn gsm8k_tools env: generation on `python -m rollout.server`
(rollout.backend=http), episodes on `python -m env_servers` (env.url), new weights handed over through safetensors on
disk (weight_sync=disk). The service must end at the trainer's last version, each step's samples must come
from the weights of the step before, and every env slot the trainer opened must be closed again.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import ROOT, TEST_WEIGHTS_ROOT, free_port, run_trainer_config, start_server, stop_server

pytestmark = pytest.mark.slow
STEPS = 2


@pytest.fixture(scope="module")
def services(tmp_path_factory, model_path):
    logs = tmp_path_factory.mktemp("logs")
    env_port, rollout_port = free_port(), free_port()
    env_args = ["-m", "env_servers", "--env", "gsm8k_tools", "--port", str(env_port)]
    env_args += ["--data", str(ROOT / "data/gsm8k/train.jsonl")]  # the trainer's items index the train split
    env = start_server(env_args, f"http://127.0.0.1:{env_port}/health", logs / "env.log")
    try:
        rollout_args = [
            "-m",
            "rollout.server",
            "--model",
            model_path,
            "--port",
            str(rollout_port),
            "--threads",
            "1",
            *TEST_WEIGHTS_ROOT,
        ]
        rollout = start_server(rollout_args, f"http://127.0.0.1:{rollout_port}/health", logs / "rollout.log", 300)
    except Exception:
        stop_server(env)
        raise
    yield f"http://127.0.0.1:{env_port}", f"http://127.0.0.1:{rollout_port}"
    stop_server(rollout)
    stop_server(env)


def test_trainer_rollout_service_env_server(services, tmp_path):
    env_url, rollout_url = services
    config = {
        "experiment_name": "e2e",
        "data": {"max_train_samples": 4},
        "rollout": {"backend": "http", "urls": [rollout_url], "n": 2, "max_new_tokens": 16},
        "train": {"batch_size": 2, "micro_batch_size": 4, "total_steps": STEPS, "threads": 1},
        "weight_sync": "disk",
        "eval": {"every": 0},
        "checkpoint": {"save_dir": str(tmp_path / "saves"), "every": 0},
        "logging": {"wandb": False, "progress": False},
        "env": {"name": "gsm8k_tools", "url": env_url, "max_rounds": 2},
    }
    run = run_trainer_config(config, tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]

    exp = tmp_path / "saves" / "e2e"
    rows = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert [r["weight_version"] for r in steps] == list(range(1, STEPS + 1))  # one push per step
    # synchronous rollout: step k trains on samples of the weights step k-1 pushed
    assert [r["sample_version"] for r in steps] == list(range(STEPS))
    assert all(r["staleness"] == 0 for r in steps)
    assert all(r["num_rounds"] >= 1 for r in steps)

    health = httpx.get(f"{rollout_url}/health").json()
    assert health["weight_version"] == STEPS  # the service loaded the last version from disk
    assert (exp / "weights" / f"v{STEPS}" / "model.safetensors").is_file()  # what the service loaded
    assert httpx.get(f"{env_url}/list_envs").json() == []  # every episode closed its env slot
