"""The vLLM backend: its pure conversions run everywhere; the engine itself runs only where vllm imports and a GPU is
present (those tests skip cleanly elsewhere)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from types import SimpleNamespace

import pytest

from rollout.api import SamplingParams
from rollout.vllm_backend import _check_version, completions_from_outputs, unfused_parameters, vllm_sampling_kwargs
from tests.conftest import ROOT, free_port

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def test_sampling_kwargs():
    kw = vllm_sampling_kwargs(SamplingParams(n=4, temperature=0.8, top_p=0.9, max_new_tokens=32, stop_token_ids=[7]))
    assert kw == {
        "n": 4,
        "temperature": 0.8,
        "top_p": 0.9,
        "top_k": -1,  # 0 = off for us; -1 = off in every vLLM version
        "max_tokens": 32,
        "stop_token_ids": [7],
        "seed": None,
        "logprobs": 0,  # the sampled token's logprob only
        "detokenize": False,  # token ids are all a Completion carries
    }
    assert vllm_sampling_kwargs(SamplingParams(top_k=20, seed=3))["top_k"] == 20


def _seq(index, ids, lps, reason):
    steps = [{tok: SimpleNamespace(logprob=lp, rank=1)} for tok, lp in zip(ids, lps, strict=True)]
    return SimpleNamespace(index=index, token_ids=ids, logprobs=steps, finish_reason=reason)


def test_completions_from_request_outputs():
    outputs = [
        SimpleNamespace(outputs=[_seq(1, [9, 2], [-0.5, -0.25], "stop"), _seq(0, [8, 8], [-1.0, -2.0], "length")]),
        SimpleNamespace(outputs=[_seq(0, [5], [-0.125], "abort"), _seq(1, [6, 2], [-3.0, -0.5], "stop")]),
    ]
    comps = completions_from_outputs(outputs, [[1, 2], [3]], version=6)
    assert [c.token_ids for c in comps] == [[8, 8], [9, 2], [5], [6, 2]]  # by prompt, then sample index
    assert [c.logprobs for c in comps] == [[-1.0, -2.0], [-0.5, -0.25], [-0.125], [-3.0, -0.5]]
    assert [c.finish_reason for c in comps] == ["length", "stop", "abort", "stop"]
    assert [c.prompt_index for c in comps] == [0, 0, 1, 1] and [c.prompt_ids for c in comps][2] == [3]
    assert {c.weight_version for c in comps} == {6}


@pytest.mark.parametrize(
    ("version", "ok"), [("0.11.0", False), ("0.25.1", False), ("0.26.0", True), ("0.26.1rc2", True), ("0.27.0", False)]
)
def test_version_gate(version, ok):
    if ok:
        _check_version(version)
    else:
        with pytest.raises(ImportError, match="0.26.x"):
            _check_version(version)


def _fused_like_vllm(hf):
    """An nn.Module laid out as vLLM lays out a Llama: q/k/v and gate/up fused row-wise into one weight, with the
    layer's `output_sizes` and the class's `packed_modules_mapping`, vocabulary rows padded to a multiple of 64."""
    import torch
    from torch import nn

    class Fused(nn.Module):
        packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def linear(*weights):
        layer = nn.Module()
        layer.weight = nn.Parameter(torch.cat([w.detach() for w in weights]))
        layer.output_sizes = [w.shape[0] for w in weights]
        return layer

    fused, core = Fused(), nn.Module()
    embed = hf.model.embed_tokens.weight.detach()
    pad = torch.zeros((-embed.shape[0]) % 64 + 64, embed.shape[1])
    core.embed_tokens = nn.Module()
    core.embed_tokens.weight, core.embed_tokens.org_vocab_size = nn.Parameter(torch.cat([embed, pad])), embed.shape[0]
    core.norm = hf.model.norm
    core.layers = nn.ModuleList()
    for block in hf.model.layers:
        attn, mlp, layer = block.self_attn, block.mlp, nn.Module()
        layer.self_attn, layer.mlp = nn.Module(), nn.Module()
        layer.self_attn.qkv_proj = linear(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)
        layer.self_attn.o_proj = attn.o_proj
        layer.mlp.gate_up_proj = linear(mlp.gate_proj.weight, mlp.up_proj.weight)
        layer.mlp.down_proj = mlp.down_proj
        layer.input_layernorm, layer.post_attention_layernorm = block.input_layernorm, block.post_attention_layernorm
        core.layers.append(layer)
    fused.model = core
    return fused


def test_unfused_parameters_give_the_trainers_checksum():
    """weights_checksum of the vLLM backend (fused layout) equals the trainer's checksum of the same HF model, and a
    one-element change in a fused weight changes it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rollout.weight_transfer import checksum, unique_tensors

    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg)
    fused = _fused_like_vllm(hf)
    expected = checksum(unique_tensors(hf.state_dict()))
    assert checksum(unfused_parameters(fused)) == expected
    with torch.no_grad():
        fused.model.layers[1].self_attn.qkv_proj.weight[40, 3] += 1.0  # a k_proj row
    assert checksum(unfused_parameters(fused)) != expected


