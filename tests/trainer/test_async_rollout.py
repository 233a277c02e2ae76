"""Async rollout: AReaL's capacity rule, the staleness bound under a producer that runs ahead, η = 0 synchronous,
producer errors surfacing in the trainer, clean shutdown.

The engine is the real EmbeddedEngine over a tiny random Llama (SmolLM2's tokenizer and vocabulary, 2 layers of
width 32) so each generation takes milliseconds; the workflow is the real agent workflow over the real GSM8K env.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from env_servers.gsm8k import GSM8KEnv, load_gsm8k
from rollout.api import SamplingParams
from trainer.agent_workflow import AgentWorkflow
from trainer.async_rollout import AsyncSource, SyncSource, capacity, make_source
from trainer.rounds import RoundsSchedule

ROOT = Path(__file__).resolve().parents[2]
B, N = 2, 2  # prompts per step, samples per prompt


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, model_path) -> str:
    import torch
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    folder = tmp_path_factory.mktemp("tiny-llama")
    cfg = tiny_llama_config(
        vocab_size=49152, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=2
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(Path(model_path) / name, folder / name)
    return str(folder)


@pytest.fixture()
def engine(tiny_model):
    import torch

    from rollout.engine import EmbeddedEngine

    torch.set_num_threads(1)
    eng = EmbeddedEngine(tiny_model, max_batch_size=16)
    yield eng
    eng.close()


def gsm8k_workflow(tokenizer, max_new_tokens: int = 4) -> AgentWorkflow:
    items = load_gsm8k(ROOT / "data/gsm8k/test.jsonl")
    params = SamplingParams(n=N, temperature=1.0, max_new_tokens=max_new_tokens)
    return AgentWorkflow(tokenizer, lambda: GSM8KEnv(items), params, RoundsSchedule(1))


@pytest.fixture(scope="module")
def workflow(tokenizer):
    return gsm8k_workflow(tokenizer)


class Sampler:
    """The trainer's data cursor: B consecutive GSM8K rows per call; records how often it was called. With a
    workflow it reseeds it per call, as the trainer's sampler does."""

    def __init__(self, fail_at: int | None = None, workflow: AgentWorkflow | None = None) -> None:
        self.calls = 0
        self.fail_at = fail_at
        self.workflow = workflow

    def __call__(self):
        self.calls += 1
        if self.calls == self.fail_at:
            raise ValueError("bad data row")
        if self.workflow is not None:
            self.workflow.reseed(1000 + self.calls)
        start = (self.calls - 1) * B
        return [{"idx": i} for i in range(start, start + B)], list(range(start, start + B))


