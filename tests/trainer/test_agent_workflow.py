"""Multi-turn agent workflow: rounds schedule, chat-template token pieces, and real episodes of the gsm8k_tools env
(in-process and over a real env server) driven by the real SmolLM2 engine, checked against an independent replay."""

from __future__ import annotations

import pytest

from trainer.agent_workflow import ChatTokens
from trainer.rounds import RoundsSchedule


def test_rounds_schedule_fixed_and_growing():
    assert [RoundsSchedule(3).at(s) for s in (0, 10, 1000)] == [3, 3, 3]
    growing = RoundsSchedule(2, [[5, 4], [10, 6]])  # ScalingInter-RL: 2 turns, 4 from step 5, 6 from step 10
    assert [growing.at(s) for s in (0, 4, 5, 9, 10, 99)] == [2, 2, 4, 4, 6, 6]


@pytest.mark.parametrize(
    "max_rounds, schedule",
    [(0, []), (2, [[5, 4], [5, 6]]), (2, [[10, 4], [5, 6]]), (2, [[5, 0]]), (2, [[5]]), (2, [[-1, 3]])],
)
def test_rounds_schedule_rejects_bad_entries(max_rounds, schedule):
    with pytest.raises(ValueError):
        RoundsSchedule(max_rounds, schedule)


def test_workflows_from_config(tokenizer):
    from rollout.api import SamplingParams
    from trainer.agent_workflow import AgentWorkflow, make_agent_workflows
    from trainer.config import ConfigError, load_config
    from trainer.tasks import GSM8KAgentTask, GSM8KTask, is_agent_env, make_task

    params = SamplingParams(n=2)
    assert not is_agent_env(load_config(None, []).env)  # single-turn GSM8K scored in-process
    assert isinstance(make_task(load_config(None, []), tokenizer), GSM8KTask)
    tools = make_task(load_config(None, ["env.name=gsm8k_tools"]), tokenizer)
    assert isinstance(tools, GSM8KAgentTask) and not tools.reports_reward  # GSM8K rows, episodes with a calculator
    assert is_agent_env(load_config(None, ["env.url=http://127.0.0.1:36001"]).env)
    cfg = load_config(None, ["env.name=gsm8k_tools", "env.max_rounds=2", "env.rounds_schedule=[[10,4]]"])
    train, evaluate = make_agent_workflows(cfg, tokenizer, params, params)
    assert isinstance(train, AgentWorkflow) and isinstance(evaluate, AgentWorkflow)
    assert (train.schedule.at(9), train.schedule.at(10)) == (2, 4)
    bad = load_config(None, ["env.name=gsm8k_tools", "env.rounds_schedule=[[10,4],[5,6]]"])
    with pytest.raises(ConfigError, match="env.rounds_schedule"):
        make_agent_workflows(bad, tokenizer, params, params)


@pytest.mark.parametrize("system", [None, "Use the calculator."])
def test_chat_pieces_concatenate_to_the_template(tokenizer, system):
    chat = ChatTokens(tokenizer, system)
    head = [{"role": "system", "content": system}] if system else []
    action = chat.encode("Let me compute 3*4.")
    conversation = [
        *head,
        {"role": "user", "content": "What is 3*4?"},
        {"role": "assistant", "content": "Let me compute 3*4."},
        {"role": "user", "content": "calculator: 12"},
    ]
    want = chat.encode(tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True))
    eos = tokenizer.eos_token_id
    # the model sampled its end-of-turn token: it is not repeated
    got = chat.prompt("What is 3*4?") + action + [eos] + chat.next_turn("calculator: 12", eos)
    assert got == want
    # cut off by max_new_tokens: the turn is closed for the model, so it sees the same conversation
    got = chat.prompt("What is 3*4?") + action + chat.next_turn("calculator: 12", action[-1])
    assert got == want


# ---------------------------------------------------------------- real episodes: gsm8k_tools + SmolLM2

