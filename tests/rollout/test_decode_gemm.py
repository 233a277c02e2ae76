"""bench/decode_gemm.py on CPU: its torch split-K candidate (one bmm over strided K-slice views of the weight) is
F.linear, its shapes are the engine's packed projections, and `--help` needs no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bench.decode_gemm import Choice, candidates, cases, linear, splitk_matmul
from tests.conftest import ROOT


@pytest.mark.parametrize(
    ("m", "n", "k", "split", "bias"),
    [(64, 96, 128, 4, False), (5, 40, 96, 2, True), (64, 896, 896, 7, False), (17, 33, 4864 // 8, 8, True)],
)
def test_splitk_matmul_equals_linear(m, n, k, split, bias):
    g = torch.Generator().manual_seed(m * n + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    got = splitk_matmul(x, w, split, b)
    assert got.shape == (m, n) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_cpu_candidates_equal_linear():
    """Every cuBLAS / split-K candidate the bench times for W's down projection computes the same product."""
    _, rows, _, n, k, _, _ = next(c for c in cases() if c[:3] == ("W", 64, "down"))
    assert (n, k) == (896, 4864)
    x, w = torch.randn(8, k), torch.randn(n, k) / k**0.5
    want = F.linear(x, w)
    tried = [c for c in candidates(rows, k) if c.kind != "triton"]
    assert tried[0] == Choice() and {c.split for c in tried[1:]} == {2, 4, 8, 16}
    for c in tried:
        torch.testing.assert_close(linear(x, w, None, c), want, rtol=1e-4, atol=1e-4)


def test_shapes_are_the_packed_projections():
    w = {proj: (n, k, bias, per_step) for model, _, proj, n, k, bias, per_step in cases() if model == "W"}
    assert w == {"qkv": (1152, 896, True, 24), "o": (896, 896, False, 24), "gate_up": (9728, 896, False, 24),
                 "down": (896, 4864, False, 24), "lm_head": (49152, 896, False, 1)}  # fmt: skip


def test_help_imports_no_torch():
    code = (
        "import runpy, sys\nsys.argv = ['decode_gemm.py', '--help']\n"
        "try:\n    runpy.run_path('bench/decode_gemm.py', run_name='__main__')\n"
        "finally:\n    print('TORCH' if 'torch' in sys.modules else 'NO_TORCH', file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--json" in out.stdout and "NO_TORCH" in out.stderr
