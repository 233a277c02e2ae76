"""Checkpoint layout, exact restore, atomic publishing, pruning — one process, no process group.

A tiny randomly initialised Llama (tied embeddings, like SmolLM2) keeps these fast; the real model goes through the
same code in tests/test_train_integration.py.
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
