"""Training on an agent env's OWN items (babyai, searchqa, sciworld): the item source asks the env for its size, the
data cursor walks those rows, and `python -m trainer` trains and evaluates on them end to end (real SmolLM2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port, start_server, stop_server


def _babyai_cfg(*overrides: str):
    from trainer.config import load_config

    return load_config(None, ["env.name=babyai", "eval.num_samples=3", *overrides])


def _load_items(cfg, tokenizer):
    from trainer.tasks import AgentTask, make_task

    task = make_task(cfg, tokenizer)
    assert isinstance(task, AgentTask) and task.reports_reward
    return task.items()


def test_babyai_items_are_the_env_rows(tokenizer):
    pytest.importorskip("minigrid")
    from env_servers.registry import make_factory

    env = make_factory("babyai")()
    size = len(env)
    env.close()
    items, eval_items = _load_items(_babyai_cfg(), tokenizer)
    assert len(items) == size and items[0] == {"index": 0} and items[-1] == {"index": size - 1}
    assert eval_items == items[:3]
    items, _ = _load_items(_babyai_cfg("data.max_train_samples=5"), tokenizer)
    assert items == [{"index": i} for i in range(5)]


def test_items_from_a_server_that_learns_its_size_from_its_first_env(tokenizer, tmp_path):
    """A fresh server reports no size until it has built an env: the item source makes (and closes) one."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(
        ["-m", "env_servers", "--env", "searchqa", "--port", str(port)], f"{url}/health", tmp_path / "log"
    )
    try:
        assert httpx.get(f"{url}/health").json().get("size") is None
        items, eval_items = _load_items(_babyai_cfg("env.name=searchqa", f"env.url={url}"), tokenizer)
        health = httpx.get(f"{url}/health").json()
    finally:
        stop_server(proc)
    assert len(items) == health["size"] == 28 and eval_items == [{"index": i} for i in range(3)]
    assert health["live"] == 0  # the probing slot was closed


def _train(preset: str, overrides: list[str], exp: Path, tmp_path: Path) -> tuple[Path, list[dict]]:
    """Run `python -m trainer preset overrides` to the end; (its experiment folder, its metrics rows)."""
    cmd = [sys.executable, "-m", "trainer", preset, *overrides]
    env = {**os.environ, "WANDB_DIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return exp, [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_trainer_trains_on_searchqa_questions(tmp_path, tokenizer):
    """One real GRPO step on the in-process searchqa env (env.max_rounds=2 from the preset): the items trained are the
    data cursor's searchqa rows, not GSM8K's."""
    from trainer.data import DataCursor

    saves = tmp_path / "saves"
    overrides = [
        "experiment_name=sq",
        "train.batch_size=2",
        "rollout.n=2",
        "rollout.max_new_tokens=16",
        "train.total_steps=1",
        "train.seed=0",
        "eval.num_samples=2",
        "eval.max_new_tokens=16",
        "eval.every=1",
        "eval.at_start=false",
        f"checkpoint.save_dir={saves}",
        "logging.wandb=false",
    ]
    exp, rows = _train("configs/searchqa_tiny.yaml", overrides, saves / "sq", tmp_path)
    trained = [r["item_ids"] for r in rows if "item_ids" in r]
    cursor = DataCursor([{"index": i} for i in range(28)], seed=0)
    assert trained == [[item["index"] for item in cursor.next_batch(2)]]
    evals = [r for r in rows if "eval/reward" in r]
    assert len(evals) == 1 and 0.0 <= evals[0]["eval/accuracy"] <= 1.0
    state = json.loads((exp / "global_step_1" / "trainer_state.json").read_text())
    assert state["data"]["num_items"] == 28 and (exp / "latest").read_text().strip() == "global_step_1"


@pytest.mark.slow
def test_trainer_trains_on_textcraft_goals(tmp_path):
    """Two real GRPO steps from configs/textcraft_tiny.yaml: the items are the TextCraft goals, episodes run several
    rounds, and a checkpoint is written."""
    saves = tmp_path / "saves"
    overrides = ["experiment_name=tc", "train.total_steps=2", "rollout.n=2", "eval.num_samples=2", "eval.every=2",
                 "eval.at_start=false", "checkpoint.every=2", f"checkpoint.save_dir={saves}", "logging.wandb=false"]  # fmt: skip
    exp, rows = _train("configs/textcraft_tiny.yaml", overrides, saves / "tc", tmp_path)
    trained = [r["item_ids"] for r in rows if "item_ids" in r]
    assert len(trained) == 2 and all(0 <= i < 17 for ids in trained for i in ids)
    assert any("eval/reward" in r for r in rows)
    state = json.loads((exp / "global_step_2" / "trainer_state.json").read_text())
    assert state["data"]["num_items"] == 17
