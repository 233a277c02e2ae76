"""scripts/model_merger.py on checkpoints written by trainer/checkpoint.py: 1 rank in-process and 2 ranks on gloo
(torchrun runs this file as a script), with the real SmolLM2; error paths on a tiny Llama so they stay quick."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SEED = 1234
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def perturb(model) -> None:
    """Move every weight off the base model, so a merge that read the base folder instead would be caught."""
    import torch

    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


def write_checkpoint(model_path: str, exp_dir: Path, step: int, shard_model: bool):
    """Save a perturbed SmolLM2 through the trainer's own checkpoint code (from this rank); (path, the weights)."""
    import torch

    from rollout.loading import load_model, load_tokenizer
    from trainer import checkpoint, dist

    d = dist.init("cpu")
    model = load_model(model_path)
    perturb(model)
    weights = None if shard_model else {k: v.clone() for k, v in model.state_dict().items()}
    if shard_model:
        dist.shard(model, d)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    state = {"step": step, "weight_version": step}
    path = checkpoint.save(
        exp_dir, model=model, optimizer=optimizer, scheduler=scheduler, tokenizer=load_tokenizer(model_path),
        trainer_state=state, d=d, keep_last=2,
    )  # fmt: skip
    dist.close(d)
    return path, weights


def run_merger(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scripts.model_merger", *args],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300,
    )  # fmt: skip


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "merging" not in ln]
    assert len(lines) == 1 and lines[0].startswith("model_merger: error: "), proc.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="session")
def one_rank(model_path, scratch_dir):
    """(step folder, the fp32 weights it holds)."""
    return write_checkpoint(model_path, scratch_dir("exp1"), 3, shard_model=False)


@pytest.fixture(scope="session")
def one_rank_step(one_rank) -> Path:
    return one_rank[0]


@pytest.fixture(scope="session")
def perturbed(one_rank) -> dict:
    return one_rank[1]


@pytest.fixture(scope="session")
def two_rank_step(model_path, scratch_dir) -> Path:
    exp = scratch_dir("exp2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__, model_path, str(exp)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return exp / "global_step_5"


def read_merged(save_dir: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(save_dir.glob("model*.safetensors")):
        tensors.update(load_file(f))
    return tensors


@pytest.mark.slow
def test_one_rank_checkpoint_merges_and_verifies(one_rank_step, perturbed, model_path, capsys):
    import torch

    from scripts.model_merger import main

    assert main(["--local_dir", str(one_rank_step), "--verify", "--max_shard_size", "100MB"]) == 0
    assert "verify ok" in capsys.readouterr().out
    out = one_rank_step / "actor" / "huggingface"
    assert not out.with_name("huggingface.tmp").exists()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert (out / "chat_template.jinja").read_text() == (Path(model_path) / "chat_template.jinja").read_text()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) == 3 and sorted(set(index["weight_map"].values())) == shards
    merged = read_merged(out)
    assert "lm_head.weight" not in merged  # tied to the embeddings: stored once
    assert set(merged) == set(perturbed) - {"lm_head.weight"}
    for name, want in perturbed.items():
        if name in merged:
            assert merged[name].dtype == torch.bfloat16
            assert torch.equal(merged[name], want.to(torch.bfloat16)), name


@pytest.mark.slow
def test_two_rank_checkpoint_merges_and_verifies(two_rank_step, perturbed, tmp_path, capsys):
    import torch

    from scripts.model_merger import main

    meta = json.loads((two_rank_step / "actor" / "meta.json").read_text())
    assert meta["world_size"] == 2
    assert len(list((two_rank_step / "actor" / "model").glob("*.distcp"))) == 2
    out = tmp_path / "merged"
    args = ["--local_dir", str(two_rank_step / "actor"), "--save_dir", str(out), "--dtype", "float32", "--verify"]
    assert main(args) == 0
    assert "verify ok" in capsys.readouterr().out
    merged = read_merged(out)
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    assert set(merged) == set(perturbed) - {"lm_head.weight"}
    for name, tensor in merged.items():
        assert torch.equal(tensor, perturbed[name]), name  # every rank's chunks reassembled exactly


def copy_step(step: Path, dst: Path) -> Path:
    """A writable copy of a checkpoint's model-side files (optimizer state is not needed to merge)."""
    shutil.copytree(step / "actor", dst / "actor", ignore=shutil.ignore_patterns("optim", "huggingface*"))
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "scramble"])
def test_damaged_shard_is_one_clear_line(one_rank_step, tmp_path, damage, capsys):
    step = copy_step(one_rank_step, tmp_path / "global_step_3")
    shard = next((step / "actor" / "model").glob("*.distcp"))
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        if damage == "truncate":
            f.truncate(size // 2)
        else:  # the file keeps its length; the first tensor's archive header is garbage
            f.write(b"\xff" * 4096)
    if damage == "truncate":  # the CLI as users run it: one line, no traceback
        line = one_error_line(run_merger("--local_dir", str(step)))
    else:
        from scripts.model_merger import main

        assert main(["--local_dir", str(step)]) == 1
        line = capsys.readouterr().err.strip()
    assert ("truncated" if damage == "truncate" else "corrupt") in line and shard.name in line
    assert not (step / "actor" / "huggingface").exists()
    assert not (step / "actor" / "huggingface.tmp").exists()


# ---- quick paths on a tiny Llama written straight with torch.distributed.checkpoint ----


@pytest.fixture
def tiny_step(tmp_path, model_path) -> Path:
    import torch
    import torch.distributed.checkpoint as dcp
    from transformers import LlamaConfig, LlamaForCausalLM

    actor = tmp_path / "exp" / "global_step_1" / "actor"
    config = LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.config.save_pretrained(actor)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(Path(model_path) / f, actor / f)
    dcp.save(model.state_dict(), checkpoint_id=actor / "model", no_dist=True)
    (actor.parent.parent / "latest").write_text("global_step_1\n")
    return actor.parent


def test_experiment_dir_follows_latest_and_verifies_tiny(tiny_step, capsys):
    from scripts.model_merger import main

    assert main(["--local-dir", str(tiny_step.parent), "--dtype", "float16", "--verify"]) == 0  # either spelling
    out = tiny_step / "actor" / "huggingface"
    mask = os.umask(0)
    os.umask(mask)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~mask}, "merged files private"
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert (out / "generation_config.json").is_file()  # derived from config.json when the actor had none
    assert "verify ok" in capsys.readouterr().out


