"""Every shipped preset loads; overrides, unknown keys, bad values, docstrings and the saved round trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import ConfigError, config_fields, load_config, save_config, valid_keys

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_the_five_gsm8k_presets_ship():
    names = {p.stem for p in CONFIGS}
    assert {f"gsm8k_{n}" for n in ("tiny", "fast", "1hour", "3hour", "full")} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_preset_loads_is_commented_and_round_trips(path, tmp_path):
    text = path.read_text()
    assert text.startswith("# "), f"{path.name}: say at the top what the preset is for and how long it takes"
    assert "wall time" in text.split("\n\n")[0].split("experiment_name")[0].lower()
    cfg = load_config(path)
    assert cfg.experiment_name == path.stem
    assert (ROOT / cfg.data.train_path).is_file() and (ROOT / cfg.data.test_path).is_file()
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    "name,samples,epochs", [("fast", 200, 1), ("1hour", 500, 2), ("3hour", 1000, 3), ("full", None, 5)]
)
def test_gpu_presets_follow_the_areal_docker_sizes(name, samples, epochs):
    cfg = load_config(ROOT / f"configs/gsm8k_{name}.yaml")
    assert (cfg.data.max_train_samples, cfg.data.epochs) == (samples, epochs)
    assert cfg.train.total_steps is None and 1e-6 <= cfg.train.lr <= 2e-6 and cfg.rollout.max_new_tokens >= 256


def test_tiny_preset_is_small_and_pays_for_the_format():
    cfg = load_config(ROOT / "configs/gsm8k_tiny.yaml")
    work = cfg.train.total_steps * cfg.train.batch_size * cfg.rollout.n * cfg.rollout.max_new_tokens
    assert work <= 16_384, "tiny must stay a few CPU minutes"
    assert cfg.env.format_reward > 0 and "\\boxed{" in cfg.data.prompt_template.format(question="q")
    assert 0 < cfg.eval.every <= cfg.train.total_steps and cfg.eval.num_samples <= 16


def test_overrides_take_precedence_over_the_preset():
    cfg = load_config(
        ROOT / "configs/gsm8k_fast.yaml",
        ["train.lr=1e-6", "experiment_name=x", "rollout.urls=[http://a:8000,http://b:8000]", "data.system_prompt="],
    )
    assert cfg.train.lr == 1e-6 and cfg.experiment_name == "x" and cfg.exp_dir == Path("saves/x")
    assert cfg.rollout.urls == ["http://a:8000", "http://b:8000"] and cfg.data.system_prompt is None
    assert cfg.data.max_train_samples == 200  # untouched preset values stay


@pytest.mark.parametrize("override", ["train.lrr=1", "trainer.lr=1", "lr=1", "trian.lr=1"])
def test_unknown_override_keys_suggest_the_near_miss_and_list_its_section(override):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert repr(override.split("=")[0]) in msg and "did you mean 'train.lr'?" in msg and "\n" not in msg
    assert "keys of train: lr, " in msg and "temperature" not in msg, "only the train section's keys"


def test_a_key_like_nothing_lists_the_top_level_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["zzz.qqq=1"])
    msg = str(err.value)
    assert "did you mean" not in msg and "top-level keys: checkpoint, data," in msg and len(msg) < 300


def test_unknown_keys_in_a_yaml_file_are_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 1.0e-6\n  learning_rate: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rate'; .*keys of train: lr"):
        load_config(bad)


@pytest.mark.parametrize(
    "override,where",
    [
        ("train.lr=-1", "train.lr"),
        ("rollout.n=abc", "rollout.n"),
        ("grpo.loss_agg=mean", "grpo.loss_agg"),
        ("rollout.top_p=1.5", "rollout.top_p"),
        ("train.device=tpu", "train.device"),
    ],
)
def test_bad_values_are_one_line_naming_the_key(override, where):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert msg.startswith(where + ":") and "\n" not in msg and override.split("=")[1] in msg


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(ROOT / "configs/nope.yaml")


def test_every_field_has_a_docstring_and_is_a_valid_key():
    fields = list(config_fields())
    undocumented = [key for key, info, _ in fields if not (info.description or "").strip()]
    assert not undocumented, f"fields without a docstring: {undocumented}"
    assert sorted({key for key, _, _ in fields}) == sorted(valid_keys())
    assert {kind for _, _, kind in fields} == {None, "inprocess", "disk", "nccl"}  # the union's variants are walked
    assert len(fields) > 40


def test_trainer_outside_the_venv_says_how_to_get_one():
    """An interpreter without the dependencies (here: no site-packages at all) gets one line, not a traceback."""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-S", "-m", "trainer", "configs/gsm8k_tiny.yaml"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1 and "is not installed for" in out.stderr and "make train" in out.stderr
