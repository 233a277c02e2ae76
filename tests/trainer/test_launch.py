"""trainer/launch.py, the train container's command: which launcher the layout variables choose, and the one-line
errors for a malformed layout. The launched runs themselves are tested in tests/trainer/test_distributed.py (torchrun on
one node) and in the docker tier (two containers as two nodes)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT
from trainer.launch import command


def test_one_rank_on_one_node_is_a_plain_process():
    assert command(["c.yaml", "train.lr=1"], {}) == [sys.executable, "-m", "trainer", "c.yaml", "train.lr=1"]


def test_several_ranks_on_one_node_are_standalone_torchrun():
    argv = command(["c.yaml"], {"NPROC": "4"})
    assert argv[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "4"]
    assert "--standalone" in argv and "--rdzv_endpoint" not in argv
    assert argv[-3:] == ["-m", "trainer", "c.yaml"]


@pytest.mark.parametrize(("node_rank", "is_host"), [("0", "true"), ("1", "false")])
def test_several_nodes_rendezvous_at_node_zero(node_rank, is_host):
    env = {"NNODES": "2", "NODE_RANK": node_rank, "MASTER_ADDR": "train", "MASTER_PORT": "29511", "RDZV_ID": "job7"}
    argv = command(["c.yaml"], env)
    pairs = dict(zip(argv, argv[1:], strict=False))
    assert pairs["--nnodes"] == "2" and pairs["--node_rank"] == node_rank and pairs["--rdzv_backend"] == "c10d"
    assert pairs["--rdzv_endpoint"] == "train:29511" and pairs["--rdzv_id"] == "job7"
    assert pairs["--rdzv_conf"] == f"is_host={is_host}" and "--standalone" not in argv


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NPROC": "two"}, "NPROC='two' must be a whole number"),
        ({"NNODES": "0"}, "NPROC and NNODES must be at least 1"),
        ({"NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK=2 must be below NNODES=2"),
    ],
)
def test_a_malformed_layout_is_one_line_and_exit_2(env, message):
    out = subprocess.run(
        [sys.executable, "-m", "trainer.launch", "configs/gsm8k_tiny.yaml"],
        cwd=ROOT, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **env}, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and out.stderr.strip() == f"error: {message}", out.stderr


def test_help_and_no_config():
    helped = subprocess.run(
        [sys.executable, "-m", "trainer.launch", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert helped.returncode == 0 and "MASTER_ADDR" in helped.stdout
    bare = subprocess.run([sys.executable, "-m", "trainer.launch"], cwd=ROOT, capture_output=True, text=True)
    assert bare.returncode == 2 and bare.stderr.count("\n") == 1 and "no config" in bare.stderr
