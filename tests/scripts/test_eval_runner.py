"""scripts/eval/: the pass@k math and payloads as pure functions, then real runs against a real rollout service
(SmolLM2 on CPU) and a real GSM8K env server, a handful of items with 32 new tokens each."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rollout.api import SamplingParams
from scripts.eval.metrics import k_values, markdown, pass_at_k, summarize
from scripts.eval.targets import chat_body, completions_body, parse_choices
from tests.conftest import ROOT, free_port, start_server, stop_server

# ---- pure parts ---------------------------------------------------------------------------------------------------


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of the k-subsets of n samples (c of them correct) holding at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_the_subset_count():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
    assert pass_at_k(200, 13, 1) == pytest.approx(13 / 200)
    assert pass_at_k(200, 13, 100) == pytest.approx(1 - math.comb(187, 100) / math.comb(200, 100))
    for bad in [(4, 5, 1), (4, 1, 5), (4, 1, 0)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_summarize_items_with_rewards_and_formats():
    def s(correct, reward, finish="stop"):
        return {"correct": correct, "reward": reward, "finish_reason": finish, "format_ok": reward > 1}

    records = [
        {"idx": 0, "samples": [s(True, 1.1), s(False, 0.0), s(False, 0.0), s(True, 1.0)]},
        {"idx": 1, "samples": [s(False, 0.0, "length")] * 4},
        {"idx": 2, "samples": [s(True, 1.1)] * 4},
    ]
    m = summarize(records, 4)
    assert k_values(4) == [1, 2, 4] and k_values(6) == [1, 2, 4, 6]
    assert (m["items"], m["samples"]) == (3, 12)
    assert m["accuracy"] == pytest.approx(6 / 12) and m["avg@4"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert m["mean_reward"] == pytest.approx((1.1 + 1.0 + 4 * 1.1) / 12)
    for j in (1, 2, 4):
        want = (brute_pass_at_k(4, 2, j) + 0 + 1) / 3
        assert m[f"pass@{j}"] == pytest.approx(want)
    assert m["format_ok_rate"] == pytest.approx(5 / 12) and m["truncated_rate"] == pytest.approx(4 / 12)
    md = markdown({"metrics": m, "config": {"model": "m", "task": "t", "target": "x", "k": 4, "temperature": 1.0,
                                            "top_p": 1.0, "max_new_tokens": 32}})  # fmt: skip
    header, rule, row = md.strip().splitlines()[-3:]
    assert header.count("|") == rule.count("|") == row.count("|") and "pass@4" in header


def test_payloads_and_answers():
    s = SamplingParams(n=3, temperature=0.7, top_p=0.9, max_new_tokens=32, seed=5)
    msgs = [{"role": "user", "content": "hi"}]
    body = chat_body("m", msgs, s)
    assert body == {
        "messages": msgs,
        "n": 3,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 32,
        "model": "m",
        "seed": 5,
    }
    assert "model" not in chat_body(None, msgs, SamplingParams(1, 0.0, 1.0, 0, 8)) and "seed" not in chat_body(
        None, msgs, SamplingParams(1, 0.0, 1.0, 0, 8)
    )
    assert completions_body("m", "text", s)["prompt"] == "text" and "messages" not in completions_body("m", "t", s)
    chat = {"choices": [{"index": 1, "message": {"content": "b"}, "finish_reason": "length"},
                        {"index": 0, "message": {"content": "a"}, "finish_reason": "stop"}]}  # fmt: skip
    assert parse_choices(chat) == [{"text": "a", "finish_reason": "stop"}, {"text": "b", "finish_reason": "length"}]
    assert parse_choices({"choices": [{"index": 0, "text": "t", "finish_reason": "stop"}]})[0]["text"] == "t"


def test_prompt_from_a_training_config(tmp_path):
    from scripts.eval.__main__ import parse_args
    from scripts.eval.tasks import GSM8KTask

    cfg = tmp_path / "config.yaml"
    cfg.write_text('data:\n  prompt_template: "Q: {question}\\nA:"\n  system_prompt: be brief\n')
    args = parse_args(["--train-config", str(cfg), "--data", str(ROOT / "data" / "gsm8k" / "test.jsonl")])
    assert GSM8KTask(args).messages("2+2?") == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "Q: 2+2?\nA:"},
    ]
    assert parse_args(["--train-config", str(cfg), "--prompt-template", "{question}!"]).prompt_template == "{question}!"


def test_help_is_fast_and_bad_target_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "scripts.eval", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "--rollout-url" in out.stdout
    port = free_port()  # nothing listens there
    proc = run_eval("--rollout-url", f"http://127.0.0.1:{port}", "--out-dir", str(tmp_path), "--limit", "1")
    assert_one_error_line(proc, "not reachable")


# ---- against real services ----------------------------------------------------------------------------------------

NO_TORCH = """
import runpy, sys
sys.argv = ["scripts.eval", *sys.argv[1:]]
try:
    runpy.run_module("scripts.eval", run_name="__main__")
