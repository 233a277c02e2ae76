"""`python -m trainer` end to end on the real SmolLM2 (CPU, tiny settings): train, checkpoint, resume, start fresh.

The data are one-line additions ("What is 2 + 3?") asked bare, so the 135M model answers some samples right and some
wrong within 16 tokens: groups have reward spread and the update has a real gradient (GSM8K itself would give all
zeros at this length, and a zero-advantage step changes nothing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

EASY = [(2, 3), (4, 4), (7, 1), (6, 3), (5, 2), (3, 3), (8, 1), (1, 6)]
BATCH = 2


def make_workdir(root: Path, **train: object) -> Path:
    """Write the easy data and a tiny config (train.* keys overridable) into `root`."""
    with open(root / "easy.jsonl", "w") as f:
        for a, b in EASY:
            f.write(
                json.dumps({"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}) + "\n"
            )
    data = str(root / "easy.jsonl")
    config = {
        "experiment_name": "it",
        "data": {"train_path": data, "test_path": data, "prompt_template": "{question}"},
        "rollout": {"n": 4, "temperature": 1.0, "max_new_tokens": 16},
        "train": {"batch_size": BATCH, "micro_batch_size": 4, "lr": 1e-5, "threads": 2, "seed": 0, **train},
        "eval": {"every": 2, "num_samples": 4, "max_new_tokens": 8, "at_start": False},
        "checkpoint": {"save_dir": str(root / "saves"), "every": 2, "keep_last": 1},
        "logging": {"wandb": False},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


@pytest.fixture(scope="module")
def workdir(scratch_dir) -> Path:
    return make_workdir(scratch_dir("train"))


def run_trainer(workdir: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "trainer", str(workdir / "config.yaml"), *overrides]
    env = {**os.environ, "WANDB_DIR": str(workdir), "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


def train_rows(exp: Path) -> list[dict]:
    rows = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward" in r]


def load_checkpoint_weights(ckpt: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp

    state = {k: torch.empty_like(v) for k, v in like.items()}
    dcp.load(state, checkpoint_id=ckpt / "actor" / "model")
    return state


def expected_item_ids(workdir: Path, tokenizer, steps: int) -> list[list[int]]:
    """What an unbroken run's data cursor serves in its first `steps` steps."""
    from trainer.config import load_config
    from trainer.data import DataCursor, load_train_items

    cfg = load_config(workdir / "config.yaml")
    cursor = DataCursor(load_train_items(cfg, tokenizer), cfg.train.seed, cfg.data.shuffle)
    return [[item["index"] for item in cursor.next_batch(BATCH)] for _ in range(steps)]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_train_resume_and_fresh_start(workdir, model_path, tokenizer):
    exp = workdir / "saves" / "it"
    first = run_trainer(workdir, "train.total_steps=2", "logging.wandb=true")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "fresh start" in first.stdout
    assert "first -> last:" in first.stdout and "eval/accuracy" in first.stdout.split("first -> last:")[1]

    rows = train_rows(exp)
    assert [r["step"] for r in rows] == [1, 2]
    assert any(r["groups_with_signal"] > 0 for r in rows), "no reward spread: the update had no gradient"
    assert abs(rows[0]["ratio_mean"] - 1) < 1e-3, "trainer and engine disagree on the behaviour logprobs"
    evals = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines() if "eval/accuracy" in line]
    assert [e["step"] for e in evals] == [2]
    for name in ("config.yaml", "curves.png", "latest", "global_step_2/trainer_state.json"):
        assert (exp / name).is_file(), name
    assert (exp / "latest").read_text().strip() == "global_step_2"
    assert list(workdir.glob("wandb/offline-run-*")), "wandb offline run missing"

    from safetensors.torch import load_file

    initial = load_file(Path(model_path) / "model.safetensors")
    initial.setdefault("lm_head.weight", initial["model.embed_tokens.weight"])
    trained = load_checkpoint_weights(exp / "global_step_2", initial)
    unchanged = [k for k in initial if torch.equal(initial[k], trained[k])]
    assert not unchanged, f"{len(unchanged)} parameters never changed, e.g. {unchanged[:3]}"
    assert torch.equal(trained["lm_head.weight"], trained["model.embed_tokens.weight"]), "tied embeddings came apart"

    second = run_trainer(workdir, "train.total_steps=3")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed at step 2" in second.stdout
    rows = train_rows(exp)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["item_ids"] for r in rows] == expected_item_ids(workdir, tokenizer, 3)
    assert rows[-1]["weight_version"] == 3
    state = json.loads((exp / "global_step_3" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["weight_version"] == 3
    assert (exp / "latest").read_text().strip() == "global_step_3"
    assert not (exp / "global_step_2").exists(), "keep_last=1 should have pruned global_step_2"
    again = run_trainer(workdir, "train.total_steps=3")
    assert again.returncode == 0 and "already finished its 3 steps" in again.stdout
    assert "train.total_steps=6 resumes from step 3" in again.stdout and len(train_rows(exp)) == 3

    # fresh start, this time with the KL term (the frozen reference model is loaded only when beta > 0)
    fresh = run_trainer(workdir, "train.total_steps=1", "checkpoint.resume=false", "eval.every=0", "grpo.beta=0.05")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "fresh start" in fresh.stdout
    rows = train_rows(exp)
    assert [r["step"] for r in rows] == [1]
    assert 0 <= rows[0]["kl_ref"] < 1e-4, "policy and reference are the same weights at the first step"
    assert (exp / "latest").read_text().strip() == "global_step_1"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lrr=1"], "unknown key 'train.lrr'"),
        (["train.lr=-1"], "train.lr"),
        (["model.path=/no/such/model"], "model.path"),
        (["train.cpu_offload=true"], "train.cpu_offload needs CUDA and torchrun"),
    ],
)
def test_bad_config_exits_with_one_line(workdir, overrides, message):
    result = run_trainer(workdir, *overrides)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr[-2000:]


