"""The GPU-only benches (sm_share, attn_tile, ablate_step, linear_tile, split_batch, timeline, phases, ncu_layer,
ab_kernels, gluon_proj, attn_chain, x_multicast) on the CPU: `--help` describes them, a bad sweep argument is one
usage line, and without a GPU they stop with one line and a non-zero exit instead of a traceback. Their figures need
a GPU (bench/RESULTS.md)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

BENCHES = {
    "sm_share": "--splits",
    "attn_tile": "--tiles",
    "ablate_step": "--drop",
    "linear_tile": "--variants",
    "split_batch": "--parts",
    "timeline": "--steps",
    "phases": "--profile",
    "ncu_layer": "--summary",
    "ab_kernels": "--ref",
    "gluon_proj": "--layers",
    "attn_chain": "--slots",
    "x_multicast": "--ctas",
}
# a malformed value of each sweep option, for the benches that check theirs before importing torch
BAD = {
    "ablate_step": "lm_head,nope",
    "linear_tile": "gate_up=16:128",
    "split_batch": "3",
    "ab_kernels": "no/such.py",
    "attn_chain": "64,x",
    "x_multicast": "6",
}


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"bench/{script}.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def bench_module(name: str):
    """bench/<name>.py loaded from its file under a private module name."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / f"bench/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", BENCHES)
def test_help_names_the_sweep_option(script):
    out = run(script, "--help")
    assert out.returncode == 0 and BENCHES[script] in out.stdout and "--json" in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit; this machine has a GPU")
@pytest.mark.parametrize("script", BENCHES)
def test_without_a_gpu_one_line_and_non_zero_exit(script):
    out = run(script)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [f"{script}: needs a CUDA GPU"]


@pytest.mark.parametrize("script", BAD)
def test_bad_sweep_value_is_a_usage_error(script):
    out = run(script, BENCHES[script], BAD[script])
    assert out.returncode == 2 and BENCHES[script] in out.stderr.strip().splitlines()[-1]


def test_ncu_summary_reads_a_raw_csv(tmp_path):
    """ncu_layer --summary: one line per kernel from ncu's raw CSV (header, units, rows), stalls largest first; a
    file without the table is one line and a non-zero exit."""
    stall = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
    head = ["ID", "Kernel Name", "gpu__time_duration.sum", "launch__grid_size", stall.format("wait"),
            stall.format("long_scoreboard")]  # fmt: skip
    rows = [head, ["", "", "ns", "", "", ""], ["0", "_linear_kernel", "11,200", "304", "0.88", "2.42"]]
    table = tmp_path / "ncu.csv"
    table.write_text("==PROF== Connected\n" + "\n".join(",".join(f'"{c}"' for c in r) for r in rows) + "\n")
    out = run("ncu_layer", "--summary", str(table), "--json", str(tmp_path / "k.json"))
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "k.json").read_text())[0]["gpu__time_duration.sum"] == "11,200"
    line = out.stdout.strip()
    assert line.startswith("_linear_kernel") and "11,200 ns" in line and "grid  304" in line
    assert line.index("long_scoreboard 2.42") < line.index("wait 0.88")
    (tmp_path / "empty.csv").write_text("no table\n")
    out = run("ncu_layer", "--summary", str(tmp_path / "empty.csv"))
    assert out.returncode != 0 and out.stderr.strip().splitlines() == [
        f"ncu_layer: {tmp_path / 'empty.csv'} holds no ncu --csv --page raw table"
    ]


def test_grpo_step_table_states_the_trl_ratio_against_both_steps():
    """The report is made from the JSON alone (so a run's figures can be re-read on any machine) and names which
    rldock step each TRL ratio divides."""
    grpo_step = bench_module("grpo_step")

    step = {"update_s": 0.1, "rollout_s": 0.2, "sync_s": 0.0, "peak_gib": 1.0}
    res = {
        "params": 1e6, "gpu": "a GPU", "torch": "x",
        "rldock_step": {**step, "time_s": 0.3},
        "rldock_async_step": {**step, "time_s": 0.25, "staleness_max": 1},
        "trl_step": {"time_s": 7.5, "version": "1"},
    }  # fmt: skip
    lines = grpo_step.table(res).splitlines()
    assert lines[0].startswith("GPU: a GPU  torch x")
    assert lines[-1] == "ratio TRL / rldock step time: x25.0 synchronous, x30.0 async"
    del res["rldock_async_step"]
    assert grpo_step.table(res).splitlines()[-1] == "ratio TRL / rldock step time: x25.0 synchronous"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (a CUDA toolkit) is not installed")
def test_x_multicast_program_builds_and_its_rows_parse(tmp_path):
    """bench/x_multicast.cu compiles for sm_90a and answers --help without a GPU; the wrapper's rows carry each
    copy's excess over the empty launch, and the multicast's over its cluster barriers alone."""
    xm = bench_module("x_multicast")
    exe = xm.build(tmp_path)
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("usage: x_multicast")
    rows = xm.parse("ctas cluster mode us_per_launch\n36 1 empty 1.0\n36 1 whole 1.75\n36 2 empty 0.5\n"
                    "36 2 multicast 2.5\n36 2 syncs_only 1.25\n")  # fmt: skip
    assert [r["over_empty_us"] for r in rows] == [0.0, 0.75, 0.0, 2.0, 0.75]
    assert rows[3]["over_syncs_us"] == 1.25 and "over_syncs_us" not in rows[1]
