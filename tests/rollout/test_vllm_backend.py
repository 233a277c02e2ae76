"""The vLLM backend: its pure conversions run everywhere; the engine itself runs only where vllm imports and a GPU is
present (those tests skip cleanly elsewhere)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from types import SimpleNamespace

import pytest

from rollout.api import SamplingParams
from rollout.vllm_backend import _check_version, completions_from_outputs, vllm_sampling_kwargs
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
    ("version", "ok"), [("0.9.2", False), ("0.10.0", True), ("0.11.1rc2", True), ("0.12.0", False)]
)
def test_version_gate(version, ok):
    if ok:
        _check_version(version)
    else:
        with pytest.raises(ImportError, match="0.10.x-0.11.x"):
            _check_version(version)


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


@pytest.fixture(scope="module")
def vllm_engine(model_path):
    pytest.importorskip("vllm")
    from rollout.vllm_backend import VLLMEngine

    engine = VLLMEngine(model_path, dtype="float32", gpu_memory_utilization=0.3, max_batch_size=16)
    yield engine
    engine.close()


@pytest.mark.gpu
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
def test_vllm_update_weights_from_folder(vllm_engine, model_path, tmp_path):
    from safetensors.torch import load_file, save_file

    before = vllm_engine.weights_checksum()
    state = {k: v + 1e-3 for k, v in load_file(f"{model_path}/model.safetensors").items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    assert vllm_engine.update_weights(str(tmp_path), 3) == 3
    assert vllm_engine.weights_checksum() != before
    comps = vllm_engine.generate([[1, 2]], SamplingParams(max_new_tokens=2, temperature=0))
    assert comps[0].weight_version == 3
    assert vllm_engine.update_weights(model_path, 4) == 4 and vllm_engine.weights_checksum() == before
