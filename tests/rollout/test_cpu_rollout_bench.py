"""bench/cpu_rollout.py on the CPU with the real SmolLM2 (one small round): this tree against a second checkout
given by --tree (here the same tree again, as a peer), every completion's tokens counted, the ratio printed and the
figures in the JSON; a model that is not there is one line and a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def run(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "bench/cpu_rollout.py", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_times_this_tree_and_a_peer(tmp_path, model_path):
    out = tmp_path / "cpu.json"
    args = ("--model", model_path, "--prompts", "2", "--n", "2", "--new", "3", "--steps", "1", "--rounds", "1")
    got = run(*args, "--tree", str(tmp_path / "peer"), "--json", str(out))
    assert got.returncode == 1 and got.stderr.count("\n") == 1 and "peer" in got.stderr  # not a checkout
    (tmp_path / "peer").symlink_to(ROOT)
    got = run(*args, "--tree", str(tmp_path / "peer"), "--json", str(out))
    assert got.returncode == 0, got.stderr[-2000:]
    res = json.loads(out.read_text())
    assert list(res) == [str(ROOT), str(tmp_path / "peer")]
    assert all(r["tokens"] == 2 * 2 * 3 and r["median_s"] > 0 for r in res.values())
    assert "x1.00 vs this tree" in got.stdout


def test_missing_model_is_one_line():
    got = run("--model", "/no/such/model")
    assert got.returncode == 1 and "not found" in got.stderr and got.stderr.count("\n") == 1