def test_vllm_is_imported_only_when_selected():
    code = "import sys, rollout.server, rollout.vllm_backend; assert 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.skipif(HAS_VLLM, reason="checks the message shown where vllm is missing")
def test_server_without_vllm_says_so_in_one_line(model_path):
    cmd = [
        sys.executable,
        "-m",
        "rollout.server",
        "--backend",
        "vllm",
        "--model",
        model_path,
        "--port",
        str(free_port()),
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1 and "vllm" in lines[0] and "rldock[vllm]" in lines[0]


# ---- the real engine (vllm + GPU) ---------------------------------------------------------------------------------


# a marker, not importorskip inside the fixture: the fixture's own `model_path` (a GGUF conversion) would run first
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (pip install 'rldock[vllm]')")


@pytest.fixture(scope="module")
def vllm_engine(model_path):
    from rollout.vllm_backend import VLLMEngine

    engine = VLLMEngine(model_path, dtype="float32", gpu_memory_utilization=0.3, max_batch_size=16)
    yield engine
    engine.close()


@pytest.mark.gpu
@needs_vllm
def test_vllm_generate_counts_and_logprobs(vllm_engine, model_path):
    import torch

    from rollout.loading import load_model

    comps = vllm_engine.generate([[1, 504, 3458], [1, 2683]], SamplingParams(n=3, max_new_tokens=8, seed=0))
    assert len(comps) == 6 and [c.prompt_index for c in comps] == [0, 0, 0, 1, 1, 1]
    model = load_model(model_path, device="cuda")
    for c in comps:
        assert 1 <= len(c.token_ids) == len(c.logprobs) <= 8 and c.weight_version == 0
        ids = torch.tensor([c.prompt_ids + c.token_ids], device="cuda")
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        p = len(c.prompt_ids)
        ref = logp[p - 1 : -1].gather(-1, ids[0, p:, None])[:, 0]
        assert torch.allclose(torch.tensor(c.logprobs, device="cuda"), ref, atol=2e-2)


@pytest.mark.gpu
@needs_vllm
def test_vllm_update_weights_from_folder(vllm_engine, model_path, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from rollout.loading import load_model
    from rollout.weight_transfer import checksum, unique_tensors

    before = vllm_engine.weights_checksum()
    reference = load_model(model_path, dtype=torch.float32, device="cpu")
    assert before == checksum(unique_tensors(reference.state_dict())), "not the trainer's checksum of these weights"
    state = {k: v.float() + 1e-3 for k, v in load_file(f"{model_path}/model.safetensors").items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    assert vllm_engine.update_weights(str(tmp_path), 3) == 3
    assert vllm_engine.weights_checksum() == checksum(unique_tensors(state))
    comps = vllm_engine.generate([[1, 2]], SamplingParams(max_new_tokens=2, temperature=0))
    assert comps[0].weight_version == 3
    assert vllm_engine.update_weights(model_path, 4) == 4 and vllm_engine.weights_checksum() == before
