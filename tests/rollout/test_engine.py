"""The embedded engine against transformers: logprobs, greedy tokens, batching, stops, seeds, weight updates.

Tolerance: engine logprobs vs the HF forward's log-softmax in fp32 on CPU, max abs diff < 1e-4 (observed ~3e-5:
the engine runs a left-padded batch through its own kernels, HF one unpadded sequence).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rollout.api import FINISH_LENGTH, FINISH_STOP, SamplingParams
from rollout.engine import EmbeddedEngine

TOL = 1e-4
PROMPTS = [[1, 504, 3458, 314, 253, 1345, 28, 1206], [1, 2882, 17, 346]]  # ragged on purpose


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def hf(model_path):
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(model_path):
    return EmbeddedEngine(model_path, seed=0)


def hf_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = model(ids).logits.float().log_softmax(-1)[0]
    return logp[len(prompt) - 1 : -1].gather(-1, ids[0, len(prompt) :, None])[:, 0]


def max_diff(model, completions) -> float:
    return max(
        (hf_logprobs(model, c.prompt_ids, c.token_ids) - torch.tensor(c.logprobs)).abs().max().item()
        for c in completions
    )


def tiny_hf(model_type: str, seed: int = 0, **extra):
    """A random-init HF model of a supported family, small enough for CPU tests."""
    sizes = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    sizes.update(num_key_value_heads=2, head_dim=16, max_position_embeddings=256, eos_token_id=95)
    cfg = AutoConfig.for_model(model_type, **{**sizes, **extra})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


# ---------------------------------------------------------------- SmolLM2 against transformers


def test_logprobs_equal_hf_forward_under_truncated_sampling(engine, hf):
    # temperature / top-k / top-p shape the draw, but the logprobs are the unmodified policy's
    params = SamplingParams(n=2, temperature=0.8, top_k=40, top_p=0.9, max_new_tokens=6, seed=3)
    out = engine.generate(PROMPTS, params)
    assert [c.prompt_index for c in out] == [0, 0, 1, 1]
    assert all(len(c.token_ids) == len(c.logprobs) > 0 for c in out)
    assert max_diff(hf, out) < TOL


def test_greedy_ragged_batch_equals_hf_generate(engine, hf):
    out = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=6))
    for prompt, c in zip(PROMPTS, out, strict=True):
        ids = torch.tensor([prompt])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        assert c.token_ids == ref[0, len(prompt) :].tolist()
        assert c.finish_reason == FINISH_LENGTH and c.weight_version == engine.weight_version
    assert max_diff(hf, out) < TOL


def test_stop_token_ends_row_and_is_included(engine):
    greedy = SamplingParams(temperature=0, max_new_tokens=6)
    full = engine.generate(PROMPTS[:1], greedy)[0].token_ids
    stop = full[2]
    cut = full.index(stop) + 1
    got = engine.generate(PROMPTS[:1], SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=[stop]))[0]
    assert got.token_ids == full[:cut] and got.finish_reason == FINISH_STOP and len(got.logprobs) == cut


# ---------------------------------------------------------------- batching, groups, seeds (tiny model)


@pytest.fixture(scope="module")
def tiny():
    return tiny_hf("llama")


@pytest.fixture()
def tiny_engine(tiny):
    return EmbeddedEngine.from_module(tiny, seed=0)


TINY_PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23]]


def test_ragged_rows_equal_each_prompt_alone(tiny_engine):
    params = SamplingParams(temperature=0, max_new_tokens=12)
    batch = tiny_engine.generate(TINY_PROMPTS, params)
    for prompt, c in zip(TINY_PROMPTS, batch, strict=True):
        alone = tiny_engine.generate([prompt], params)[0]
        assert c.token_ids == alone.token_ids
        assert max(abs(a - b) for a, b in zip(c.logprobs, alone.logprobs, strict=True)) < 1e-5


def test_repeated_prompts_prefilled_once_decode_as_their_own_rows(tiny_engine, tiny):
    """A batch with a prompt given twice (not adjacent) and n=3 copies of each: the prefill runs the distinct
    prompts only, every row still decodes on its own: greedy rows of one prompt equal that prompt alone, sampled
    rows of one prompt differ, and their logprobs match the HF forward."""
    prompts = [TINY_PROMPTS[0], TINY_PROMPTS[1], TINY_PROMPTS[0]]
    greedy = tiny_engine.generate(prompts, SamplingParams(n=3, temperature=0, max_new_tokens=10))
    for c in greedy:
        alone = tiny_engine.generate([c.prompt_ids], SamplingParams(temperature=0, max_new_tokens=10))[0]
        assert c.token_ids == alone.token_ids
    sampled = tiny_engine.generate(prompts, SamplingParams(n=3, temperature=1.5, max_new_tokens=10, seed=4))
    assert len({tuple(c.token_ids) for c in sampled if c.prompt_ids == TINY_PROMPTS[0]}) > 1
    assert max_diff(tiny, sampled) < TOL


def test_n_expands_and_groups_by_prompt(tiny_engine):
    out = tiny_engine.generate(TINY_PROMPTS, SamplingParams(n=4, temperature=1.5, max_new_tokens=8, seed=1))
    assert [c.prompt_index for c in out] == [0] * 4 + [1] * 4 + [2] * 4
    assert all(c.prompt_ids == TINY_PROMPTS[c.prompt_index] for c in out)
    assert len({tuple(c.token_ids) for c in out[:4]}) > 1  # the group's samples differ


def test_seed_determinism(tiny, tiny_engine):
    params = SamplingParams(n=4, temperature=1.5, max_new_tokens=8, seed=7)
    a = tiny_engine.generate(TINY_PROMPTS, params)
    b = tiny_engine.generate(TINY_PROMPTS, params)
    c = tiny_engine.generate(TINY_PROMPTS, SamplingParams(n=4, temperature=1.5, max_new_tokens=8, seed=8))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    # unseeded requests draw from the engine's generator: reproducible from the engine seed, different per call
    fresh = [EmbeddedEngine.from_module(tiny, seed=0) for _ in range(2)]
    unseeded = SamplingParams(n=4, temperature=1.5, max_new_tokens=8)
    first = [[x.token_ids for x in e.generate(TINY_PROMPTS, unseeded)] for e in fresh]
    assert first[0] == first[1]
    assert [x.token_ids for x in fresh[0].generate(TINY_PROMPTS, unseeded)] != first[0]


def test_max_batch_size_splits_without_changing_results(tiny):
    params = SamplingParams(n=3, temperature=0, max_new_tokens=6)
    whole = EmbeddedEngine.from_module(tiny, max_batch_size=64).generate(TINY_PROMPTS, params)
    split = EmbeddedEngine.from_module(tiny, max_batch_size=2).generate(TINY_PROMPTS, params)
    assert [c.token_ids for c in whole] == [c.token_ids for c in split]
    assert [c.prompt_index for c in split] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_per_prompt_caps_cut_each_row_at_its_own_length(tiny):
    """Caps per prompt: greedy rows equal the uncapped run's rows cut at each cap (finish "length" there), and
    sampled rows never pass their cap; a cap above params.max_new_tokens or of the wrong count is refused."""
    engine = EmbeddedEngine.from_module(tiny, seed=0)
    caps = [3, 9, 1]
    full = engine.generate(TINY_PROMPTS, SamplingParams(n=2, temperature=0, max_new_tokens=12))
    capped = engine.generate(TINY_PROMPTS, SamplingParams(n=2, temperature=0, max_new_tokens=12), caps)
    for f, c in zip(full, capped, strict=True):
        cap = caps[c.prompt_index]
        assert c.token_ids == f.token_ids[:cap] and c.logprobs == pytest.approx(f.logprobs[:cap], abs=1e-5)
        assert c.finish_reason == ("length" if len(f.token_ids) > cap or f.finish_reason == "length" else "stop")
    sampled = engine.generate(TINY_PROMPTS, SamplingParams(n=4, temperature=1.5, max_new_tokens=12, seed=3), caps)
    assert all(len(c.token_ids) <= caps[c.prompt_index] for c in sampled)
    assert [c.prompt_index for c in sampled] == [0] * 4 + [1] * 4 + [2] * 4
    with pytest.raises(ValueError, match="max_new_tokens caps must be in 1..12"):
        engine.generate(TINY_PROMPTS, SamplingParams(max_new_tokens=12), [3, 13, 1])
    with pytest.raises(ValueError, match="3 prompts"):
        engine.generate(TINY_PROMPTS, SamplingParams(max_new_tokens=12), [3, 4])


def test_compaction_moves_live_rows_without_changing_greedy_answers(tiny):
    """Compaction (the default): with caps that end most rows early, the batch shrinks (24 rows -> 12, 40 -> 20 -> 10) and every
    greedy row equals the uncompacted engine's, logprobs included; sampled rows keep their caps and order."""
    prompts = TINY_PROMPTS + [[30, 31, 32], [40, 41]]
    plain = EmbeddedEngine.from_module(tiny, seed=0, compact=False)
    packed = EmbeddedEngine.from_module(tiny, seed=0)
    params = SamplingParams(n=8, temperature=0, max_new_tokens=14)
    for batch, caps, shrinks in ((prompts[:3], [2, 5, 14], 1), (prompts, [2, 3, 4, 9, 14], 2)):
        before = packed.compactions
        want, got = plain.generate(batch, params, caps), packed.generate(batch, params, caps)
        assert packed.compactions - before == shrinks
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        assert [c.finish_reason for c in got] == [c.finish_reason for c in want]
        assert all(g.logprobs == pytest.approx(w.logprobs, abs=1e-5) for g, w in zip(got, want, strict=True))
    before = packed.compactions  # 12 rows: half of them is below the ladder's 8-row floor, so no compaction
    short = packed.generate(prompts[:3], SamplingParams(n=4, temperature=0, max_new_tokens=14), [1, 2, 14])
    assert packed.compactions == before and [len(c.token_ids) for c in short] == [1] * 4 + [2] * 4 + [14] * 4
    sampled = packed.generate(
        prompts, SamplingParams(n=8, temperature=1.2, max_new_tokens=14, seed=5), [2, 3, 4, 9, 14]
    )
    assert [c.prompt_index for c in sampled] == [i for i in range(5) for _ in range(8)]
    assert all(len(c.token_ids) <= [2, 3, 4, 9, 14][c.prompt_index] for c in sampled)


