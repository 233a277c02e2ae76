"""bench/w2.py on the CPU (a tiny model, 16 completions): both engine modes produce exactly the drawn lengths through
the contract's per-prompt caps, the compacted one compacts, its timed pieces account for every decode step, and every
figure reaches the JSON. Timings need a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_w2_smoke_on_cpu_honours_every_length(tmp_path):
    out = tmp_path / "w2.json"
    cmd = [sys.executable, "bench/w2.py", "--models", "tiny", "--device", "cpu", "--completions", "16",
           "--steps", "1", "--skip-hf", "--phases", "--workdir", str(tmp_path / "models"), "--json", str(out)]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())
    lengths = res["lengths"]
    assert lengths["count"] == 16 and 8 <= lengths["mean"] <= 1024
    tiny = res["tiny"]
    for key in ("rldock", "rldock_compact"):
        assert tiny[key]["tokens"] == lengths["sum"], key  # each row stopped at its own cap, none ran on
        assert tiny[key]["decode_steps"] == lengths["max"]
        assert f"tiny  {key} " in run.stdout
    assert tiny["rldock"]["compactions"] == 0 and tiny["rldock_compact"]["compactions"] >= 1
    pieces = tiny["rldock_compact"]["phases"]
    decode = {key: p for key, p in pieces.items() if key.startswith("decode")}
    assert set(decode) == {"decode 16 rows", "decode 8 rows"}  # the batch, then its half once 8 rows are left
    # the prefill draws each row's first token, every later one is a decode step of some runner
    assert sum(p["steps"] for p in decode.values()) == lengths["max"] - 1
    assert {"prefill", "adopt", "results"} <= set(pieces) and all(p["s"] > 0 for p in pieces.values())
    assert "decode 8 rows" in run.stdout and "ms/step" in run.stdout
