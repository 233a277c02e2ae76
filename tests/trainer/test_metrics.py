"""metrics.jsonl, resume trimming, curves.png and offline wandb, on the real file system."""

from __future__ import annotations

import json
import math
import os

import matplotlib.image
import pytest
import torch

from trainer.metrics import MetricsLogger, bar_postfix, curves_figure, progress_bar, read_metrics, summary_table


def _fill(logger, steps):
    for step in steps:
        logger.log(step, {"reward": step / 10, "accuracy": step / 20, "format": 0.5})
        if step % 2 == 0:
            logger.log(step, {"eval/accuracy": step / 8})


def test_lines_are_valid_json_with_numbers_from_tensors_and_nan(tmp_path):
    with MetricsLogger(tmp_path, {}, use_wandb=False) as logger:
        logger.log(1, {"reward": torch.tensor(0.25), "loss": float("nan"), "n": 3})
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    row = json.loads(line)
    assert row["step"] == 1 and row["reward"] == 0.25 and row["loss"] is None and row["n"] == 3
    assert math.isclose(row["time"], __import__("time").time(), abs_tol=60)


def test_other_ranks_write_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "exp", {}, use_wandb=True, rank=1)
    logger.log(1, {"reward": 1.0})
    assert logger.plot() is None and not (tmp_path / "exp").exists()


def test_resume_drops_lines_after_the_checkpoint_and_appends(tmp_path):
    _fill(MetricsLogger(tmp_path, {}, use_wandb=False), range(1, 7))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "rew')  # the crashed run died mid-line
    resumed = MetricsLogger(tmp_path, {}, use_wandb=False, resume_step=4)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 2, 3, 4, 4]
    assert resumed.latest["eval/accuracy"] == 0.5 and resumed.latest["step"] == 4
    resumed.log(5, {"reward": 9.0})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 2, 3, 4, 4, 5] and rows[-1]["reward"] == 9.0
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_a_fresh_start_replaces_old_metrics(tmp_path):
    _fill(MetricsLogger(tmp_path, {}, use_wandb=False), range(1, 4))
    MetricsLogger(tmp_path, {}, use_wandb=False, resume_step=None).log(1, {"reward": 0.0})
    assert [r["reward"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0.0]


def test_plot_writes_a_valid_png_atomically(tmp_path):
    logger = MetricsLogger(tmp_path, {}, use_wandb=False)
    _fill(logger, range(1, 9))
    out = logger.plot()
    assert out == tmp_path / "curves.png" and not (tmp_path / "curves.png.tmp").exists()
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[1] > image.shape[0] > 200
    assert image.std() > 0.05  # something was drawn
    logger.log(9, {"reward": 1.0})
    before = out.stat().st_mtime_ns
    logger.plot()  # rewritten in place
    assert out.stat().st_mtime_ns >= before and out.read_bytes()[:4] == b"\x89PNG"


def test_plot_without_eval_points(tmp_path):
    logger = MetricsLogger(tmp_path, {}, use_wandb=False)
    logger.log(1, {"reward": 0.1})
    assert matplotlib.image.imread(logger.plot()).ndim == 3


def test_wandb_offline_by_default_in_the_experiment_dir_with_the_key_file(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "wandb").mkdir()
    (tmp_path / "wandb" / ".wandb_api_key").write_text("0123456789abcdef0123456789abcdef01234567\n")
    exp = tmp_path / "saves" / "exp"
    with MetricsLogger(exp, {"train": {"lr": 1e-6}}, use_wandb=True) as logger:
        assert logger.wandb_run is not None
        logger.log(1, {"reward": 0.5, "item_ids": [3, 1, 2], "note": "x"})
        logger.log(2, {"reward": 0.75})
        assert logger.wandb_run is not None  # the list and the string did not disable wandb
    assert os.environ["WANDB_API_KEY"] == "0123456789abcdef0123456789abcdef01234567"
    run_id = (exp / "wandb_id").read_text()
    runs = list((exp / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(run_id)
    assert read_metrics(exp / "metrics.jsonl")[0]["reward"] == 0.5


def test_a_wandb_failure_is_a_warning_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "not-a-mode")
    (tmp_path / "wandb_id").write_text("keepme")
    with pytest.warns(UserWarning, match="wandb disabled"):
        logger = MetricsLogger(tmp_path, {}, use_wandb=True, resume_step=0)
    assert logger.wandb_run is None and (tmp_path / "wandb_id").read_text() == "keepme"
    logger.log(1, {"reward": 1.0})
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["reward"] == 1.0


def test_curves_name_lines_by_their_keys_on_one_scale_with_zero_visible():
    import matplotlib.pyplot as plt

    rows = [
        {"step": 1, "reward": 1.4, "accuracy": 0.0, "format": 0.8},
        {"step": 2, "reward": 0.2, "accuracy": 0.0, "format": 0.4, "eval/accuracy": 0.0, "eval/format": 0.5},
    ]
    fig = curves_figure(rows)
    left, right = fig.axes[:2]
    assert [t.get_text() for t in left.get_legend().get_texts()] == ["reward", "accuracy", "format"]
    assert [t.get_text() for t in right.get_legend().get_texts()] == ["eval/accuracy", "eval/format"]
    assert left.get_ylim() == right.get_ylim() and left.get_ylim()[0] < 0 and left.get_ylim()[1] >= 1.4
    plt.close(fig)


def test_summary_table_gives_first_and_last_of_each_headline_metric():
    rows = [{"step": 0, "eval/accuracy": 0.125}, {"step": 1, "reward": 0.25}, {"step": 8, "eval/accuracy": 0.5}]
    table = summary_table(rows).splitlines()
    assert table[0].split() == ["eval/accuracy", "0.125", "at", "step", "0", "->", "0.500", "at", "step", "8"]
    assert table[1].split()[0] == "reward" and len(table) == 2


def test_bar_helpers():
    assert bar_postfix({"step": 3, "reward": 0.5, "accuracy": 0.25}) == {"reward": "0.500", "accuracy": "0.250"}
    assert bar_postfix({"step": 4, "eval/accuracy": 0.125})["eval/accuracy"] == "0.125"
    bar = progress_bar(10, initial=4, rank=1)
    assert bar.disable and bar.n == 4
    bar.close()