def test_host_outputs_lists_equal_the_buffers_block_by_block():
    """`_HostOutputs` (the CUDA decode's outputs on their way to lists at each host check): blocks of columns queued
    and listed in any rhythm, then a compaction's moved rows carried into a smaller runner's, give the buffers' rows;
    a block is the columns as they were when it was queued."""
    from rollout.engine import _HostOutputs

    gen = torch.Generator().manual_seed(0)
    tokens, logprobs = torch.randint(0, 1000, (6, 40), generator=gen), torch.randn(6, 40, generator=gen)
    want_tok, want_lp = tokens.clone(), logprobs.clone()
    out = _HostOutputs(tokens, logprobs)
    out.reset(5)
    out.queue(7)
    out.queue(16)
    tokens[:, :16] = -1  # written after both blocks were queued
    assert out.lists == ([[]] * 5, [[]] * 5) and out.listed == 0
    out.to_lists()
    out.queue(16)  # nothing new
    assert out.listed == 16 and out.lists == (want_tok[:5, :16].tolist(), want_lp[:5, :16].tolist())
    moved = [4, 1]
    small = _HostOutputs(want_tok[moved], want_lp[moved])  # the smaller runner's buffers after `adopt`
    small.reset(2, tuple([every[i] for i in moved] for every in out.lists), out.listed)
    small.queue(30)
    small.to_lists(wait=True)
    assert small.lists == (want_tok[moved, :30].tolist(), want_lp[moved, :30].tolist())


