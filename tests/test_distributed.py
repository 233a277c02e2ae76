"""Two CPU ranks on gloo: `torchrun --nproc_per_node 2 -m trainer` with the real SmolLM2 (FSDP2), one step, a
checkpoint holding both ranks' shards, then a resumed second step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, free_port
from tests.test_train_integration import expected_item_ids, load_checkpoint_weights, make_workdir, train_rows

pytestmark = pytest.mark.slow


def torchrun(workdir, *overrides: str) -> subprocess.CompletedProcess:
    """One prompt per rank per step: 8 samples each make a step with no reward spread (no gradient) rare."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "trainer", str(workdir / "config.yaml"), "rollout.n=8", *overrides,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_two_ranks_train_checkpoint_and_resume(tmp_path, model_path, tokenizer):
    workdir = make_workdir(tmp_path, threads=1)
    exp = workdir / "saves" / "it"
    first = torchrun(workdir, "train.total_steps=1", "eval.every=0")
    assert first.returncode == 0, first.stderr[-4000:]
    assert "fresh start, 1 steps, 2 rank(s)" in first.stdout

    ckpt = exp / "global_step_1"
    for part in ("model", "optim"):
        assert sorted(p.name for p in (ckpt / "actor" / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert json.loads((ckpt / "actor" / "meta.json").read_text())["world_size"] == 2
    assert (ckpt / "rng_rank_0.pt").is_file() and (ckpt / "rng_rank_1.pt").is_file()

    from safetensors.torch import load_file

    initial = load_file(f"{model_path}/model.safetensors")
    initial.setdefault("lm_head.weight", initial["model.embed_tokens.weight"])
    trained = load_checkpoint_weights(ckpt, initial)  # this process has no process group: DCP reshards 2 → 1
    assert torch.equal(trained["lm_head.weight"], trained["model.embed_tokens.weight"]), "tied embeddings came apart"
    rows = train_rows(exp)
    assert rows[0]["groups_with_signal"] > 0, "no reward spread: the update had no gradient"
    unchanged = [k for k in initial if torch.equal(initial[k], trained[k])]
    assert not unchanged, f"{len(unchanged)} parameters never changed, e.g. {unchanged[:3]}"

    second = torchrun(workdir, "train.total_steps=2", "eval.every=2", "eval.num_samples=2")
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resumed at step 1" in second.stdout
    rows = train_rows(exp)
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["item_ids"] for r in rows] == expected_item_ids(workdir, tokenizer, 2)
    assert all(r["trajectories"] == 2 * 8 for r in rows)  # both ranks' groups counted
    assert (exp / "latest").read_text().strip() == "global_step_2"
    shards = sorted(p.name for p in (exp / "global_step_2" / "actor" / "model").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
