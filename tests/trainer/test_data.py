"""GSM8K loading, chat-template prompts and the resumable, rank-sharded data cursor (real files, real tokenizer)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT
from trainer.config import ConfigError, DataConfig, load_config
from trainer.data import (
    DataCursor,
    _is_local,
    build_prompt,
    gold_answer,
    load_eval_items,
    load_split,
    load_train_items,
    num_steps,
    prepare_items,
)

ROWS = [
    {"question": f"Tom has {i} apples and buys {i + 1} more. How many now?", "answer": f"{i}+{i + 1}\n#### {2 * i + 1}"}
    for i in range(10)
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_gold_answer_strips_thousands_separators_and_is_idempotent():
    assert gold_answer({"answer": "so 1,000 + 80 = 1,080\n#### 1,080"}) == "1080"
    assert gold_answer({"answer": "#### -3"}) == "-3"
    assert gold_answer({"answer": "1080"}) == "1080"


def test_shipped_splits_load_through_datasets_and_every_gold_is_a_number():
    test = load_split(str(ROOT / "data/gsm8k/test.jsonl"), "test")
    assert len(test) == 1319 and set(test.column_names) == {"question", "answer"}
    for row in test:
        float(gold_answer(row))


def test_missing_file_names_the_path_and_the_key(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ConfigError) as err:
        load_split(str(missing), "train")
    msg = str(err.value)
    assert str(missing) in msg and "data.train_path=" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="data.test_path="):
        load_split(str(missing), "test")


def test_hub_ids_are_told_apart_from_paths(tmp_path):
    assert not _is_local("openai/gsm8k")
    assert _is_local("data/gsm8k/train.jsonl") and _is_local("./gsm8k") and _is_local("train.jsonl")


def test_prompts_use_the_chat_template(tokenizer):
    data = DataConfig()
    text = build_prompt(tokenizer, "What is 2+3?", data)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert "What is 2+3?\nPlease reason step by step" in text and "\\boxed{}" in text
    custom = build_prompt(tokenizer, "Q?", DataConfig(system_prompt="Be terse.", prompt_template="Solve: {question}"))
    assert custom.startswith("<|im_start|>system\nBe terse.<|im_end|>") and "Solve: Q?<|im_end|>" in custom


def test_prepare_items_ids_match_text_and_long_prompts_are_dropped(tokenizer, tmp_path):
    rows = ROWS[:3] + [{"question": "very long " * 200, "answer": "#### 1"}] + ROWS[3:]
    items = prepare_items(rows, tokenizer, DataConfig(), max_prompt_tokens=120)
    assert len(items) == 10 and all(it["index"] != 3 for it in items)
    first = items[0]
    assert first["prompt_ids"] == tokenizer(first["prompt"], add_special_tokens=False)["input_ids"]
    assert first["prompt_ids"][0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert first["gold"] == "1" and first["question"] == ROWS[0]["question"]
    limited = prepare_items(rows, tokenizer, DataConfig(), max_prompt_tokens=120, limit=5)
    assert [it["index"] for it in limited] == [0, 1, 2, 4, 5]


def test_train_and_eval_items_follow_the_config(tokenizer, tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", ROWS)
    test = _write_jsonl(tmp_path / "test.jsonl", ROWS[::-1])
    cfg = load_config(
        None, [f"data.train_path={train}", f"data.test_path={test}", "data.max_train_samples=4", "eval.num_samples=3"]
    )
    assert [it["gold"] for it in load_train_items(cfg, tokenizer)] == ["1", "3", "5", "7"]
    assert [it["gold"] for it in load_eval_items(cfg, tokenizer)] == ["19", "17", "15"]


def test_num_steps():
    assert num_steps(200, 8, 1) == 25 and num_steps(500, 16, 2) == 63 and num_steps(3, 8, 1) == 1


def test_cursor_epochs_are_seeded_permutations():
    items = list(range(7))
    cur = DataCursor(items, seed=3)
    epoch0, epoch1 = cur.next_batch(7), cur.next_batch(7)
    assert sorted(epoch0) == items and sorted(epoch1) == items and epoch0 != epoch1
    assert DataCursor(items, seed=3).next_batch(7) == epoch0
    assert DataCursor(items, seed=4).next_batch(7) != epoch0
    assert DataCursor(items, shuffle=False).next_batch(10) == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]


def test_cursor_resume_continues_with_the_same_order():
    items = list(range(11))
    a = DataCursor(items, seed=9)
    for _ in range(3):
        a.next_batch(4)  # crosses the epoch boundary at 11
    state = json.loads(json.dumps(a.state_dict()))  # as it travels in trainer_state.json
    assert state["epoch"] == 1 and state["position"] == 1
    b = DataCursor(items, seed=0)
    b.load_state_dict(state)
    assert [b.next_batch(4) for _ in range(5)] == [a.next_batch(4) for _ in range(5)]


def test_cursor_rejects_a_state_from_other_data():
    state = DataCursor(list(range(5))).state_dict()
    with pytest.raises(ValueError, match="5 items"):
        DataCursor(list(range(6))).load_state_dict(state)
    with pytest.raises(ValueError, match="no data items"):
        DataCursor([])


@pytest.mark.parametrize("world,k", [(2, 6), (3, 7)])
def test_rank_slices_partition_each_global_batch(world, k):
    items = list(range(13))
    whole = DataCursor(items, seed=1)
    ranks = [DataCursor(items, seed=1, rank=r, world_size=world) for r in range(world)]
    for _ in range(4):
        slices = [cur.next_batch(k) for cur in ranks]
        assert sum(slices, []) == whole.next_batch(k)
        assert max(map(len, slices)) - min(map(len, slices)) <= 1