def test_verify_catches_a_changed_weight(tiny_step):
    import torch
    from safetensors.torch import load_file, save_file

    from scripts.model_merger import MergeError, main, verify

    assert main(["--local_dir", str(tiny_step), "--dtype", "float32"]) == 0
    out = tiny_step / "actor" / "huggingface"
    weights = load_file(out / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"] += 0.05
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergeError, match="verify failed"):
        verify(tiny_step / "actor", out, "float32")
    del weights["model.norm.weight"]  # a missing tensor: transformers would initialise it, verify must notice
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergeError, match="verify failed"):
        verify(tiny_step / "actor", out, "float32")
    assert torch.is_tensor(weights["model.embed_tokens.weight"])


def test_refuses_non_empty_save_dir_unless_overwrite(tiny_step, tmp_path, capsys):
    from scripts.model_merger import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["--local_dir", str(tiny_step), "--save_dir", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine" and not (out / "config.json").exists()
    assert main(["--local_dir", str(tiny_step), "--save_dir", str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_bad_inputs_are_one_line(tiny_step, tmp_path, capsys):
    from scripts.model_merger import main

    cases = {
        str(tmp_path / "nowhere"): "no such directory",
        str(tmp_path): "no model/ checkpoint folder",
    }
    empty = tmp_path / "empty" / "actor"
    (empty / "model").mkdir(parents=True)
    cases[str(empty)] = "no .metadata"
    for local_dir, expected in cases.items():
        assert main(["--local_dir", local_dir]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    config = json.loads((tiny_step / "actor" / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tiny_step / "actor" / "config.json").write_text(json.dumps(config))
    assert main(["--local_dir", str(tiny_step)]) == 1
    assert "missing" in capsys.readouterr().err


def test_upload_without_token_keeps_files(tiny_step, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    env["HF_HOME"] = str(tmp_path / "hf_home")  # no cached login either
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.model_merger", "--local_dir", str(tiny_step), "--save_dir", str(out),
         "--hf_upload_path", "someone/tiny"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert "HF_TOKEN" in one_error_line(proc)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


def test_upload_to_unreachable_hub_keeps_files(tiny_step, tmp_path, monkeypatch, capsys):
    from scripts.model_merger import main
    from tests.conftest import free_port

    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    out = tmp_path / "out"
    assert main(["--local_dir", str(tiny_step), "--save_dir", str(out), "--hf_upload_path", "someone/tiny"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert err.startswith("model_merger: error: upload to someone/tiny failed") and str(out) in err
    assert (out / "model.safetensors").is_file()


def test_help_is_fast_and_imports_no_torch():
    code = "import sys; from scripts.model_merger import parse_args; assert 'torch' not in sys.modules; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True).stdout == "ok\n"
    assert "--hf_upload_path" in run_merger("--help").stdout


if __name__ == "__main__":  # torchrun --nproc_per_node 2 tests/scripts/test_model_merger.py MODEL_PATH EXP_DIR
    import torch

    torch.set_num_threads(1)
    write_checkpoint(sys.argv[1], Path(sys.argv[2]), 5, shard_model=True)


def test_make_merge_runs_locally_with_the_docker_targets_variables(tiny_step, tmp_path):
    root = Path(__file__).resolve().parents[2]
    save = tmp_path / "merged"
    run = subprocess.run(
        ["make", "-s", "-C", str(root), "merge", f"LOCAL_DIR={tiny_step.parent}", f"SAVE_DIR={save}",
         "MERGE_ARGS=--verify --dtype float32"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "verify ok" in run.stdout and (save / "config.json").is_file()
    missing = subprocess.run(["make", "-s", "-C", str(root), "merge"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "set LOCAL_DIR" in missing.stdout