def test_missing_config_file_and_help():
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "configs/nope.yaml"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "not found" in result.stderr
    helped = subprocess.run([sys.executable, "-m", "trainer", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert helped.returncode == 0 and "key=value" in helped.stdout


def test_workflow_builds_trajectories_from_engine_output(model_path, tokenizer):
    from rollout.api import SamplingParams
    from rollout.engine import EmbeddedEngine
    from trainer.workflow import SingleTurnWorkflow

    torch.set_num_threads(2)
    engine = EmbeddedEngine(model_path, max_batch_size=8)
    prompt = tokenizer("What is 2 + 3?", add_special_tokens=False)["input_ids"]
    items = [
        {"prompt_ids": prompt, "answer": "#### 5", "index": 7},
        {"prompt_ids": prompt[:3], "answer": "#### 1", "index": 9},
    ]
    flow = SingleTurnWorkflow(tokenizer, SamplingParams(n=2, max_new_tokens=6, seed=3))
    out = flow.run(engine, items, [10, 11])
    assert [t.group_id for t in out] == [10, 10, 11, 11]
    assert [t.info["index"] for t in out] == [7, 7, 9, 9]
    for t, item in zip(out, [items[0]] * 2 + [items[1]] * 2, strict=True):
        p = len(item["prompt_ids"])
        assert t.token_ids[:p] == item["prompt_ids"]
        assert t.loss_mask == [0] * p + [1] * (len(t.token_ids) - p) and 1 <= t.num_model_tokens <= 6
        assert all(lp == 0.0 for lp in t.logprobs[:p]) and all(lp <= 0.0 for lp in t.logprobs[p:])
        assert t.reward in (0.0, 1.0) and t.reward == float(t.info["correct"])
        assert t.weight_version == engine.weight_version
    flow.reseed(3)
    again = flow.run(engine, items, [10, 11])
    assert [t.token_ids for t in again] == [t.token_ids for t in out], "same seed, same samples"


def test_a_rollout_service_down_past_the_budget_is_one_line_after_a_checkpoint(workdir):
    """Nothing listens at the service URL: the trainer waits train.recovery_s with one line per attempt, saves, and
    stops with exit 3 and one line naming the service."""
    from tests.conftest import free_port

    url = f"http://127.0.0.1:{free_port()}"
    result = run_trainer(
        workdir, "experiment_name=down", "rollout.backend=http", f"rollout.urls=[{url}]", "weight_sync=disk",
        "train.recovery_s=2", "train.total_steps=2", "eval.every=0",
    )  # fmt: skip
    assert result.returncode == 3, result.stderr[-3000:]
    attempts = [x for x in result.stderr.splitlines() if "attempt" in x and url in x]
    assert len(attempts) >= 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: rollout service {url}/generate unreachable") and "global_step_0 is saved" in last
    assert (workdir / "saves/down/global_step_0/manifest.json").is_file()


def test_a_damaged_newest_checkpoint_is_skipped_by_the_trainer(workdir):
    """Truncate a file of the newest checkpoint: the next start warns once, resumes from the one before."""
    first = run_trainer(workdir, "experiment_name=damaged", "train.total_steps=2", "checkpoint.every=1",
                        "checkpoint.keep_last=2", "eval.every=0")  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    bad = workdir / "saves/damaged/global_step_2/actor/model/__0_0.distcp"
    bad.write_bytes(bad.read_bytes()[:1000])
    again = run_trainer(workdir, "experiment_name=damaged", "train.total_steps=2", "checkpoint.every=1", "eval.every=0")
    assert again.returncode == 0, again.stderr[-3000:]
    warnings = [x for x in again.stdout.splitlines() if "warning: checkpoint global_step_2 is damaged" in x]
    assert len(warnings) == 1 and str(bad) in warnings[0], again.stdout[-3000:]
    assert "resumed at step 1" in again.stdout
    assert (workdir / "saves/damaged/global_step_2.damaged").is_dir()
    assert (workdir / "saves/damaged/latest").read_text().strip() == "global_step_2"


def test_settle_gc_moves_live_objects_out_of_full_collections():
    """After the first step the trainer freezes what is alive (model, optimizer, compiled code, graphs), so the full
    collections the rollouts trigger do not rescan it each time."""
    import gc

    from trainer.loop import settle_gc

    gc.unfreeze()
    live = [[i] for i in range(1000)]  # container objects: the only kind the collector tracks
    settle_gc()
    try:
        assert gc.get_freeze_count() >= len(live)
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0


def test_decode_texts_equals_batch_decode(tokenizer):
    """The workflow's batched Rust decode gives batch_decode's texts (special tokens dropped, byte-level pieces
    joined), and a tokenizer that cleans up spaces takes batch_decode itself."""
    import copy
    import random

    from trainer.workflow import decode_texts

    rng = random.Random(0)
    special = tokenizer.all_special_ids
    ids = [[rng.choice(special) if rng.random() < 0.05 else rng.randrange(len(tokenizer)) for _ in range(n)]
           for n in (0, 1, 37, 256)]  # fmt: skip
    ids.append(tokenizer("Ünïcödé 3 + 4 = 7, so  the answer is \\boxed{7}.")["input_ids"])
    assert decode_texts(tokenizer, ids) == tokenizer.batch_decode(ids, skip_special_tokens=True)
    cleaning = copy.deepcopy(tokenizer)
    cleaning.clean_up_tokenization_spaces = True
    assert decode_texts(cleaning, ids) == cleaning.batch_decode(ids, skip_special_tokens=True)