# SmolLM2-135M never calls the calculator on real GSM8K questions within a few tokens, but asked to repeat a call it
# greedily writes "You can use a calculator: write <calc>EXPRESSION</calc>…": a real tool call (the calculator answers
# with an error result) that continues the episode. The last question gets a plain one-turn answer.
QUESTIONS = [
    "Repeat after me, exactly: <calc>6*7</calc>",
    "Repeat after me: <calc>6*7</calc>",
    "Copy this calculator call: <calc>6*7</calc>",
]
SYSTEM = "Repeat the user's calculator call exactly."
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def calc_data(tmp_path_factory) -> str:
    import json

    path = tmp_path_factory.mktemp("calc") / "calc.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": "#### 42"}) + "\n" for q in QUESTIONS))
    return str(path)


@pytest.fixture(scope="module")
def engine(model_path):
    import torch

    from rollout.engine import EmbeddedEngine

    torch.set_num_threads(2)
    eng = EmbeddedEngine(model_path)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def hf_model(model_path):
    from rollout.loading import load_model

    return load_model(model_path)


@pytest.fixture()
def env_server(calc_data, tmp_path):
    from tests.conftest import free_port, start_server, stop_server

    port = free_port()
    args = ["-m", "env_servers", "--env", "gsm8k_tools", "--port", str(port), "--data", calc_data]
    proc = start_server(args, f"http://127.0.0.1:{port}/health", tmp_path / "env.log")
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


def agent(tokenizer, make_env, schedule, max_total_tokens=4096):
    from rollout.api import SamplingParams
    from trainer.agent_workflow import AgentWorkflow

    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=NEW_TOKENS)
    return AgentWorkflow(tokenizer, make_env, params, schedule, system_prompt=SYSTEM, max_total_tokens=max_total_tokens)


def runs(mask: list[int]) -> list[tuple[int, int, int]]:
    """(value, start, end) of each run of equal mask values."""
    out, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            out.append((mask[start], start, i))
            start = i
    return out


def check_against_replay(traj, idx, tokenizer, calc_data) -> None:
    """Replay the episode's actions in a fresh env and check every token span of the trajectory against it."""
    from env_servers.gsm8k import load_gsm8k
    from env_servers.gsm8k_tools import GSM8KToolsEnv

    spans = runs(traj.loss_mask)
    assert [v for v, _, _ in spans] == [0, 1] + [0, 1] * (traj.info["num_rounds"] - 1)  # prompt, then turns
    env = GSM8KToolsEnv(load_gsm8k(calc_data))
    first = tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": env.reset(idx).text}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert tokenizer.decode(traj.token_ids[: spans[0][2]]) == first
    eos, reward = tokenizer.eos_token_id, 0.0
    for k in range(1, len(spans), 2):
        action = traj.token_ids[spans[k][1] : spans[k][2]]
        assert action[-1] == eos or len(action) == NEW_TOKENS  # one whole sampled turn
        result = env.step(tokenizer.decode(action, skip_special_tokens=True))
        reward += result.reward
        if k + 1 < len(spans):  # the observation turn that followed it, exactly as the chat template writes it
            assert not result.done
            closing = "" if action[-1] == eos else "<|im_end|>"
            want = f"{closing}\n<|im_start|>user\n{result.observation}<|im_end|>\n<|im_start|>assistant\n"
            assert tokenizer.decode(traj.token_ids[spans[k + 1][1] : spans[k + 1][2]]) == want
    assert result.done == traj.info["done"] and reward == traj.reward