finally:
    print("TORCH_IMPORTED" if "torch" in sys.modules else "NO_TORCH", file=sys.stderr)
"""


def run_eval(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter that reports, on exit, whether torch was ever imported."""
    import os

    clean = {k: v for k, v in os.environ.items() if k not in ("ENV", "ENV_URL", "ENV_PORT", "OPENAI_BASE_URL", "MODEL")}
    return subprocess.run([sys.executable, "-c", NO_TORCH, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**clean, **(env or {})}, timeout=600)  # fmt: skip


def assert_one_error_line(proc: subprocess.CompletedProcess, expected: str) -> None:
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and ln.strip() not in ("NO_TORCH", "TORCH_IMPORTED")]
    assert len(lines) == 1 and lines[0].startswith("eval: error: ") and expected in lines[0], proc.stderr[-2000:]


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NO_TORCH" in proc.stderr, "an HTTP-mode eval imported torch"
    return proc


@pytest.fixture(scope="module")
def rollout_url(model_path, tmp_path_factory):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("rollout") / "server.log"
    args = [
        "-m",
        "rollout.server",
        "--model",
        model_path,
        "--port",
        str(port),
        "--threads",
        "2",
        "--max-batch-size",
        "16",
    ]
    proc = start_server(args, url + "/health", log)
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def env_url(tmp_path_factory):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("env") / "server.log"
    proc = start_server(["-m", "env_servers", "--env", "gsm8k", "--port", str(port)], url + "/health", log, timeout=60)
    yield url
    stop_server(proc)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def gold_of(idx: int) -> str:
    from env_servers.gsm8k import gold_answer, load_gsm8k

    return gold_answer(load_gsm8k(ROOT / "data" / "gsm8k" / "test.jsonl")[idx]["answer"])


COMMON = ("--max-new-tokens", "32", "--concurrency", "4")


@pytest.mark.slow
def test_gsm8k_on_the_rollout_service_with_resume(rollout_url, tmp_path, model_path):
    from env_servers.gsm8k import score

    out = tmp_path / "run"
    first = ok(run_eval("--rollout-url", rollout_url, "--limit", "2", "--k", "2", "--out-dir", str(out), *COMMON))
    assert "pass@2" in first.stdout
    before = read_jsonl(out / "items.jsonl")
    with open(out / "items.jsonl", "a") as f:
        f.write('{"idx": 3, "samples": [')  # a run killed mid-write leaves a torn line
    second = ok(run_eval("--rollout-url", rollout_url, "--limit", "4", "--k", "2", "--out-dir", str(out), *COMMON))
    assert "resuming: 2 of 4" in second.stdout
    items = read_jsonl(out / "items.jsonl")
    assert items[:2] == before and sorted(r["idx"] for r in items) == [0, 1, 2, 3]
    results = json.loads((out / "results.json").read_text())
    m, cfg = results["metrics"], results["config"]
    assert (m["items"], m["samples"]) == (4, 8) and cfg["model"] == model_path and cfg["weight_version"] == 0
    for record in items:
        assert record["gold"] == gold_of(record["idx"]) and len(record["samples"]) == 2
        for sample in record["samples"]:
            assert sample["text"] and sample["finish_reason"] in ("stop", "length")
            assert sample["correct"] == score(sample["text"], record["gold"])["correct"]
    assert m["accuracy"] == pytest.approx(sum(s["correct"] for r in items for s in r["samples"]) / 8)
    assert "| accuracy | mean_reward |" in (out / "results.md").read_text()
    changed = run_eval("--rollout-url", rollout_url, "--limit", "4", "--k", "3", "--out-dir", str(out), *COMMON)
    assert_one_error_line(changed, "other settings (k)")