def test_a_batch_whose_rows_all_stop_early_returns_their_prefixes(tiny_engine):
    """Every row hits a stop id within its first three tokens: the batch ends there (not at max_new_tokens) and each
    row is the longer run's prefix up to its first stop, finish reason "stop"."""
    full = tiny_engine.generate(TINY_PROMPTS, SamplingParams(temperature=0, max_new_tokens=40))
    stops = sorted({c.token_ids[2] for c in full})
    cut = tiny_engine.generate(TINY_PROMPTS, SamplingParams(temperature=0, max_new_tokens=40, stop_token_ids=stops))
    for f, c in zip(full, cut, strict=True):
        k = next(i for i, t in enumerate(f.token_ids) if t in stops) + 1
        assert k <= 3 and c.token_ids == f.token_ids[:k] and c.finish_reason == FINISH_STOP
        assert c.logprobs == pytest.approx(f.logprobs[:k], abs=1e-5)


def test_eos_from_config_stops_rows():
    model = tiny_hf("llama")
    params = SamplingParams(n=16, temperature=3.0, max_new_tokens=40, seed=0)
    out = EmbeddedEngine.from_module(model, eos_token_ids=[3, 4]).generate([[5, 6]], params)
    stopped = [c for c in out if c.finish_reason == FINISH_STOP]
    assert stopped, "at temperature 3 some of 16 rows of 40 tokens should hit one of two stop ids"
    for c in out:
        hits = [i for i, t in enumerate(c.token_ids) if t in (3, 4)]
        assert hits == ([len(c.token_ids) - 1] if c.finish_reason == FINISH_STOP else [])


def test_folder_stop_ids_include_every_eos_the_folder_names(model_path, tmp_path):
    # a folder whose generation config names another EOS than the tokenizer's end-of-turn token: the engine must
    # stop on both, or a chat model runs past <|im_end|> into an invented next turn
    import json
    import shutil

    from rollout.defaults import eos_ids_of_folder as read_eos_ids

    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(model_path) / name, tmp_path / name)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": 0}))
    assert read_eos_ids(tmp_path) == [0, 2]  # 0 from the generation config; 2 = <|im_end|> from config + tokenizer
    assert read_eos_ids(model_path) == [2]
    (tmp_path / "config.json").unlink()
    (tmp_path / "tokenizer_config.json").unlink()
    assert read_eos_ids(tmp_path) == [0]


# ---------------------------------------------------------------- architectures against transformers


@pytest.mark.parametrize(
    "model_type,extra",
    [
        ("qwen2", {}),
        ("qwen3", {}),
        ("llama", {"attention_bias": True, "tie_word_embeddings": True}),
        (
            "llama",
            {
                "rope_parameters": {
                    "rope_type": "llama3",
                    "rope_theta": 500000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                }
            },
        ),
        ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}),
    ],
)
def test_architectures_match_hf_logprobs(model_type, extra):
    model = tiny_hf(model_type, **extra)
    out = EmbeddedEngine.from_module(model).generate(TINY_PROMPTS, SamplingParams(n=2, max_new_tokens=10, seed=0))
    assert max_diff(model, out) < TOL


# ---------------------------------------------------------------- weights


def _greedy_logprobs(engine) -> list[list[float]]:
    return [c.logprobs for c in engine.generate(TINY_PROMPTS, SamplingParams(temperature=0, max_new_tokens=5))]


