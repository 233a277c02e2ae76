"""Decode-step projections at few rows: torch split-K and the Triton split-K kernel against F.linear, the per-shape
plan, weight refreshes, and (GPU) the engine's tokens and logprobs with each path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rollout import model as M
from rollout.api import SamplingParams
from rollout.engine import EmbeddedEngine
from tests.test_engine import GPU_PROMPTS, gpu_model, tiny_hf

QWEN05 = M.ModelConfig.from_hf(
    dict(model_type="qwen2", vocab_size=49152, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
         num_attention_heads=14, num_key_value_heads=2)
)  # fmt: skip


@pytest.mark.parametrize(
    ("m", "n", "k", "split", "bias"),
    [(64, 96, 128, 4, False), (5, 40, 96, 2, True), (64, 896, 896, 7, False), (17, 33, 4864 // 8, 8, True)],
)
def test_splitk_matmul_equals_linear(m, n, k, split, bias):
    g = torch.Generator().manual_seed(m * n + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    got = M.splitk_matmul(x, w, split, b)
    assert got.shape == (m, n) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_splitk_reads_weights_refreshed_in_place():
    """The split-K slices are views of the packed buffers: loading new weights by name is seen with no repacking."""
    hf_a, hf_b = tiny_hf("qwen2", seed=1), tiny_hf("qwen2", seed=2)
    model = M.CausalLM.empty(M.ModelConfig.from_hf(hf_a.config.to_dict()), "cpu", torch.float32)
    M.load_state(model, hf_a.state_dict())
    model.pack_()
    mlp, ref_mlp = model.model.layers[1].mlp, hf_b.model.layers[1].mlp
    x = torch.randn(8, model.cfg.hidden_size)
    before = M.splitk_matmul(x, mlp.gate_up_weight, 4)
    M.load_state(model, hf_b.state_dict())  # as EmbeddedEngine.update_weights does
    want = torch.cat([ref_mlp.gate_proj(x), ref_mlp.up_proj(x)], dim=-1).detach()
    got = M.decode_linear(x, mlp.gate_up_weight, mlp.gate_up_bias, M.GemmChoice("splitk", 4))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, want)
    attn, ref_attn = model.model.layers[0].self_attn, hf_b.model.layers[0].self_attn
    want_qkv = torch.cat([ref_attn.q_proj(x), ref_attn.k_proj(x), ref_attn.v_proj(x)], dim=-1).detach()
    got_qkv = M.decode_linear(x, attn.qkv_weight, attn.qkv_bias, M.GemmChoice("splitk", 2))
    torch.testing.assert_close(got_qkv, want_qkv, rtol=1e-5, atol=1e-5)


def test_plan_modes(monkeypatch):
    shapes = M.decode_shapes(QWEN05)
    assert shapes == {"qkv": (1152, 896), "o": (896, 896), "gate_up": (9728, 896), "down": (896, 4864),
                      "lm_head": (49152, 896)}  # fmt: skip
    assert set(map(str, M.plan_decode_gemm(QWEN05, 64, "cublas", 132).values())) == {"cublas"}
    split = M.plan_decode_gemm(QWEN05, 64, "splitk", 132)
    for name in ("o", "down"):  # the small-N projections get more CTAs, in slices that divide K
        assert split[name].kind == "splitk" and split[name].split > 1 and shapes[name][1] % split[name].split == 0
    triton = M.plan_decode_gemm(QWEN05, 64, "triton", 132)
    assert triton["down"].kind == "triton" and triton["down"].split > 1
    big = M.plan_decode_gemm(QWEN05, M.SKINNY_MAX_ROWS + 8, "triton", 132)
    assert {c.kind for c in big.values()} == {"cublas"}
    entry = M.GemmChoice("triton", 8, 64, 16, 128)
    monkeypatch.setitem(M.DECODE_GEMM_TABLE, (64, 896, 4864), entry)
    tuned = M.plan_decode_gemm(QWEN05, 64, "tuned", 132)
    assert tuned["down"] == entry and tuned["o"].kind == "cublas"
    assert M.plan_decode_gemm(QWEN05, 64, "triton", 132)["down"] == entry
    assert M.plan_decode_gemm(QWEN05, 64, "splitk", 132)["down"].kind == "splitk"  # entry of another kind: ignored
    with pytest.raises(ValueError, match="decode_gemm mode"):
        M.plan_decode_gemm(QWEN05, 64, "fast", 132)


def test_engine_option_on_cpu():
    hf = tiny_hf("llama")
    assert EmbeddedEngine.from_module(hf, decode_gemm="triton").decode_gemm == "cublas"  # CPU: plain F.linear
    with pytest.raises(ValueError, match="decode_gemm must be one of"):
        EmbeddedEngine.from_module(hf, decode_gemm="fastest")


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("m", "n", "k"), [(64, 896, 896), (64, 1152, 896), (64, 896, 4864), (40, 960, 576)])
def test_gpu_kernels_equal_linear(m, n, k, dtype):
    g = torch.Generator(device="cuda").manual_seed(n + k)
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, device="cuda", generator=g).to(dtype)
    want = F.linear(x.double(), w.double(), b.double())
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-4)
    for split, bn, bk in ((1, 32, 64), (4, 32, 128), (8, 16, 64), (3, 64, 128)):
        torch.testing.assert_close(M.decode_linear(x, w, b, M.GemmChoice("triton", split, 64, bn, bk)).double(),
                                   want, **tol)  # fmt: skip
    for split in (2, 4, 8):
        if k % split == 0:
            torch.testing.assert_close(M.splitk_matmul(x, w, split, b).double(), want, **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["splitk", "triton"])
def test_gpu_engine_same_tokens_as_cublas(mode):
    model = gpu_model()
    ref = EmbeddedEngine.from_module(model, decode_gemm="cublas")
    new = EmbeddedEngine.from_module(model, decode_gemm=mode)
    plan = new.gemm_plan(8)
    assert new.decode_gemm == mode and {c.kind for c in plan.values()} & {mode}
    for params in (SamplingParams(n=2, temperature=0, max_new_tokens=32),
                   SamplingParams(n=2, max_new_tokens=32, seed=3)):  # fmt: skip
        a, b = ref.generate(GPU_PROMPTS, params), new.generate(GPU_PROMPTS, params)
        assert [c.token_ids for c in a] == [c.token_ids for c in b]
        diffs = torch.cat([torch.tensor(ca.logprobs) - torch.tensor(cb.logprobs) for ca, cb in zip(a, b, strict=True)])
        assert diffs.abs().max() < 0.1 and diffs.abs().mean() < 0.01  # bf16 sums in another order


@pytest.mark.gpu
def test_gpu_update_weights_reaches_skinny_path():
    a, b = gpu_model(), gpu_model()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    engine = EmbeddedEngine.from_module(a, decode_gemm="triton")
    params = SamplingParams(temperature=0, max_new_tokens=16)
    before = engine.generate(GPU_PROMPTS, params)
    engine.update_weights({k: v.float() for k, v in b.state_dict().items()})
    after = engine.generate(GPU_PROMPTS, params)
    want = EmbeddedEngine.from_module(b, decode_gemm="triton").generate(GPU_PROMPTS, params)
    assert [c.logprobs for c in after] == [c.logprobs for c in want] != [c.logprobs for c in before]
