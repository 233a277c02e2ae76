"""The rollout service over HTTP: a real `python -m rollout.server` with the real SmolLM2 on 127.0.0.1."""

from __future__ import annotations

import subprocess
import sys
import threading

import httpx
import pytest
from safetensors.torch import save_file

from tests.conftest import ROOT, TEST_WEIGHTS_ROOT, free_port, start_server, stop_server, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("rollout") / "server.log"
    args = ["-m", "rollout.server", "--model", model_path, "--port", str(port), "--threads", "1", *TEST_WEIGHTS_ROOT]
    proc = start_server(args + ["--max-batch-size", "16", "--served-model-name", "smol"], url + "/health", log)
    yield url
    stop_server(proc)


def post(url: str, route: str, body, timeout: float = 120.0) -> httpx.Response:
    return httpx.post(url + route, json=body, timeout=timeout)


def get(url: str, route: str) -> dict:
    r = httpx.get(url + route, timeout=60.0)
    assert r.status_code == 200, r.text
    return r.json()


def test_health_and_models(server):
    health = get(server, "/health")
    assert health["status"] == "ok" and health["weight_version"] == 0 and not health["paused"]
    assert len(health["boot_id"]) == 32 and health["sync_ranks"] == 1
    models = get(server, "/v1/models")
    assert [m["id"] for m in models["data"]] == ["smol"]
    assert models["data"][0]["max_model_len"] == 8192


def test_generate_counts_logprobs_and_version(server):
    prompts = [[1, 504, 3458, 282], [1, 2683]]
    r = post(server, "/generate", {"prompts": prompts, "n": 3, "max_new_tokens": 6, "temperature": 1.0})
    assert r.status_code == 200, r.text
    body = r.json()
    comps = body["completions"]
    assert len(comps) == 6 and body["weight_version"] == 0
    assert [c["prompt_index"] for c in comps] == [0, 0, 0, 1, 1, 1]
    for c in comps:
        assert c["prompt_ids"] == prompts[c["prompt_index"]]
        assert 1 <= len(c["token_ids"]) == len(c["logprobs"]) <= 6
        assert all(lp <= 0 for lp in c["logprobs"])
        assert c["weight_version"] == 0
        ended_on_eos = c["token_ids"][-1] == 2
        assert c["finish_reason"] == ("stop" if ended_on_eos else "length")
        assert ended_on_eos or len(c["token_ids"]) == 6


def test_stop_token_ends_with_stop_reason(server):
    greedy = post(server, "/generate", {"prompts": [[1, 504, 3458]], "temperature": 0, "max_new_tokens": 4}).json()
    first = greedy["completions"][0]["token_ids"][0]
    body = {"prompts": [[1, 504, 3458]], "temperature": 0, "max_new_tokens": 4, "stop_token_ids": [first]}
    comp = post(server, "/generate", body).json()["completions"][0]
    assert comp["token_ids"] == [first] and comp["finish_reason"] == "stop"


def test_seed_makes_sampling_reproducible(server):
    body = {"prompts": [[1, 504, 3458]], "n": 2, "max_new_tokens": 5, "seed": 1234}
    a = post(server, "/generate", body).json()["completions"]
    b = post(server, "/generate", body).json()["completions"]
    assert [c["token_ids"] for c in a] == [c["token_ids"] for c in b]