def test_update_weights_from_module_state_dict_and_folder(tmp_path):
    a, b = tiny_hf("qwen2", seed=0), tiny_hf("qwen2", seed=1)
    b.save_pretrained(tmp_path)
    engine = EmbeddedEngine(str(tmp_path))
    from_b = _greedy_logprobs(engine)
    assert engine.update_weights(a) == 1
    from_a = _greedy_logprobs(engine)
    assert from_a != from_b and engine.weight_version == 1
    assert max_diff(a, engine.generate(TINY_PROMPTS, SamplingParams(max_new_tokens=5, seed=0))) < TOL
    assert engine.update_weights(b.state_dict()) == 2 and _greedy_logprobs(engine) == from_b
    engine.update_weights(a)
    assert engine.update_weights(str(tmp_path), version=10) == 10 and _greedy_logprobs(engine) == from_b
    assert all(c.weight_version == 10 for c in engine.generate(TINY_PROMPTS, SamplingParams(max_new_tokens=2)))


def test_pushes_from_one_module_follow_in_place_edits_and_replaced_parameters():
    """The engine keeps each source module's mapping onto its parameters between pushes (a trainer pushes the same
    compute copy every step): in-place edits, a replaced Parameter and a .data swap all reach the engine."""
    model = tiny_hf("qwen2", seed=0)
    engine = EmbeddedEngine.from_module(model, dtype=torch.bfloat16)
    engine.update_weights(model)
    with torch.no_grad():  # an optimizer step
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    engine.update_weights(model)
    assert torch.equal(engine.model.model.norm.weight, model.model.norm.weight.to(torch.bfloat16))
    mlp = model.model.layers[1].mlp
    mlp.down_proj.weight = torch.nn.Parameter(torch.randn_like(mlp.down_proj.weight))  # a new object
    model.model.embed_tokens.weight.data = torch.randn_like(model.model.embed_tokens.weight)  # same object, new data
    engine.update_weights(model)
    ours = engine.model.model
    assert torch.equal(ours.layers[1].mlp.down_proj.weight, mlp.down_proj.weight.to(torch.bfloat16))
    assert torch.equal(ours.embed_tokens.weight, model.model.embed_tokens.weight.to(torch.bfloat16))
    assert len(engine._plans) == 1
    del model, mlp
    assert len(engine._plans) == 0  # a dropped source module takes its plan (and its tensors) with it


def test_from_module_aliases_live_parameters():
    model = tiny_hf("llama")
    engine = EmbeddedEngine.from_module(model)
    assert engine.aliased
    before = _greedy_logprobs(engine)
    with torch.no_grad():  # an optimizer step edits parameters in place
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    after = engine.generate(TINY_PROMPTS, SamplingParams(max_new_tokens=5, seed=0))
    assert [c.logprobs for c in after] != before
    assert max_diff(model, after) < TOL  # the engine saw the edit with no sync
    ptr = model.model.embed_tokens.weight.data_ptr()
    assert engine.update_weights(model) == 1 and model.model.embed_tokens.weight.data_ptr() == ptr


def test_update_weights_into_aliased_engine_never_writes_the_source():
    model, other = tiny_hf("llama", seed=0), tiny_hf("llama", seed=1)
    engine = EmbeddedEngine.from_module(model)
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    engine.update_weights(other.state_dict())
    assert not engine.aliased
    assert all(torch.equal(kept[k], v) for k, v in model.state_dict().items())
    assert max_diff(other, engine.generate(TINY_PROMPTS, SamplingParams(max_new_tokens=4, seed=0))) < TOL


def test_copy_when_dtype_differs():
    model = tiny_hf("llama")
    engine = EmbeddedEngine.from_module(model, dtype=torch.bfloat16)
    assert not engine.aliased and engine.dtype == torch.bfloat16
    assert engine.generate([[5, 6]], SamplingParams(max_new_tokens=3))[0].token_ids


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "prompts,params,match",
    [
        ([], SamplingParams(), "at least one prompt"),
        ([[5], []], SamplingParams(), "prompt 1 is empty"),
        ([[5, 96]], SamplingParams(), r"token id 96 outside the vocabulary \[0, 96\)"),
        ([[-1]], SamplingParams(), "token id -1 outside"),
        ([[5, 1.5]], SamplingParams(), "integer token ids"),
        ([[5]], SamplingParams(stop_token_ids=[1000]), "stop token id 1000"),
        ([[5] * 200], SamplingParams(max_new_tokens=100), "max_position_embeddings"),
    ],
)
def test_bad_input_raises_value_error(tiny_engine, prompts, params, match):
    with pytest.raises(ValueError, match=match):
        tiny_engine.generate(prompts, params)


def test_unsupported_architecture_is_refused():
    cfg = AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        EmbeddedEngine.from_module(AutoModelForCausalLM.from_config(cfg), eos_token_ids=[0])


# ---------------------------------------------------------------- GPU: fused kernels and CUDA graphs


def gpu_model(dtype=torch.bfloat16):
    """Random Qwen2 with Qwen2.5-0.5B's head layout (14 heads over 2 KV heads of 64) at a small width."""
    model = tiny_hf(
        "qwen2", vocab_size=1024, hidden_size=448, intermediate_size=1024, num_attention_heads=7,
        num_key_value_heads=1, head_dim=64, num_hidden_layers=3,
    )  # fmt: skip
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # peaked logits: greedy comparisons are not decided by rounding-level ties
    return model.to("cuda", dtype)


GPU_PROMPTS = [list(range(10, 40)), [7, 8, 9], list(range(100, 117))]


