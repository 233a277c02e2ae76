"""The supervised warm start (trainer/sft.py) and train.time_limit_s, on the real SmolLM2 (CPU).

Examples are one-line additions asked bare, so prompt + solution stay ~60 tokens and a step takes seconds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import run_trainer_config

EASY = [(2, 3), (4, 4), (7, 1), (6, 3), (5, 2), (3, 3), (8, 1), (1, 6)]
LONGER = {"question": "What is 2 + 3 + 4?", "answer": "2 + 3 = <<2+3=5>>5\n5 + 4 = <<5+4=9>>9\n#### 9"}


def easy_rows() -> list[dict]:
    return [
        {"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"}
        for a, b in EASY
    ]


def easy_items(tokenizer, rows: list[dict] | None = None) -> list[dict]:
    """Training items exactly as the trainer builds them (chat-templated prompt ids)."""
    from trainer.config import DataConfig
    from trainer.data import prepare_items

    return prepare_items(rows or easy_rows(), tokenizer, DataConfig(prompt_template="{question}"), 512)


def test_solution_text_strips_annotations_boxes_the_gold_and_scores_correct():
    from env_servers.gsm8k import load_gsm8k, score, solution_text

    rows = load_gsm8k(Path(__file__).resolve().parents[2] / "data" / "gsm8k" / "train.jsonl")[:200]
    for row in rows:
        text = solution_text(row["answer"])
        assert "<<" not in text and ">>" not in text and "####" not in text
        result = score(text, row["answer"])
        assert result["correct"] and result["strict"], (text, row["answer"])
    assert (
        solution_text("48/2 = <<48/2=24>>24 clips.\n#### 1,000")
        == "48/2 = 24 clips.\nThe final answer is \\boxed{1000}."
    )


def demos(items: list[dict]) -> list[str]:
    """The GSM8K task's warm-start targets for `items`."""
    from env_servers.gsm8k import solution_text

    return [solution_text(item["answer"]) for item in items]


def test_examples_put_loss_on_the_solution_tokens_only(tokenizer):
    from env_servers.gsm8k import solution_text
    from trainer.sft import collate, make_examples

    items = easy_items(tokenizer)
    examples = make_examples(items, demos(items), tokenizer, 512)
    assert len(examples) == len(items)
    for item, ex in zip(items, examples, strict=True):
        assert ex["ids"][: ex["n_prompt"]] == item["prompt_ids"] and ex["ids"][-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ex["ids"][ex["n_prompt"] : -1]) == solution_text(item["answer"])
    batch = collate(examples[:3], tokenizer.pad_token_id, "cpu")
    for row, ex in enumerate(examples[:3]):
        picked = batch["targets"][row][batch["mask"][row].bool()].tolist()
        assert picked == ex["ids"][ex["n_prompt"] :]  # exactly the solution + end of turn, no prompt, no padding
    two = easy_items(tokenizer, [easy_rows()[0], LONGER])
    mixed = make_examples(two, demos(two), tokenizer, 512)
    assert make_examples(two, demos(two), tokenizer, len(mixed[0]["ids"])) == mixed[:1]


@pytest.fixture(scope="module")
def policy(model_path):
    from rollout.loading import load_model

    torch.set_num_threads(2)
    return load_model(model_path, dtype=torch.float32, device="cpu")


def reference_loss(model, examples) -> tuple[float, float]:
    """Token mean of the cross-entropy over solution tokens, and over every position, from the full logits."""
    solution, everything = [], []
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            nll = -logp.gather(-1, ids[0, 1:, None])[:, 0]
            solution += nll[ex["n_prompt"] - 1 :].tolist()
            everything += nll.tolist()
    return sum(solution) / len(solution), sum(everything) / len(everything)


def test_sft_step_loss_is_the_global_token_mean_and_falls(policy, tokenizer):
    from trainer.dist import Dist
    from trainer.precision import ComputeWeights
    from trainer.sft import make_examples, sft_step

    two = easy_items(tokenizer, [easy_rows()[0], LONGER])
    examples = make_examples(two, demos(two), tokenizer, 512)
    assert len({len(e["ids"]) - e["n_prompt"] for e in examples}) == 2  # a token mean differs from a mean of means
    before, unmasked = reference_loss(policy, examples)
    assert abs(before - unmasked) > 0.1  # so a loss on prompt tokens would be caught below
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-5)
    weights = ComputeWeights(policy, torch.float32, copy_weights=False)
    first = sft_step(weights, optimizer, examples, 1, Dist(), torch.float32, 1.0, tokenizer.pad_token_id)
    assert first["loss"] == pytest.approx(before, rel=1e-4)  # micro-batches of 1, normalised by the batch's tokens
    assert first["tokens"] == sum(len(e["ids"]) - e["n_prompt"] for e in examples)
    for _ in range(2):
        sft_step(weights, optimizer, examples, 2, Dist(), torch.float32, 1.0, tokenizer.pad_token_id)
    after, _ = reference_loss(policy, examples)
    assert after < 0.8 * before


def checkpoint_state(exp: Path) -> dict:
    latest = (exp / "latest").read_text().strip()
    return json.loads((exp / latest / "trainer_state.json").read_text())


def rows_of(exp: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "sft/loss" in r], [r for r in rows if "reward" in r]


@pytest.mark.slow
def test_warm_start_once_then_a_time_limit_shared_across_resumes(tmp_path):
    data = tmp_path / "easy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in easy_rows()))
    config = {
        "experiment_name": "sft",
        "data": {"train_path": str(data), "test_path": str(data), "prompt_template": "{question}"},
        "rollout": {"n": 2, "max_new_tokens": 8},
        "sft": {"steps": 2, "batch_size": 2, "micro_batch_size": 2, "lr": 1e-5, "max_tokens": 128},
        "train": {"batch_size": 2, "micro_batch_size": 4, "total_steps": 1, "threads": 2},
        "eval": {"every": 0},
        "checkpoint": {"save_dir": str(tmp_path / "saves"), "every": 0},
        "logging": {"wandb": False, "progress": False},
    }
    # First process: the warm start and one GRPO step, however long this machine takes for them.
    first = run_trainer_config(config, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    exp = tmp_path / "saves" / "sft"
    state1 = checkpoint_state(exp)
    sft_rows, train1 = rows_of(exp)
    assert [r["sft/step"] for r in sft_rows] == [1, 2] and all(r["step"] == 0 for r in sft_rows)
    assert state1["sft_done"] and state1["elapsed_s"] > 0 and state1["step"] == len(train1) == 1
    assert "SFT warm start" in first.stdout

    # Second process: a limit 40 s past what the first one spent (room for its own start-up and a step or more);
    # it must count the first one's time too.
    config["train"]["total_steps"] = 100
    limit = state1["elapsed_s"] + 40
    config["train"]["time_limit_s"] = limit
    t0 = time.monotonic()
    second = run_trainer_config(config, tmp_path)
    wall = time.monotonic() - t0
    assert second.returncode == 0, second.stderr[-3000:]
    state2 = checkpoint_state(exp)
    sft_rows2, train2 = rows_of(exp)
    assert sft_rows2 == sft_rows and "SFT warm start" not in second.stdout  # not redone
    assert state1["step"] < state2["step"] < 100 and state2["step"] == len(train2)
    assert state2["elapsed_s"] >= limit and f"time_limit_s={limit:g} reached" in second.stdout
    assert all(r["time/train_s"] < limit for r in train2[:-1])  # it stopped after the step that crossed the limit
    assert wall < limit  # counted from the first process's time: alone, this one would have run `limit` seconds