def wait_for(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting for the producer"
        time.sleep(0.01)


def test_capacity_rule():
    # nothing running or accepted, version 0, η = 2, batch 4: (2+0+1)*4 = 12 prompts may start, capped at 8 in flight
    assert capacity(8, 0, 0, 0, 2, 4) == 8
    assert capacity(16, 0, 0, 0, 2, 4) == 12
    # 10 accepted + 2 running at version 0 leaves 0; one trained version later, B more may start
    assert capacity(16, 2, 10, 0, 2, 4) == 0
    assert capacity(16, 2, 10, 1, 2, 4) == 4
    assert capacity(16, 0, 0, 0, 0, 4) == 4  # η = 0: exactly one batch ahead of the learner


def test_staleness_bound_with_producer_running_ahead(engine, workflow, tiny_model):
    eta = 2
    sampler = Sampler()
    source = make_source(engine, workflow, sampler, eta)
    assert isinstance(source, AsyncSource)
    lags = []
    try:
        for _ in range(6):
            version = engine.weight_version
            batch = source.next_batch(version)
            assert len(batch) == B * N and all(t is not None for t in batch)
            step_lags = {version - t.weight_version for t in batch}
            assert max(step_lags) <= eta
            lags.append(max(step_lags))
            # the learner is "slow": let the producer fill all the capacity the rule grants before training
            wait_for(lambda: source.queued >= eta * B)
            assert source.queued == eta * B  # and not one group more
            engine.update_weights(tiny_model)  # the learner's new weights: version + 1
    finally:
        source.close()
    # the producer really ran ahead: staleness climbs to η and stays there, never beyond
    assert lags == [min(s, eta) for s in range(6)]
    assert sampler.calls == 6 + eta  # prompts sampled: the 6 consumed batches + η batches ahead


def test_stale_groups_are_dropped_when_versions_jump(engine, workflow, tiny_model):
    eta = 1
    source = AsyncSource(engine, workflow, Sampler(), eta)
    try:
        source.next_batch(0)
        wait_for(lambda: source.queued >= eta * B)
        # a jump of 3 versions: everything generated so far is too old to train on
        engine.update_weights(tiny_model, version=3)
        batch = source.next_batch(3)
        assert {t.weight_version for t in batch} == {3}
        assert source.stats["stale_dropped"] == eta * B
    finally:
        source.close()


def test_sync_source_never_mixes_versions(engine, workflow, tiny_model):
    sampler = Sampler()
    source = make_source(engine, workflow, sampler, 0)
    assert isinstance(source, SyncSource)
    threads = threading.active_count()
    for _ in range(3):
        version = engine.weight_version
        batch = source.next_batch(version)
        assert {t.weight_version for t in batch} == {version}
        engine.update_weights(tiny_model)
    assert threading.active_count() == threads  # no producer thread
    assert sampler.calls == 3


def test_producer_error_surfaces_and_close_is_clean(engine, workflow):
    source = AsyncSource(engine, workflow, Sampler(fail_at=2), max_staleness=1)
    try:
        with pytest.raises(RuntimeError, match="rollout producer failed") as info:
            for _ in range(3):
                source.next_batch(engine.weight_version)
        assert isinstance(info.value.__cause__, ValueError)
    finally:
        source.close()
    assert source._threads == []


def test_close_stops_a_producer_that_is_waiting(engine, workflow):
    sampler = Sampler()
    source = AsyncSource(engine, workflow, sampler, max_staleness=1)
    source.next_batch(0)
    wait_for(lambda: source.queued >= B)
    source.close()
    assert source._threads == []
    calls = sampler.calls
    time.sleep(0.1)
    assert sampler.calls == calls


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_worker_generates_while_the_first_scores(engine, tokenizer, workers):
    """With two producer threads the next batch's generation starts while the batch just generated is still being
    scored; with one it cannot."""
    started = []
    generate = engine.generate

    def spy(*args, **kwargs):  # the real engine generates; the spy only notes when each call began
        started.append(time.monotonic())
        return generate(*args, **kwargs)

    engine.generate = spy
    seen, lock = [], threading.Lock()  # generations begun while the first batch's first reply was being scored
    wf = gsm8k_workflow(tokenizer)
    step = wf.spec.to_action

    def slow_scoring(text):  # the first batch's post-processing waits (briefly) for another generation to begin
        with lock:
            if not seen:
                wait_until = time.monotonic() + (10.0 if workers == 2 else 0.5)
                while len(started) < 2 and time.monotonic() < wait_until:
                    time.sleep(0.01)
                seen.append(len(started))
        return step(text)

    wf.spec = replace(wf.spec, to_action=slow_scoring)
    source = AsyncSource(engine, wf, Sampler(), max_staleness=1, workers=workers)
    try:
        first = source.next_batch(0)
        assert len(first) == B * N
        assert seen == [workers]
    finally:
        source.close()
        del engine.generate


def test_concurrent_workers_keep_each_sampler_calls_seed(engine, tokenizer):
    """Each workflow call samples with the seed the sampler set for its own prompts, even when the other worker's
    sampler call reseeds the shared workflow meanwhile: the groups are token for token what synchronous rollout
    gives with the same seeds (same weights)."""
    wf = gsm8k_workflow(tokenizer, max_new_tokens=8)

    def tokens(source, steps: int) -> dict[int, list[list[int]]]:
        out: dict[int, list[list[int]]] = {}
        for _ in range(steps):
            for t in source.next_batch(0):
                out.setdefault(t.group_id, []).append(t.token_ids)
        source.close()
        return out

    want = tokens(SyncSource(engine, wf, Sampler(workflow=wf)), 4)
    got = tokens(AsyncSource(engine, wf, Sampler(workflow=wf), max_staleness=3, workers=2), 4)
    assert got.keys() == want.keys() and len(want) == 4 * B
    assert all(sorted(got[g]) == sorted(want[g]) for g in want)


@pytest.mark.slow
def test_trainer_async_path_keeps_the_bound(tmp_path):
    """`python -m trainer rollout.max_staleness=1`: the loop takes the async source and trains only on samples at
    most one version old, then shuts the producer down cleanly (the process exits 0)."""
    import json

    from tests.conftest import run_trainer_config

    steps = 2
    config = {
        "experiment_name": "async",
        "data": {"max_train_samples": 8},
        "rollout": {"n": 2, "max_new_tokens": 4, "max_staleness": 1},
        "train": {"batch_size": B, "micro_batch_size": 4, "total_steps": steps, "threads": 2, "lr": 1e-5},
        "eval": {"every": 0},
        "checkpoint": {"save_dir": str(tmp_path / "saves"), "every": 0},
        "logging": {"wandb": False, "progress": False},
    }
    run = run_trainer_config(config, tmp_path, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    lines = (tmp_path / "saves/async/metrics.jsonl").read_text().splitlines()
    rows = [r for r in map(json.loads, lines) if "reward" in r]
    assert [r["weight_version"] for r in rows] == list(range(1, steps + 1))
    assert rows[0]["staleness"] == 0  # nothing older than the initial weights exists yet
    assert 0 <= rows[1]["staleness"] <= 1
    assert all(r["sample_version"] == r["weight_version"] - 1 - r["staleness"] for r in rows)