@pytest.mark.gpu
def test_gpu_graph_replay_equals_eager_kernels():
    model = gpu_model()
    graphed = EmbeddedEngine.from_module(model, cuda_graphs=True)
    eager = EmbeddedEngine.from_module(model, cuda_graphs=False)
    assert graphed.fast and not graphed.aliased
    for params in (
        SamplingParams(n=3, temperature=0, max_new_tokens=40),
        SamplingParams(n=3, temperature=1.0, max_new_tokens=40, seed=5),
        SamplingParams(n=2, temperature=0.7, top_k=50, top_p=0.9, max_new_tokens=20, seed=6),
    ):
        a, b = graphed.generate(GPU_PROMPTS, params), eager.generate(GPU_PROMPTS, params)
        assert [c.token_ids for c in a] == [c.token_ids for c in b]
        assert [c.logprobs for c in a] == [c.logprobs for c in b]


@pytest.mark.gpu
def test_gpu_prefill_graph_replays_equal_eager():
    """A prefill shape (distinct prompts x slots) seen twice is captured; later calls of that shape replay it with
    their own prompts in its static inputs (other tokens, a repeated prompt): tokens and logprobs equal an engine
    without graphs."""
    model = gpu_model()
    graphed = EmbeddedEngine.from_module(model)
    eager = EmbeddedEngine.from_module(model, cuda_graphs=False)
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=20, seed=3)
    other = [[t + 1 for t in p] for p in GPU_PROMPTS]  # the same lengths, so the same shape
    for prompts in (GPU_PROMPTS, GPU_PROMPTS, other, GPU_PROMPTS + GPU_PROMPTS[:1]):
        a, b = graphed.generate(prompts, params), eager.generate(prompts, params)
        assert [c.token_ids for c in a] == [c.token_ids for c in b]
        assert [c.logprobs for c in a] == [c.logprobs for c in b]
    (runner,) = graphed._runners.values()
    assert [graph is not None for _, graph in runner.prefills.values()] == [True]


@pytest.mark.gpu
def test_gpu_fused_path_matches_hf_in_fp32():
    model = gpu_model(torch.float32)
    engine = EmbeddedEngine.from_module(model, dtype=torch.float32)
    assert engine.fast
    greedy = engine.generate(GPU_PROMPTS, SamplingParams(temperature=0, max_new_tokens=24))
    for prompt, c in zip(GPU_PROMPTS, greedy, strict=True):
        ids = torch.tensor([prompt], device="cuda")
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
        assert c.token_ids == ref[0, len(prompt) :].tolist()
    sampled = engine.generate(GPU_PROMPTS, SamplingParams(n=2, max_new_tokens=24, seed=1))
    model.cpu()
    assert max_diff(model, sampled) < TOL


@pytest.mark.gpu
def test_gpu_bf16_logprobs_close_to_hf_and_runner_reuse():
    model = gpu_model()
    engine = EmbeddedEngine.from_module(model)
    params = SamplingParams(n=4, max_new_tokens=32, seed=2)
    first = engine.generate(GPU_PROMPTS, params)
    shorter = engine.generate([p[:5] for p in GPU_PROMPTS], params)  # same runner, other prompt lengths
    fresh = EmbeddedEngine.from_module(model).generate([p[:5] for p in GPU_PROMPTS], params)
    assert [c.token_ids for c in shorter] == [c.token_ids for c in fresh]
    model.float().cpu()
    diffs = torch.cat([hf_logprobs(model, c.prompt_ids, c.token_ids) - torch.tensor(c.logprobs) for c in first])
    assert diffs.abs().mean() < 0.05 and diffs.abs().max() < 0.5  # bf16 rounding vs an fp32 forward


@pytest.mark.gpu
def test_gpu_update_weights_reaches_captured_graphs():
    a, b = gpu_model(), gpu_model()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    engine = EmbeddedEngine.from_module(a)
    params = SamplingParams(temperature=0, max_new_tokens=16)
    before = engine.generate(GPU_PROMPTS, params)
    engine.update_weights({k: v.float() for k, v in b.state_dict().items()})
    after = engine.generate(GPU_PROMPTS, params)
    want = EmbeddedEngine.from_module(b).generate(GPU_PROMPTS, params)
    assert [c.logprobs for c in after] == [c.logprobs for c in want] != [c.logprobs for c in before]


