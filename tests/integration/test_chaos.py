"""Chaos: a trainer, a rollout service and an env server (real SmolLM2, CPU) while a driver SIGKILLs a random one of
the three at random moments, from a seeded schedule, and restarts it as a supervisor would (compose `restart:`).

What must hold: the run completes all steps; metrics.jsonl has each step exactly once; every restart of the trainer
resumes at most one checkpoint interval behind the last step it had logged; the final checkpoint verifies. The
final weights equal those of an uninterrupted run with the same seed when no episode was lost: every request carries
its sampling seed and the service answers a seeded request alone, so a retried request or a restarted service gives
the same tokens, and the trainer resumes its data order and RNG from the checkpoint. An env server killed mid-episode
loses that episode's slot, the episode is dropped (fewer trajectories that step), and the weights then differ: the
test says so and checks the rest.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, TEST_WEIGHTS_ROOT, free_port, start_server, stop_server

pytestmark = pytest.mark.slow
STEPS, BATCH, N = 6, 2, 2
SEED = 11  # the kill schedule's seed


class Supervised:
    """A service that the driver may SIGKILL; `restart` brings it back on the same port."""

    def __init__(self, name: str, args: list[str], port: int, logs: Path):
        self.name, self.args, self.port, self.logs, self.starts = name, args, port, logs, 0
        self.url = f"http://127.0.0.1:{port}"
        self.start()

    def start(self) -> None:
        self.starts += 1
        log = self.logs / f"{self.name}-{self.starts}.log"
        self.proc = start_server(self.args, self.url + "/health", log, timeout=300)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        stop_server(self.proc)


def services(logs: Path) -> tuple[Supervised, Supervised]:
    env_port, rollout_port = free_port(), free_port()
    env_args = ["-m", "env_servers", "--env", "gsm8k_tools", "--port", str(env_port)]
    env_args += ["--data", str(ROOT / "data/gsm8k/train.jsonl")]
    env = Supervised("env", env_args, env_port, logs)
    model = str(ROOT / "models/smollm2-135m-instruct")
    rollout_args = ["-m", "rollout.server", "--model", model, "--port", str(rollout_port), "--threads", "1"]
    rollout = Supervised("rollout", [*rollout_args, *TEST_WEIGHTS_ROOT], rollout_port, logs)
    return env, rollout


def write_config(tmp: Path, name: str, env: Supervised, rollout: Supervised) -> Path:
    config = {
        "experiment_name": name,
        "data": {"max_train_samples": 12},
        "rollout": {"backend": "http", "urls": [rollout.url], "n": N, "max_new_tokens": 12},
        "train": {"batch_size": BATCH, "micro_batch_size": 4, "total_steps": STEPS, "threads": 1, "seed": 0,
                  "recovery_s": 120, "lr": 1e-5},
        "weight_sync": "disk",
        "grpo": {"drop_zero_adv_groups": False},
        "eval": {"every": 0},
        "checkpoint": {"save_dir": str(tmp / "saves"), "every": 1, "keep_last": 2},
        "logging": {"wandb": False, "progress": False},
        "env": {"name": "gsm8k_tools", "url": env.url, "max_rounds": 2},
    }  # fmt: skip
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_trainer(config: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "trainer", str(config)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def logged_steps(exp: Path) -> list[int]:
    path = exp / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
    return [r["step"] for r in rows if "reward" in r]


def final_weights(exp: Path) -> dict:
    from safetensors.torch import load_file

    from trainer.checkpoint import find_latest

    ckpt = find_latest(exp)
    out = exp / "merged"
    merge = [sys.executable, "-m", "scripts.model_merger", "--local_dir", str(ckpt), "--save_dir", str(out)]
    subprocess.run(merge, cwd=ROOT, check=True, capture_output=True, timeout=600)
    return load_file(out / "model.safetensors")


def test_the_run_survives_random_sigkills(tmp_path):
    from trainer.checkpoint import find_latest, verify
    from trainer.dist import Dist

    logs = tmp_path / "logs"
    logs.mkdir()
    env, rollout = services(logs)
    try:
        exp = tmp_path / "saves" / "chaos"
        config = write_config(tmp_path, "chaos", env, rollout)
        rng = random.Random(SEED)
        # A seeded order of the three (the trainer twice), the env server last: the steps before its kill lose no
        # episode, so they can be compared with the uninterrupted run number for number.
        victims = [*rng.sample(["trainer", "rollout", "trainer"], 3), "env"]
        trainer, starts, kills, resumes = None, 0, [], []
        deadline = time.monotonic() + 1500
        while True:
            if trainer is None or trainer.poll() is not None:
                if trainer is not None and trainer.returncode == 0:
                    break
                starts += 1
                trainer = start_trainer(config, logs / f"trainer-{starts}.log")
            if len(kills) < 4:
                # kill i lands mid-training: after step i+1 is logged, at a random moment of the next step or so
                while len(logged_steps(exp)) < len(kills) + 1 and trainer.poll() is None:
                    time.sleep(0.2)
                time.sleep(rng.uniform(0.0, 4.0))
                if trainer.poll() is not None:
                    continue
                victim = victims[len(kills)]
                before = logged_steps(exp)
                kills.append((victim, len(before)))
                if victim == "trainer":
                    trainer.send_signal(signal.SIGKILL)
                    trainer.wait()
                    resumes.append(before[-1] if before else 0)
                else:
                    service = rollout if victim == "rollout" else env
                    service.kill()
                    service.start()
            else:
                trainer.wait(timeout=max(1.0, deadline - time.monotonic()))
            assert time.monotonic() < deadline, f"no finish in time; kills {kills}"
        steps = logged_steps(exp)
        assert steps == list(range(1, STEPS + 1)), (steps, kills)
        assert len(kills) == 4, kills
        texts = [(logs / f"trainer-{i}.log").read_text() for i in range(1, starts + 1)]
        for last_logged, text in zip(resumes, texts[1:], strict=False):
            resumed = [
                int(x.split("resumed at step ")[1].split(",")[0]) for x in text.splitlines() if "resumed at step" in x
            ]
            start = resumed[0] if resumed else 0
            assert start >= last_logged - 1, f"resumed at {start}, but step {last_logged} had been logged"
        latest = find_latest(exp)
        assert latest.name == f"global_step_{STEPS}" and verify(latest, Dist()) is None
        rows = [json.loads(x) for x in (exp / "metrics.jsonl").read_text().splitlines()]
        complete = all(r["trajectories"] == BATCH * N for r in rows if "reward" in r)

        # the uninterrupted run: fresh services (the rollout service starts from the base model again)
        rollout.stop()
        rollout.start()
        reference = start_trainer(write_config(tmp_path, "calm", env, rollout), logs / "calm.log")
        assert reference.wait(timeout=900) == 0, (logs / "calm.log").read_text()[-3000:]
    finally:
        rollout.stop()
        env.stop()
    print(f"kills (victim, steps logged before): {kills}; every step complete: {complete}")
    calm_rows = [json.loads(x) for x in (tmp_path / "saves/calm/metrics.jsonl").read_text().splitlines()]
    before_env = kills[-1][1]  # steps logged before the env server's kill: trainer and rollout kills only
    keys = ("reward", "loss", "grad_norm", "trajectories", "response_length")
    chaos_steps = {r["step"]: [r.get(k) for k in keys] for r in rows if "reward" in r}
    calm_steps = {r["step"]: [r.get(k) for k in keys] for r in calm_rows if "reward" in r}
    for step in range(1, before_env + 1):
        assert chaos_steps[step] == calm_steps[step], f"step {step} differs from the uninterrupted run; kills {kills}"
    if not complete:  # the env server's kill dropped episodes: the weights differ by design (module docstring)
        return
    chaos, calm = final_weights(exp), final_weights(tmp_path / "saves" / "calm")
    assert chaos.keys() == calm.keys()
    differ = [k for k in chaos if not (chaos[k] == calm[k]).all()]
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}; kills {kills}"