def test_openai_completions(server, tokenizer):
    text = "The capital of France is"
    body = {"model": "smol", "prompt": [text, "2 + 2 ="], "max_tokens": 5, "n": 2, "logprobs": 1, "temperature": 0}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and out["model"] == "smol"
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    used = 0
    for c in out["choices"]:
        lp = c["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) <= 5
        assert c["finish_reason"] in ("stop", "length")
        used += len(lp["tokens"])
    prompt_tokens = len(tokenizer(text)["input_ids"]) + len(tokenizer("2 + 2 =")["input_ids"])
    assert out["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": used,
        "total_tokens": prompt_tokens + used,
    }
    # the same greedy request through /generate gives the same tokens and logprobs
    ids = tokenizer(text)["input_ids"]
    gen = post(server, "/generate", {"prompts": [ids], "max_new_tokens": 5, "temperature": 0}).json()["completions"][0]
    first = out["choices"][0]
    assert first["text"] == tokenizer.decode(gen["token_ids"], skip_special_tokens=True)
    assert first["logprobs"]["token_logprobs"] == pytest.approx(gen["logprobs"], abs=1e-5)


def test_openai_chat_completions(server, tokenizer):
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    body = {"model": "smol", "messages": messages, "max_tokens": 6, "temperature": 0, "logprobs": True}
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and len(out["choices"]) == 1
    choice = out["choices"][0]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    gen = post(server, "/generate", {"prompts": [ids], "max_new_tokens": 6, "temperature": 0}).json()["completions"][0]
    assert choice["message"] == {
        "role": "assistant",
        "content": tokenizer.decode(gen["token_ids"], skip_special_tokens=True),
    }
    assert [t["logprob"] for t in choice["logprobs"]["content"]] == pytest.approx(gen["logprobs"], abs=1e-5)
    assert out["usage"]["prompt_tokens"] == len(ids) and out["usage"]["completion_tokens"] == len(gen["token_ids"])


def test_openai_stop_string_cuts_text(server):
    base = {"prompt": [1, 504, 3458, 282], "max_tokens": 8, "temperature": 0, "logprobs": 0}
    full = post(server, "/v1/completions", base).json()["choices"][0]
    text = full["text"]
    assert len(text) > 4
    stop = text[3:5]
    cut = post(server, "/v1/completions", {**base, "stop": [stop]}).json()["choices"][0]
    assert cut["text"] == text[: text.find(stop)] and cut["finish_reason"] == "stop"
    assert len(cut["logprobs"]["tokens"]) < len(full["logprobs"]["tokens"])


BAD_GENERATE = [
    {"prompts": []},
    {"prompts": [[]]},
    {"prompts": [[-1]]},
    {"prompts": "abc"},
    {"prompts": [[1, 2]], "n": 0},
    {"prompts": [[1, 2]], "temperature": -1},
    {"prompts": [[1, 2]], "temperature": 1e39},
    {"prompts": [[1, 2]], "top_p": 0},
    {"prompts": [[1, 2]], "max_new_tokens": 0},
    {"prompts": [[1, 2]], "max_new_tokens": 10**6},
    {"prompts": [[1, 99999999]]},
    {"prompts": [[1, 2]], "stop_token_ids": [10**9]},
    {"prompts": [[1, 2]], "unknown_field": 1},
    [1, 2, 3],
    None,
]
BAD_COMPLETIONS = [
    {"prompt": ""},
    {"prompt": []},
    {"prompt": "hi", "presence_penalty": 0.5},
    {"prompt": "hi", "logit_bias": {"50": 10}},
    {"prompt": "hi", "best_of": 3},
    {"prompt": "hi", "min_p": 0.1},
    {"prompt": "hi", "echo": True},
    {"prompt": "hi", "logprobs": -1},
    {"prompt": "hi", "stop": [""]},
    {"prompt": "hi", "model": "not-served"},
    {"prompt": ["hi", [1, 2]]},
    {},
]
BAD_CHAT = [
    {"messages": []},
    {"messages": "hi"},
    {"messages": [{"content": "no role"}]},
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "url": "x"}]}]},
    {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}]},
    {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
    {"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 1.0},
    {"messages": [{"role": "user", "content": "hi"}], "temperature": 1e39},
]
BAD_ADMIN = [
    ("/update_weights", {"path": "/definitely/not/here"}),
    ("/update_weights", {"method": "disk"}),
    ("/update_weights", {"method": "nccl", "version": 1}),
    (
        "/update_weights",
        {"method": "nccl", "manifest": [{"name": "w", "shape": [2], "dtype": "float32"}], "bucket_bytes": 8},
    ),
    ("/update_weights", {"path": "x", "version": -1}),
    ("/init_weight_sync", {"host": "127.0.0.1", "port": 0, "rank_offset": 1, "world_size": 2}),
    ("/init_weight_sync", {"host": "127.0.0.1", "port": 1234, "rank_offset": 2, "world_size": 2}),
]


@pytest.mark.parametrize("body", BAD_GENERATE)
def test_bad_generate_is_4xx(server, body):
    r = post(server, "/generate", body)
    assert 400 <= r.status_code < 500 and r.json()["detail"], r.text


@pytest.mark.parametrize("body", BAD_COMPLETIONS)
def test_bad_completions_is_4xx(server, body):
    r = post(server, "/v1/completions", body)
    assert 400 <= r.status_code < 500 and r.json()["detail"], r.text
    unhonoured = set(body) & {"presence_penalty", "logit_bias", "best_of", "min_p"}
    if unhonoured:  # refused by name, never answered as if it had been applied
        assert r.status_code == 400 and repr(unhonoured.pop()) in r.json()["detail"]


@pytest.mark.parametrize("body", BAD_CHAT)
def test_bad_chat_is_4xx(server, body):
    r = post(server, "/v1/chat/completions", body)
    assert 400 <= r.status_code < 500 and r.json()["detail"], r.text


@pytest.mark.parametrize(("route", "body"), BAD_ADMIN)
def test_bad_admin_is_4xx(server, route, body):
    r = post(server, route, body)
    assert 400 <= r.status_code < 500 and r.json()["detail"], r.text


def test_non_json_body_is_4xx(server):
    r = httpx.post(server + "/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_broken_checkpoint_is_400_and_weights_survive(server, tmp_path):
    import torch

    before = get(server, "/weights_checksum")
    save_file({"model.embed_tokens.weight": torch.zeros(3, 3)}, str(tmp_path / "model.safetensors"))
    r = post(server, "/update_weights", {"path": str(tmp_path), "version": 7})
    assert r.status_code == 400 and "could not load" in r.json()["detail"]
    assert get(server, "/weights_checksum") == before
    assert get(server, "/health")["weight_version"] == 0


def test_pause_holds_requests_until_resume(server):
    assert post(server, "/pause", None).json()["paused"] is True
    assert get(server, "/health")["paused"] is True
    results = []
    t = threading.Thread(
        target=lambda: results.append(post(server, "/generate", {"prompts": [[1, 2]], "max_new_tokens": 2}))
    )
    t.start()
    wait_until(lambda: get(server, "/metrics")["queue_requests"] == 1, timeout=30)
    assert t.is_alive() and not results  # waiting, not refused
    assert post(server, "/resume", None).json()["paused"] is False
    t.join(60)
    assert results[0].status_code == 200 and len(results[0].json()["completions"]) == 1


def queued_together(server, bodies: list[dict]) -> list:
    """POST /generate once per body while the service is paused, then resume: they all wait in one queue."""
    post(server, "/pause", None)
    results: list = [None] * len(bodies)

    def send(i: int) -> None:
        results[i] = post(server, "/generate", bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    wait_until(lambda: get(server, "/metrics")["queue_requests"] == len(bodies), timeout=30)
    post(server, "/resume", None)
    for t in threads:
        t.join(60)
    return results


def test_concurrent_requests_share_one_engine_call(server):
    before = get(server, "/metrics")
    results = queued_together(server, [{"prompts": [[1, 504]], "n": 2, "max_new_tokens": 3}] * 3)
    after = get(server, "/metrics")
    assert [len(r.json()["completions"]) for r in results] == [2, 2, 2]
    assert all(c["prompt_index"] == 0 for r in results for c in r.json()["completions"])
    assert after["engine_calls"] - before["engine_calls"] == 1
    assert after["merged_requests"] - before["merged_requests"] == 3


def test_requests_differing_only_in_max_new_tokens_share_one_call(server):
    """Greedy requests with caps 5, 2 and 4 merge into one engine call; each answer equals the same request alone."""
    bodies = [{"prompts": [[1, 504, 3458]], "n": 1, "temperature": 0, "max_new_tokens": cap} for cap in (5, 2, 4)]
    alone = [post(server, "/generate", body).json()["completions"] for body in bodies]
    before = get(server, "/metrics")
    results = queued_together(server, bodies)
    after = get(server, "/metrics")
    assert after["engine_calls"] - before["engine_calls"] == 1
    for body, want, r in zip(bodies, alone, results, strict=True):
        got = r.json()["completions"]
        assert [c["token_ids"] for c in got] == [c["token_ids"] for c in want]
        assert len(got[0]["token_ids"]) <= body["max_new_tokens"]


def test_metrics_count_requests_and_tokens(server):
    before = get(server, "/metrics")
    comps = post(server, "/generate", {"prompts": [[1, 2, 3]], "n": 2, "max_new_tokens": 4}).json()["completions"]
    after = get(server, "/metrics")
    assert after["requests"] == before["requests"] + 1
    assert after["tokens_generated"] - before["tokens_generated"] == sum(len(c["token_ids"]) for c in comps)
    assert after["tokens_per_s"] > 0 and after["queue_requests"] == 0 and after["weight_version"] == 0


def test_cli_help_is_fast_and_torch_free():
    code = "import sys, rollout.server; assert 'torch' not in sys.modules and 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    out = subprocess.run([sys.executable, "-m", "rollout.server", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "--backend" in out.stdout


def test_cli_errors_are_one_line(tmp_path):
    cmd = [sys.executable, "-m", "rollout.server", "--model", str(tmp_path / "nope"), "--port", str(free_port())]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rollout.server: error:") and "not found" in lines[0]


# ---- the official OpenAI client -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_client_streams_completions_as_the_whole_answer(client):
    kw = {"model": "smol", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0, "seed": 1}
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text and len([c for c in chunks if c.choices]) > 2
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_openai_client_streams_chat_and_logprobs_match_the_text(client):
    kw = {
        "model": "smol",
        "messages": [{"role": "user", "content": "Say just: hello"}],
        "max_tokens": 64,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    whole = client.chat.completions.create(**kw)
    choice = whole.choices[0]
    assert choice.finish_reason == "stop", "the answer should end by itself (end of turn) within 64 tokens"
    tokens = [t.token for t in choice.logprobs.content]
    assert "".join(tokens) == choice.message.content, "no end-of-turn token beyond the text"
    assert all(len(t.top_logprobs) == 1 and t.top_logprobs[0].token == t.token for t in choice.logprobs.content)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == choice.message.content and chunks[-1].choices[0].finish_reason == "stop"
    streamed_lp = [e.logprob for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed_lp == pytest.approx([t.logprob for t in choice.logprobs.content])


def test_openai_client_completions_top_logprobs_are_lists(client):
    out = client.completions.create(model="smol", prompt="2 + 2 =", max_tokens=4, temperature=0, logprobs=1)
    lp = out.choices[0].logprobs
    assert isinstance(lp.top_logprobs, list) and len(lp.top_logprobs) == len(lp.tokens)
    assert all(top == {tok: p} for top, tok, p in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs, strict=True))


def test_openai_client_models_and_refusals(client):
    import openai

    assert client.models.retrieve("smol").id == "smol"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    messages = [{"role": "user", "content": "hi"}]
    for extra in ({"presence_penalty": 0.3}, {"response_format": {"type": "json_object"}}):
        with pytest.raises(openai.BadRequestError, match=next(iter(extra))):
            client.chat.completions.create(model="smol", messages=messages, max_tokens=2, **extra)
    fine = client.chat.completions.create(model="smol", messages=messages, max_tokens=2, presence_penalty=0, user="u")
    assert fine.choices[0].message.role == "assistant"