def check_logprobs(traj, hf_model) -> None:
    """Model tokens carry the behaviour logprobs (= the HF forward's, fp32), everything else 0."""
    import torch

    ids = torch.tensor([traj.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(hf_model(input_ids=ids).logits[0, :-1].float(), -1)
    want = logp.gather(-1, ids[0, 1:, None])[:, 0]
    mask = torch.tensor(traj.loss_mask[1:], dtype=torch.bool)
    got = torch.tensor(traj.logprobs[1:])
    assert (got[~mask] == 0).all() and traj.logprobs[0] == 0
    assert (got[mask] - want[mask]).abs().max().item() < 1e-3


def test_multi_turn_episodes_in_process_and_over_http(engine, hf_model, tokenizer, calc_data, env_server):
    from env_servers.client import env_factory

    items, gids = [{"idx": i} for i in range(len(QUESTIONS))], list(range(len(QUESTIONS)))
    workflow = agent(tokenizer, env_factory("gsm8k_tools", data=calc_data), RoundsSchedule(2))
    local = workflow.run(engine, items, gids)
    assert all(t is not None for t in local)
    assert {t.info["num_rounds"] for t in local} == {1, 2}  # tool-calling episodes went on, the answer ended one
    for idx, traj in enumerate(local):
        assert traj.group_id == idx and traj.weight_version == engine.weight_version
        assert traj.info["weight_versions"] == [engine.weight_version] * traj.info["num_rounds"]
        check_against_replay(traj, idx, tokenizer, calc_data)
        check_logprobs(traj, hf_model)

    remote = agent(tokenizer, env_factory("gsm8k_tools", url=env_server), RoundsSchedule(2)).run(engine, items, gids)
    for a, b in zip(local, remote, strict=True):  # greedy: the server-side env gives the very same episodes
        assert (a.token_ids, a.loss_mask, a.reward, a.info["done"]) == (
            b.token_ids,
            b.loss_mask,
            b.reward,
            b.info["done"],
        )
    import httpx

    assert httpx.get(f"{env_server}/list_envs").json() == []  # every episode closed its env slot


def test_rounds_schedule_and_token_budget(engine, tokenizer, calc_data, model_path):
    from env_servers.client import env_factory

    make_env = env_factory("gsm8k_tools", data=calc_data)
    items, gids = [{"idx": i} for i in range(len(QUESTIONS))], list(range(len(QUESTIONS)))
    # ScalingInter-RL: one turn until step 1, two from then on (step = the engine's weight version)
    schedule = RoundsSchedule(1, [[engine.weight_version + 1, 2]])
    short = agent(tokenizer, make_env, schedule).run(engine, items, gids)
    assert [t.info["num_rounds"] for t in short] == [1, 1, 1]
    assert [t.info["done"] for t in short].count(False) >= 1  # cut by the horizon, not by the env
    assert all(runs(t.loss_mask)[-1][0] == 1 for t in short)  # ends on the model's turn: no dangling observation

    # a budget that fits one turn but not the observation after it: those episodes are dropped, the others kept
    budget = max(len(t.token_ids) for t in short) + 3
    engine.update_weights(model_path, version=engine.weight_version + 1)
    capped = agent(tokenizer, make_env, schedule, max_total_tokens=budget).run(engine, items, gids)
    for s, c in zip(short, capped, strict=True):
        if s.info["done"]:
            assert c is not None and c.token_ids == s.token_ids
        else:
            assert c is None


def test_babyai_episodes_open_and_act_the_agentgym_way(engine, tokenizer):
    """A real babyai episode on SmolLM2: the prompt is AgentGym's opening (instructions, the scripted OK, then the
    goal and view), and what the env received is the "Action:" line the client cuts out, not the raw reply."""
    from env_servers.agents import BABYAI, OK, spec_of
    from env_servers.registry import make_factory
    from rollout.api import SamplingParams
    from trainer.agent_workflow import AgentWorkflow

    sent: list[str] = []
    make = make_factory("babyai")

    def make_env():
        env = make()
        step = env.step

        def recording_step(action):
            sent.append(action)
            return step(action)

        env.step = recording_step
        return env

    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=24, seed=3)
    flow = AgentWorkflow(tokenizer, make_env, params, RoundsSchedule(2), spec=spec_of("babyai"))
    trajs = flow.run(engine, [{"idx": 1}], [0])
    assert len(trajs) == 2 and all(t is not None for t in trajs)
    text = tokenizer.decode(trajs[0].token_ids)
    assert text.index(BABYAI[:60]) < text.index(OK) < text.index("Your goal: go to the red ball")
    assert sent and all("Action:" not in a and "\n" not in a for a in sent)  # cleaned action lines only
    assert all(t.reward == 0.0 or t.info["success"] for t in trajs)
