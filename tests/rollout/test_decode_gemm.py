"""bench/decode_gemm.py on CPU: its shapes are the engine's packed projections (with the epilogue each one gets in
the decode step), and `--help` needs no torch. The timings themselves need a GPU (bench/RESULTS.md)."""

from __future__ import annotations

import subprocess
import sys

from bench.decode_gemm import cases
from tests.conftest import ROOT


def test_shapes_are_the_packed_projections():
    w = {c["proj"]: (c["n"], c["k"], c["bias"], c["glu"], c["residual"], c["per_step"]) for c in cases(["w"])}
    assert w == {"qkv": (1152, 896, True, False, False, 24), "o": (896, 896, False, False, True, 24),
                 "gate_up": (9728, 896, False, True, False, 24), "down": (896, 4864, False, False, True, 24),
                 "lm_head": (49152, 896, False, False, False, 1)}  # fmt: skip
    big = {c["proj"]: (c["n"], c["k"]) for c in cases(["1.5b"])}
    assert big["gate_up"] == (2 * 8960, 1536) and big["down"] == (1536, 8960)


def test_help_imports_no_torch():
    code = (
        "import runpy, sys\nsys.argv = ['decode_gemm.py', '--help']\n"
        "try:\n    runpy.run_path('bench/decode_gemm.py', run_name='__main__')\n"
        "finally:\n    print('TORCH' if 'torch' in sys.modules else 'NO_TORCH', file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--json" in out.stdout and "NO_TORCH" in out.stderr