@pytest.mark.gpu
def test_gpu_compaction_equals_the_static_batch():
    """Compaction (the default) on the graphed CUDA path (a smaller runner captured, then filled by `adopt`): greedy rows and
    logprobs match the static batch's (to bf16 rounding: cuBLAS may reduce in another order at another row count);
    the batch shrank at least once; the static batch's outputs equal its device buffers."""
    model = gpu_model()
    static = EmbeddedEngine.from_module(model, compact=False)
    packed = EmbeddedEngine.from_module(model)
    prompts = GPU_PROMPTS + [list(range(200, 212)), [5, 6]]
    params = SamplingParams(n=8, temperature=0, max_new_tokens=64)
    caps = [3, 9, 20, 40, 64]
    want, got = static.generate(prompts, params, caps), packed.generate(prompts, params, caps)
    assert packed.compactions >= 1
    runner = next(iter(static._runners.values()))  # the lists came to the host in blocks, on a side stream
    assert [runner.tokens[i, : len(c.token_ids)].tolist() for i, c in enumerate(want)] == [c.token_ids for c in want]
    assert [runner.logprobs[i, : len(c.logprobs)].tolist() for i, c in enumerate(want)] == [c.logprobs for c in want]
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert all(g.logprobs == pytest.approx(w.logprobs, abs=0.02) for g, w in zip(got, want, strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize("k", [896, 4864])
def test_gpu_residual_projection_writes_the_next_norm(k):
    """`linear_residual` at o's shape (the epilogue adds into the residual and writes the next RowNorm) and at down's
    (K in slices whose fp32 partials `rms_prep` adds): the residual stream, xg and the row sums as torch computes
    them, and the normalized qkv-shaped projection of that RowNorm as HF's RMSNorm then linear."""
    from rollout import kernels as K

    gen = torch.Generator("cuda").manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x, w = torch.randn(64, k, generator=gen, **bf), torch.randn(896, k, generator=gen, **bf) * k**-0.5
    g, resid0 = torch.rand(896, generator=gen, **bf) + 0.5, torch.randn(64, 896, generator=gen, **bf)
    resid = resid0.clone()
    norm = K.linear_residual(x, w, None, resid, g, 1e-6)
    want = (resid0.float() + (x.float() @ w.float().T).bfloat16().float()).bfloat16()
    torch.testing.assert_close(resid.float(), want.float(), atol=0.05, rtol=0.02)
    assert torch.equal(norm.xg, (resid.float() * g.float()).bfloat16())
    torch.testing.assert_close(norm.sumsq.sum(0), (resid.float() ** 2).sum(1), rtol=1e-5, atol=1e-3)
    wq = torch.randn(1152, 896, generator=gen, **bf) * 896**-0.5
    hf = resid.float() * torch.rsqrt(resid.float().pow(2).mean(1, keepdim=True) + 1e-6) * g.float()
    torch.testing.assert_close(K.linear(norm, wq).float(), hf @ wq.float().T, atol=0.05, rtol=0.02)
    # the last layer's: the normalized rows themselves (down's written by rms_prep), as `finish` makes them
    resid_final = resid0.clone()
    final = K.linear_residual(x, w, None, resid_final, g, 1e-6, normalize=True)
    assert torch.equal(resid_final, resid)
    assert torch.equal(final, K.finish(norm.xg, norm))


@pytest.mark.gpu
def test_gpu_prefill_norm_and_rope_kernels_match_hf():
    """The packed model's prefill kernels in bf16: `rope_qk` gives HF's q * cos + rotate_half(q) * sin bit for bit,
    and the fused RMSNorm HF's to within one rounding step (its mean of squares is summed in another order)."""
    from rollout import kernels as K
    from rollout.model import RMSNorm, _rotate_half

    gen = torch.Generator("cuda").manual_seed(4)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    b, lq, heads, kv, d = 3, 33, 14, 2, 64
    qkv = torch.randn(b, lq, (heads + 2 * kv) * d, generator=gen, **bf)
    cos, sin = (torch.randn(b, 1, lq, d // 2, generator=gen, **bf).repeat(1, 1, 1, 2) for _ in range(2))
    q, k = K.rope_qk(qkv, cos, sin, heads, kv)
    q0 = qkv[..., : heads * d].view(b, lq, heads, d).transpose(1, 2)
    k0 = qkv[..., heads * d : (heads + kv) * d].view(b, lq, kv, d).transpose(1, 2)
    assert torch.equal(q.transpose(1, 2), q0 * cos + _rotate_half(q0) * sin)
    assert torch.equal(k.transpose(1, 2), k0 * cos + _rotate_half(k0) * sin)
    norm = RMSNorm(896, 1e-6).to(**bf)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(896, generator=gen, **bf) + 0.5)
    x = torch.randn(b, lq, 896, generator=gen, **bf) * 3
    want, want_last = norm(x), norm(x[:, -1])  # the final norm's input is a strided view
    norm.fused = True
    got, got_last = norm(x), norm(x[:, -1])
    assert got.shape == want.shape and got_last.shape == want_last.shape
    for g, w in ((got, want), (got_last, want_last)):
        torch.testing.assert_close(g, w, atol=0, rtol=2**-7)
        assert (g != w).float().mean() < 0.02


@pytest.mark.gpu
def test_gpu_rms_prep_gathers_the_embeddings():
    """`rms_prep` with `embed` (a decode step's first launch): the residual rows become the table's rows at the ids,
    whatever they held, and the RowNorm is the one of those rows passed in directly."""
    from rollout import kernels as K

    gen = torch.Generator("cuda").manual_seed(1)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    table, g = torch.randn(1000, 896, generator=gen, **bf), torch.rand(896, generator=gen, **bf) + 0.5
    ids = torch.randint(1000, (64,), generator=gen, device="cuda")
    x = torch.full((64, 896), float("nan"), **bf)
    norm = K.rms_prep(x, None, g, 1e-6, None, (ids, table))
    direct = table[ids]
    want = K.rms_prep(direct, None, g, 1e-6)
    assert torch.equal(x, table[ids])
    assert torch.equal(norm.xg, want.xg) and torch.equal(norm.sumsq, want.sumsq)


def attention_reference(qkv, k_cache, v_cache, cos, sin, slot: int, pad, heads: int) -> torch.Tensor:
    """One new token's attention per row in fp32 torch: q and k rotated at slot - pad, the cached slots pad .. slot-1
    and the new token attended."""
    b, kv, _, d = k_cache.shape
    out = []
    for r in range(b):
        c, s = cos[slot - pad[r]].float(), sin[slot - pad[r]].float()
        row = qkv[r].float().view(heads + 2 * kv, d)

        def rot(x, c=c, s=s):
            return torch.cat(
                [x[..., : d // 2] * c - x[..., d // 2 :] * s, x[..., d // 2 :] * c + x[..., : d // 2] * s], -1
            )

        q, k, v = rot(row[:heads]), rot(row[heads : heads + kv]), row[heads + kv :]
        keys = torch.cat([k_cache[r, :, pad[r] : slot].float(), k[:, None]], 1).repeat_interleave(heads // kv, 0)
        vals = torch.cat([v_cache[r, :, pad[r] : slot].float(), v[:, None]], 1).repeat_interleave(heads // kv, 0)
        out.append((torch.softmax(q[:, None] @ keys.transpose(1, 2) * d**-0.5, -1) @ vals).reshape(-1))
    return torch.stack(out)


@pytest.mark.gpu
@pytest.mark.parametrize("slot", [40, 300, 900])
def test_gpu_attention_split_across_programs_changes_nothing(slot):
    """`rope_attention` with 1, 2 and 4 programs per (row, KV head) (a small batch's split, its chunks merged in
    order through the scratch buffer and semaphore): the same output bit for bit, the new key and value written once
    at the slot, and the output as torch computes it. Slot 40: one chunk, so the split's parts idle."""
    from rollout import kernels as K

    gen = torch.Generator("cuda").manual_seed(3)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    b, heads, kv, d, t = 8, 14, 2, 64, 1024
    qkv = torch.randn(b, (heads + 2 * kv) * d, generator=gen, **bf)
    k_cache, v_cache = torch.randn(b, kv, t, d, generator=gen, **bf), torch.randn(b, kv, t, d, generator=gen, **bf)
    cos, sin = torch.randn(t, d // 2, generator=gen, **bf), torch.randn(t, d // 2, generator=gen, **bf)
    pad = torch.tensor([0, 1, 5, 17, 30, 33, 3, 0], device="cuda")
    ctr = torch.tensor([slot, 0], device="cuda")
    runs = []
    for parts in (1, 2, 4, 2):  # 2 twice: the semaphores are back at zero after a launch
        kc, vc = k_cache.clone(), v_cache.clone()
        runs.append((K.rope_attention(qkv, kc, vc, cos, sin, ctr, pad, heads, parts).clone(), kc, vc))
    torch.cuda.synchronize()
    out, kc, vc = runs[0]
    for other, okc, ovc in runs[1:]:
        assert torch.equal(other, out) and torch.equal(okc, kc) and torch.equal(ovc, vc)
    assert not torch.equal(kc[:, :, slot], k_cache[:, :, slot]) and torch.equal(kc[:, :, :slot], k_cache[:, :, :slot])
    want = attention_reference(qkv, k_cache, v_cache, cos, sin, slot, pad.tolist(), heads)
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("n, glu", [(1152, False), (896, False), (9728, True)])
def test_gpu_a_small_batch_reads_in_bounds_boxes_of_a_taller_buffer(n, glu):
    """A compacted batch's activations top a LINEAR_TMA_MIN_ROWS-row buffer, and its projections read whole boxes
    of that buffer: the rows below the batch (NaN here) change nothing in the batch's rows (qkv's and o's shapes
    through the Gluon kernel, gate_up's through the Triton one)."""
    from rollout import kernels as K

    gen = torch.Generator("cuda").manual_seed(2)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x, w = torch.randn(8, 896, generator=gen, **bf), torch.randn(n, 896, generator=gen, **bf) * 896**-0.5
    tall = torch.full((K.LINEAR_TMA_MIN_ROWS, 896), float("nan"), **bf)
    tall[:8] = x
    top = tall[:8]
    assert K._tma_box(top).shape[0] == K.LINEAR_TMA_MIN_ROWS and K._tma_box(top).data_ptr() == tall.data_ptr()
    assert K._tma_box(x) is x and K._tma_box(K._activation(8, 896, x)).shape[0] == K.LINEAR_TMA_MIN_ROWS
    got, alone = K.linear(top, w, glu=glu), K.linear(x, w, glu=glu)
    assert got.shape == alone.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), alone.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [64, 8])
def test_gpu_gluon_projections_equal_the_triton_kernel(rows, monkeypatch):
    """The Gluon projections (weight copied into shared memory before the wait) against `_linear_kernel` on the same
    inputs: qkv's shape from a RowNorm of 28 tile sums with a bias, o's adding into the residual stream and writing
    the next RowNorm, at a full and a compacted batch. Equal up to the order the row sums are added in."""
    from rollout import kernels as K

    gen = torch.Generator("cuda").manual_seed(1)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x, g = torch.randn(rows, 896, generator=gen, **bf), torch.rand(896, generator=gen, **bf) + 0.5
    sums = torch.rand(28, rows, generator=gen, device="cuda") * 40
    wq, bq = torch.randn(1152, 896, generator=gen, **bf) * 896**-0.5, torch.randn(1152, generator=gen, **bf)
    wo, resid0 = torch.randn(896, 896, generator=gen, **bf) * 896**-0.5, torch.randn(rows, 896, generator=gen, **bf)
    out = {}
    for gluon in (True, False):
        monkeypatch.setattr(K, "LINEAR_GLUON", gluon)
        resid = resid0.clone()
        norm = K.linear_residual(x, wo, None, resid, g, 1e-6)
        out[gluon] = (K.linear(K.RowNorm(x, sums, 1e-6), wq, bq), resid, norm.xg, norm.sumsq)
    for a, b in zip(out[True], out[False], strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)


def draw_with_kernel(row: torch.Tensor, rows: int, steps: int, temp: float, draw: torch.Tensor | None = None):
    """`steps` calls of the sampling kernel on `rows` copies of one logits row; (tokens, logprobs) [rows, steps]."""
    from rollout.kernels import sample_rows

    logits = row.expand(rows, -1).contiguous()
    dev, i64 = row.device, torch.int64
    ctr, done = torch.zeros(2, dtype=i64, device=dev), torch.zeros(rows, dtype=torch.int8, device=dev)
    tokens = torch.zeros(rows, steps, dtype=i64, device=dev)
    logprobs = torch.zeros(rows, steps, device=dev)
    never = torch.tensor([row.numel() + 1], device=dev)
    limit, last = torch.full((rows,), 10**6, dtype=i64, device=dev), torch.zeros(rows, dtype=i64, device=dev)
    for step in range(steps):
        ctr[1] = step
        sample_rows(
            logits, None if draw is None else draw.expand(rows, -1).contiguous(), torch.tensor([temp], device=dev),
            torch.tensor([1234], device=dev), ctr, done, never, limit, tokens, logprobs, last, 0, False,
        )  # fmt: skip
    return tokens, logprobs


@pytest.mark.gpu
def test_gpu_sampling_kernel_draws_from_the_softmax():
    """Over a real vocabulary's 48 chunks: draw frequencies match softmax(logits / T) (chi-square far inside a
    5-sigma bound), nothing is drawn off the support, and each logprob is log_softmax of the raw logits."""
    torch.manual_seed(0)
    vocab, temp = 49152, 0.7
    row = torch.full((vocab,), -40.0)
    hot = torch.cat([torch.randperm(vocab - 1)[:15], torch.tensor([vocab - 1])])  # the last column too
    row[hot] = torch.randn(16)
    row = row.cuda()
    for draw in (None, row * 1.2):  # the draw from separately filtered logits (top-k/top-p) as well
        tokens, logprobs = draw_with_kernel(row, 512, 4, temp if draw is None else 1.0, draw)
        p = torch.softmax((row / temp) if draw is None else draw, 0).cpu()
        counts = torch.bincount(tokens.flatten().cpu(), minlength=vocab).float()
        expected = p * tokens.numel()
        keep = expected > 5
        chi2, dof = (((counts - expected) ** 2 / expected)[keep]).sum().item(), int(keep.sum()) - 1
        assert dof >= 10 and chi2 < dof + 5 * (2 * dof) ** 0.5, (chi2, dof)
        off = torch.ones(vocab, dtype=torch.bool)
        off[hot] = False
        assert counts[off].sum() == 0  # the other 49,136 columns hold ~1e-20 of the mass
        assert torch.allclose(logprobs, torch.log_softmax(row, 0)[tokens], atol=1e-5)
        # rows and steps draw independently: two draws agree as often as sum(p^2) says, not always
        q, t = (p**2).sum().item(), tokens.cpu()
        for a, b in ((t[:, 0], t[:, 1]), (t[:256, 2], t[256:, 2])):
            assert abs((a == b).float().mean().item() - q) < 5 * (q * (1 - q) / len(a)) ** 0.5


@pytest.mark.gpu
def test_gpu_engine_stream_orders_weights_and_overlaps_default_stream_work():
    """Generation runs on the engine's own stream, at the highest priority: a thread generating while the default
    stream is busy gets the same tokens, and weights changed on the default stream reach the engine through
    update_weights."""
    import threading

    model = gpu_model(torch.float32)  # an fp32 master, a bf16 engine with its own weights (as the trainer has)
    engine = EmbeddedEngine.from_module(model, dtype=torch.bfloat16)
    assert engine._stream.priority == min(torch.cuda.Stream.priority_range()) < torch.cuda.current_stream().priority
    params = SamplingParams(n=2, temperature=0, max_new_tokens=40)
    want = [c.token_ids for c in engine.generate(GPU_PROMPTS, params)]
    got: list = []
    worker = threading.Thread(target=lambda: got.append(engine.generate(GPU_PROMPTS, params)))
    a = torch.randn(4096, 4096, device="cuda")
    worker.start()
    for _ in range(40):  # default-stream work while the engine decodes
        a = (a @ a).tanh_()
    worker.join()
    assert [c.token_ids for c in got[0]] == want
    with torch.no_grad():
        model.lm_head.weight.copy_(model.lm_head.weight.roll(1, 0))  # queued on the default stream
    engine.update_weights(model)
    moved = [c.token_ids for c in engine.generate(GPU_PROMPTS, params)]
    fresh = EmbeddedEngine.from_module(model, dtype=torch.bfloat16)
    assert moved != want and moved == [c.token_ids for c in fresh.generate(GPU_PROMPTS, params)]
