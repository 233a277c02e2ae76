"""Checkpoint layout, exact restore, atomic publishing, pruning — one process, no process group.

A tiny randomly initialised Llama (tied embeddings, like SmolLM2) keeps these fast; the real model goes through the
same code in tests/trainer/test_train_integration.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from trainer import checkpoint
from trainer.dist import Dist


def tiny_llama(seed: int = 0):
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    cfg = tiny_llama_config(vocab_size=256, max_position_embeddings=64)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def trained_parts(seed: int = 0, steps: int = 2):
    """Model, AdamW and a warm-up scheduler after `steps` real optimizer steps on a language-model loss."""
    model = tiny_llama(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))
    for _ in range(steps):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def save_at(exp_dir, step, tokenizer, keep_last=3, parts=None):
    model, opt, sched = parts or trained_parts()
    state = {"step": step, "weight_version": step, "data": {"epoch": 0, "position": 2 * step}}
    return checkpoint.save(
        exp_dir,
        model=model,
        optimizer=opt,
        scheduler=sched,
        tokenizer=tokenizer,
        trainer_state=state,
        d=Dist(),
        keep_last=keep_last,
    )


def test_save_writes_the_documented_layout(tmp_path, tokenizer):
    path = save_at(tmp_path, 3, tokenizer)
    assert path == tmp_path / "global_step_3"
    assert (tmp_path / "latest").read_text().strip() == "global_step_3"
    actor = path / "actor"
    for name in (
        "model/.metadata",
        "model/__0_0.distcp",
        "optim/.metadata",
        "optim/__0_0.distcp",
        "scheduler.pt",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "meta.json",
    ):
        assert (actor / name).is_file(), name
    assert json.loads((actor / "meta.json").read_text()) == {
        "world_size": 1,
        "dtype": "float32",
        "format": "dcp",
        "step": 3,
    }
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["data"]["position"] == 6
    assert (path / "rng_rank_0.pt").is_file()
    assert not list(tmp_path.glob("*.tmp"))


def test_load_restores_model_optimizer_scheduler_and_rng(tmp_path, tokenizer):
    model, opt, sched = trained_parts(seed=0)
    save_at(tmp_path, 2, tokenizer, parts=(model, opt, sched))
    expected_draw = torch.rand(4)  # what the RNG gives right after the save

    fresh, fresh_opt, fresh_sched = trained_parts(seed=1, steps=1)  # different weights, moments and schedule
    torch.manual_seed(1234)
    state = checkpoint.load(
        tmp_path / "global_step_2", model=fresh, optimizer=fresh_opt, scheduler=fresh_sched, d=Dist()
    )

    assert state["step"] == 2
    assert torch.equal(torch.rand(4), expected_draw)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight  # still tied after loading
    saved, loaded = opt.state_dict(), fresh_opt.state_dict()
    for i, moments in saved["state"].items():
        assert torch.equal(moments["exp_avg_sq"], loaded["state"][i]["exp_avg_sq"])
        assert moments["step"] == loaded["state"][i]["step"]
    assert fresh_sched.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"] == 2
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


def test_half_written_checkpoint_is_ignored_and_cleaned(tmp_path, tokenizer):
    save_at(tmp_path, 1, tokenizer)
    crashed = tmp_path / "global_step_2.tmp" / "actor" / "model"
    crashed.mkdir(parents=True)
    (crashed / "__0_0.distcp").write_bytes(b"partial")
    incomplete = tmp_path / "global_step_3" / "actor"  # no trainer_state.json, no DCP metadata
    incomplete.mkdir(parents=True)
    (tmp_path / "latest").write_text("global_step_3\n")  # a stale pointer to it

    assert checkpoint.find_latest(tmp_path) == tmp_path / "global_step_1"
    removed = checkpoint.clean_partial(tmp_path)
    assert removed == [tmp_path / "global_step_2.tmp"]
    assert not (tmp_path / "global_step_2.tmp").exists()


def test_keep_last_prunes_the_oldest_writes(tmp_path, tokenizer):
    parts = trained_parts()
    for step in (1, 2, 3):
        save_at(tmp_path, step, tokenizer, keep_last=2, parts=parts)
    assert sorted(p.name for p in tmp_path.glob("global_step_*")) == ["global_step_2", "global_step_3"]
    # a fresh run (checkpoint.resume=false) writes a lower step: it is the newest write, so it is kept
    save_at(tmp_path, 1, tokenizer, keep_last=1, parts=parts)
    assert [p.name for p in tmp_path.glob("global_step_*")] == ["global_step_1"]
    assert checkpoint.find_latest(tmp_path) == tmp_path / "global_step_1"


def test_no_checkpoint_means_none(tmp_path):
    assert checkpoint.find_latest(tmp_path) is None
    with pytest.raises(ValueError, match="global_step_N"):
        checkpoint.step_of(tmp_path / "weights")


# ---------------------------------------------------------------- integrity: manifest, fallback, full disk


def resume(exp_dir, warnings: list[str], parts=None):
    model, opt, sched = parts or trained_parts(seed=5, steps=1)
    return checkpoint.load_newest_intact(
        exp_dir, model=model, optimizer=opt, scheduler=sched, d=Dist(), warn=warnings.append
    )


def test_the_manifest_lists_every_file_with_size_and_sha256(tmp_path, tokenizer):
    import hashlib

    from trainer import manifest

    path = save_at(tmp_path, 1, tokenizer)
    files = manifest.read(path)
    on_disk = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert sorted(files) == [n for n in on_disk if n != "manifest.json"]
    some = path / "actor/model/__0_0.distcp"
    entry = files["actor/model/__0_0.distcp"]
    assert entry["size"] == some.stat().st_size and entry["sha256"] == hashlib.sha256(some.read_bytes()).hexdigest()


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, tokenizer, damage):
    parts = trained_parts()
    save_at(tmp_path, 1, tokenizer, parts=parts)
    save_at(tmp_path, 2, tokenizer, parts=parts)
    bad = tmp_path / "global_step_2/actor/optim/__0_0.distcp"
    data = bad.read_bytes()
    if damage == "truncate":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        bad.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:
        bad.unlink()
    warnings: list[str] = []
    state = resume(tmp_path, warnings)
    assert state["step"] == 1
    assert len(warnings) == 1 and "global_step_2" in warnings[0] and str(bad) in warnings[0], warnings
    assert (tmp_path / "global_step_2.damaged").is_dir() and not (tmp_path / "global_step_2").exists()
    assert checkpoint.find_latest(tmp_path) == tmp_path / "global_step_1"


def test_no_intact_checkpoint_is_one_error_and_nothing_is_deleted(tmp_path, tokenizer):
    save_at(tmp_path, 1, tokenizer)
    (tmp_path / "global_step_1/trainer_state.json").write_text("{}")
    warnings: list[str] = []
    with pytest.raises(checkpoint.CheckpointError, match="no intact checkpoint") as err:
        resume(tmp_path, warnings)
    assert "\n" not in str(err.value) and len(warnings) == 1
    assert (tmp_path / "global_step_1.damaged/actor/model/__0_0.distcp").is_file()
    assert resume(tmp_path / "empty", []) is None


def test_a_checkpoint_from_before_manifests_still_loads(tmp_path, tokenizer):
    save_at(tmp_path, 1, tokenizer)
    (tmp_path / "global_step_1/manifest.json").unlink()
    assert resume(tmp_path, [])["step"] == 1


def test_the_merger_refuses_a_damaged_checkpoint_in_one_line(tmp_path, tokenizer):
    import subprocess
    import sys

    from tests.conftest import ROOT

    save_at(tmp_path, 1, tokenizer)
    bad = tmp_path / "global_step_1/actor/model/__0_0.distcp"
    bad.write_bytes(bad.read_bytes()[:-10])
    out = subprocess.run(
        [sys.executable, "-m", "scripts.model_merger", "--local_dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert "damaged" in out.stderr and str(bad) in out.stderr
    assert not (tmp_path / "global_step_1/actor/huggingface").exists()


def test_a_full_disk_is_one_line_and_loses_nothing(tmp_path, tokenizer):
    """On a 6 MiB tmpfs: the first checkpoint fits, the second cannot; the first stays intact and resumable."""
    import os
    import shutil
    import subprocess

    disk = tmp_path / "small"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("this host refuses to mount a tmpfs")
    try:
        parts = trained_parts()
        save_at(disk, 1, tokenizer, parts=parts)
        first = (disk / "global_step_1").rglob("*")
        used = sum(p.stat().st_size for p in first if p.is_file() and p.name != "manifest.json")
        free = shutil.disk_usage(disk).free
        (disk / "ballast").write_bytes(b"\0" * max(0, free - used // 2))
        with pytest.raises(checkpoint.CheckpointError) as err:
            save_at(disk, 2, tokenizer, parts=parts)
        line = str(err.value)
        assert "\n" not in line and str(disk / "global_step_2") in line and "disk full" in line, line
        assert f"about {used:,} needed" in line and "global_step_1 is intact" in line, line
        assert not list(disk.glob("*.tmp")) and not (disk / "global_step_2").exists()
        assert checkpoint.verify(disk / "global_step_1", Dist()) is None
        assert resume(disk, [])["step"] == 1
    finally:
        subprocess.run(["umount", str(disk)])
