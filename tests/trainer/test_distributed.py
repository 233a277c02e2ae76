"""Two CPU ranks on gloo: `torchrun --nproc_per_node 2 -m trainer` with the real SmolLM2 (FSDP2), one step, a
checkpoint holding both ranks' shards, then a resumed second step; and the 2-rank update checked against one process.

Run as a script under torchrun, this file is the worker of `test_two_rank_update_equals_one_process`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, free_port
from tests.trainer.test_train_integration import expected_item_ids, load_checkpoint_weights, make_workdir, train_rows

pytestmark = pytest.mark.slow


def launch(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


def torchrun(workdir, *overrides: str) -> subprocess.CompletedProcess:
    """One prompt per rank per step: 8 samples each make a step with no reward spread (no gradient) rare."""
    return launch(["-m", "trainer", str(workdir / "config.yaml"), "rollout.n=8", *overrides])


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


def synthetic_groups(num_groups: int, n: int, vocab: int) -> list:
    """Trajectories with varied prompt/completion lengths, rewards and off-policy behaviour logprobs."""
    from trainer.api import Trajectory

    g = torch.Generator().manual_seed(0)
    out = []
    for gid in range(num_groups):
        prompt = torch.randint(0, vocab, (3 + 2 * gid,), generator=g).tolist()
        for k in range(n):
            length = 2 + (gid + k) % 4
            completion = torch.randint(0, vocab, (length,), generator=g).tolist()
            old = (-torch.rand(length, generator=g) * 6).tolist()
            mask, logprobs = [0] * len(prompt) + [1] * length, [0.0] * len(prompt) + old
            out.append(Trajectory(prompt + completion, mask, logprobs, float((gid + k) % 3), 0, gid))
    return out


def one_update(d, trajectories) -> tuple:
    """Learner.update on a tiny tied-embedding Llama (FSDP2 when `d` is distributed), SGD lr 1 so params move by
    exactly the clipped gradient; returns (full state dict after the step, step metrics)."""
    from tests.trainer.test_checkpoint import tiny_llama
    from trainer import dist
    from trainer.config import Config
    from trainer.learner import Learner
    from trainer.precision import ComputeWeights

    cfg = Config.model_validate({"train": {"micro_batch_size": 2, "grad_clip": 0.5}, "rollout": {"max_new_tokens": 8}})
    model = tiny_llama(seed=0)
    if d.distributed:
        dist.shard(model, d)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    weights = ComputeWeights(model, torch.float32, copy_weights=False)
    stats = Learner.for_config(cfg, weights, opt, sched, d, torch.float32, pad_id=0).update(trajectories)
    return {k: v.detach().clone() for k, v in dist.full_state_dict(model, d).items()}, stats


def update_worker(out: str) -> None:
    """Rank r trains on its whole groups (rank 1 has fewer micro-batches); rank 0 also runs one process on all."""
    from trainer import dist

    torch.set_num_threads(1)
    d = dist.init("cpu")
    groups = synthetic_groups(num_groups=3, n=3, vocab=256)
    mine = groups[:6] if d.rank == 0 else groups[6:]
    sharded, stats = one_update(d, mine)
    if d.is_main:
        reference, ref_stats = one_update(dist.Dist(), groups)
        diff = max((sharded[k] - reference[k]).abs().max().item() for k in reference)
        moved = min((reference[k] - tiny_reference()[k]).abs().max().item() for k in reference)
        result = {"max_diff": diff, "min_move": moved, "stats": stats, "ref_stats": ref_stats}
        with open(out, "w") as f:
            json.dump(result, f)
    # rank 1 waits here while rank 0 computes the reference: tearing its group down before that aborted it once under
    # load ("terminate called without an active exception")
    dist.barrier(d)
    dist.close(d)


def tiny_reference() -> dict:
    from tests.trainer.test_checkpoint import tiny_llama

    return tiny_llama(seed=0).state_dict()


def test_two_rank_update_equals_one_process(tmp_path):
    out = tmp_path / "result.json"
    result = launch([str(Path(__file__).resolve()), str(out)])
    assert result.returncode == 0, result.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["min_move"] > 1e-6, "some parameter did not move: the check would prove nothing"
    assert r["max_diff"] < 1e-6, f"2-rank update differs from one process by {r['max_diff']}"
    for key in ("grad_norm", "loss", "approx_kl", "clip_frac", "entropy"):
        assert r["stats"][key] == pytest.approx(r["ref_stats"][key], rel=1e-5, abs=1e-7), key
    assert r["ref_stats"]["clip_frac"] > 0, "behaviour logprobs should be off-policy enough to clip"


def test_compile_layers_on_a_sharded_model(monkeypatch):
    """What `build` does on CUDA: shard, then compile each decoder layer. FSDP2 renames the sharded classes
    (FSDPLlamaDecoderLayer), which once made the layers unfindable and the documented torchrun command exit at start.
    Here on a 1-rank gloo group with inductor on CPU; the compiled forward and backward must equal eager."""
    import torch.distributed as td

    from tests.trainer.test_checkpoint import tiny_llama
    from trainer import dist
    from trainer.loop import compile_layers

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    td.init_process_group("gloo", rank=0, world_size=1)
    try:
        d = dist.Dist(device=torch.device("cpu"), distributed=True)
        eager, compiled = dist.shard(tiny_llama(seed=0), d), dist.shard(tiny_llama(seed=0), d)
        compile_layers(compiled)
        assert len(dist.decoder_layers(compiled)) == compiled.config.num_hidden_layers
        torch._dynamo.reset()
        ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
        grads = []
        for model in (eager, compiled):
            model(ids, use_cache=False).logits.float().square().mean().backward()
            grads.append({n: p.grad.full_tensor() for n, p in model.named_parameters()})
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        td.destroy_process_group()
    assert frames > 0, "nothing was compiled: the check would prove nothing"
    worst = max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0])
    assert worst < 1e-4, f"compiled gradients differ from eager by {worst}"


if __name__ == "__main__":
    update_worker(sys.argv[1])