@pytest.mark.slow
def test_env_server_episodes_through_an_openai_endpoint(rollout_url, env_url, tmp_path, model_path):
    """The compose wiring: ENV_URL + OPENAI_BASE_URL + MODEL from the environment, no arguments but the output."""
    from env_servers.gsm8k import score

    out = tmp_path / "env"
    env = {"ENV_URL": env_url, "OPENAI_BASE_URL": rollout_url + "/v1", "MODEL": model_path, "MAX_ROUND": "2"}
    ok(run_eval("--limit", "3", "--out-dir", str(out), *COMMON, env=env))
    items = read_jsonl(out / "items.jsonl")
    assert sorted(r["idx"] for r in items) == [0, 1, 2]
    for record in items:
        (sample,) = record["samples"]
        assert len(sample["turns"]) == 1 and sample["done"]  # gsm8k is single-turn: the env ends the episode
        assert sample["correct"] == score(sample["turns"][0]["action"], gold_of(record["idx"]))["correct"]
        assert sample["reward"] == float(sample["correct"])
    cfg = json.loads((out / "results.json").read_text())["config"]
    assert cfg["task"].startswith("env:gsm8k@") and cfg["target"].startswith("openai:")


@pytest.mark.slow
def test_legacy_completions_route(rollout_url, tmp_path, model_path, tokenizer):
    """--api completions sends the plain prompt text (no chat template): the service counts exactly its tokens."""
    import httpx

    from env_servers.gsm8k import PROMPT_TEMPLATE, load_gsm8k

    before = httpx.get(rollout_url + "/metrics").json()["prompt_tokens"]
    out = tmp_path / "completions"
    args = ("--openai-base-url", rollout_url + "/v1", "--model", model_path, "--api", "completions")
    ok(run_eval(*args, "--limit", "2", "--out-dir", str(out), *COMMON))
    sent = httpx.get(rollout_url + "/metrics").json()["prompt_tokens"] - before
    rows = load_gsm8k(ROOT / "data" / "gsm8k" / "test.jsonl")[:2]
    plain = [PROMPT_TEMPLATE.format(question=r["question"]) for r in rows]
    assert sent == sum(len(tokenizer(text)["input_ids"]) for text in plain)
    assert sorted(r["idx"] for r in read_jsonl(out / "items.jsonl")) == [0, 1]


@pytest.mark.slow
def test_local_model_in_process(model_path, tmp_path, capsys):
    from scripts.eval.__main__ import main

    out = tmp_path / "local"
    assert main(["--model", model_path, "--device", "cpu", "--limit", "2", "--k", "2", "--temperature", "1.0",
                 "--seed", "3", "--out-dir", str(out), *COMMON]) == 0  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["target"] == "local:cpu" and results["metrics"]["samples"] == 4
    assert "pass@2" in capsys.readouterr().out


@pytest.mark.slow
def test_make_eval_runs_locally_with_the_docker_targets_variables(model_path, tmp_path):
    """`make eval` (no Docker) takes MODEL, ENV and EVAL_ARGS like `make docker-eval`; ENV=gsm8k scores the
    shipped test set in-process even when the shell has ENV set to something else."""
    out = tmp_path / "make_eval"
    args = f"--limit 2 --max-new-tokens 8 --device cpu --out-dir {out}"
    run = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "eval", f"MODEL={model_path}", f"EVAL_ARGS={args}"],
        env={**os.environ, "ENV": "/etc/shrc"},  # POSIX shells' ENV: must not turn into an env-server URL
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"]["samples"] == 2 and results["config"]["target"] == "local:cpu"
