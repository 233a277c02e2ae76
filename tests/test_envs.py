"""Each environment's reset/step/reward in-process: gsm8k_tools, babyai, sciworld (skips without Java), searchqa."""

from __future__ import annotations

import json

import pytest

from env_servers.api import EnvError
from env_servers.bm25 import BM25
from env_servers.gsm8k_tools import GSM8KToolsEnv, calculate
from env_servers.registry import EnvUnavailable, make_factory
from env_servers.searchqa import DEFAULT_DATA, f1_score, load_questions, normalize_answer, parse_action, score_answer

ITEMS = [{"question": "Janet has 16 eggs, eats 3, bakes 4 and sells the rest at $2. Dollars?", "answer": "#### 18"}]


# ---------------------------------------------------------------- gsm8k_tools


@pytest.mark.parametrize(
    "expr, expected",
    [
        ("12*7", "84"),
        ("(16 - 3 - 4) * 2", "18"),
        ("1,200 / 3", "400"),
        ("7/2", "3.5"),
        ("10/3", "3.333333333"),
        ("2^10", "1024"),
        ("-3 + +2", "-1"),
        ("17 % 5", "2"),
        ("17 // 5", "3"),
        ("$18 x 2".replace("x", "*"), "36"),
    ],
)
def test_calculator_values(expr, expected):
    assert calculate(expr) == expected


@pytest.mark.parametrize(
    "expr, error",
    [
        ("1/0", "division by zero"),
        ("9**9**9", "exponent too large"),
        ("10**16", "within"),
        ("1e999", "out of range"),
        ("__import__('os').system('true')", "unsupported"),
        ("x + 1", "unsupported"),
        ("[1, 2]", "unsupported"),
        ("2 +", "error"),
        ("", "1 to 200"),
        ("1+" * 150 + "1", "1 to 200"),
    ],
)
def test_calculator_refuses(expr, error):
    out = calculate(expr)
    assert out.startswith("error:") and error in out


def test_gsm8k_tools_episode():
    env = GSM8KToolsEnv(ITEMS, format_reward=0.1, max_calls=2)
    obs = env.reset(0)
    assert "<calc>" in obs.text and "Janet" in obs.text and env.observation() == obs.text
    step = env.step("First the eggs left: <calc>16-3-4</calc>")
    assert (step.observation, step.reward, step.done) == ("<result>9</result>", 0.0, False)
    step = env.step("<calc>9*2</calc> and <calc>9/0</calc>")
    assert step.observation == "<result>18</result>\n<result>error: division by zero</result>"
    # the call budget (2) is spent: this turn is the final answer even though it calls the calculator again
    step = env.step("<calc>1+1</calc> so she makes \\boxed{18}")
    assert (step.reward, step.done, step.info["strict"], step.info["calc_calls"]) == (1.1, True, True, 2)
    with pytest.raises(EnvError):
        env.step("\\boxed{18}")
    env.reset(0)
    step = env.step("She makes 17 dollars.")  # no calc call: a final (wrong, unboxed) answer
    assert (step.reward, step.done, step.info["correct"]) == (0.0, True, False)


# ---------------------------------------------------------------- babyai


def test_babyai_parse_action():
    from env_servers.babyai import ACTIONS, parse_action

    assert (
        parse_action("Thought:\nthe ball is left. turn right is wrong.\n\nAction:\nturn left") == ACTIONS["turn left"]
    )
    assert parse_action("I will Move Forward.") == ACTIONS["go forward"]
    assert parse_action("pick up the key, then turn left") == ACTIONS["pick up"]  # the earliest action counts
    assert parse_action("open the door") == ACTIONS["toggle"]
    assert parse_action("leftover text") is None
    assert parse_action("") is None


def _bot_words(env):
    from minigrid.utils.baby_ai_bot import BabyAIBot

    from env_servers.babyai import ACTIONS

    words = {v: k for k, v in ACTIONS.items()}
    bot = BabyAIBot(env._env)
    return lambda: words[int(bot.replan())]


@pytest.mark.parametrize("idx", [0, 4, 5, 6])  # GoToRedBallGrey, PickupLoc, PutNextLocal, OpenDoor
def test_babyai_solved_through_words(idx):
    """minigrid's own BabyAI bot, speaking through our word actions, solves the level: minigrid's success reward."""
    env = make_factory("babyai")()
    obs = env.reset(idx)
    assert f"Your mission: {obs.info['mission']}" in obs.text and "You are carrying" in obs.text
    next_word = _bot_words(env)
    total, turns = 0.0, 0
    while True:
        step = env.step(f"Action: {next_word()}")
        total, turns = total + step.reward, turns + 1
        if step.done:
            break
    assert step.info["success"] and "Mission complete." in step.observation
    assert total == pytest.approx(1 - 0.9 * turns / env._env.max_steps)
    with pytest.raises(EnvError):
        env.step("turn left")
    env.close()


def test_babyai_reset_is_reproducible_and_turns_are_bounded():
    make = make_factory("babyai", "BabyAI-GoToRedBall-v0")
    a, b = make(), make()
    assert a.reset(7).text == b.reset(7).text
    assert a.reset(7).text != a.reset(8).text
    assert len(a) == 10_000
    for bad in (-1, 10_000, "3"):
        with pytest.raises(EnvError):
            a.reset(bad)
    a.reset(7)
    step = a.step("sing a song")
    assert "Not an action" in step.observation and step.info["valid_action"] is False and not step.done
    turns = 1
    while not step.done:
        step = a.step("turn left")
        turns += 1
    assert turns == a._env.max_steps and step.reward == 0.0 and not step.info["success"]
    assert a.available_actions() == ["turn left", "turn right", "go forward", "pick up", "drop", "toggle", "done"]


def test_babyai_unknown_level():
    with pytest.raises(EnvError, match="BabyAI-Nope-v0"):
        make_factory("babyai", "BabyAI-GoToRedBall-v0,BabyAI-Nope-v0")


# ---------------------------------------------------------------- sciworld


@pytest.fixture(scope="module")
def sciworld():
    """(make, simulators): envs over the first task's variations; one JVM, recycled between envs."""
    from env_servers.sciworld import SciWorldEnv, Simulators, list_variations

    sims = Simulators(keep=1)
    try:
        variations = list_variations(sims, ["find-living-thing"])
    except EnvUnavailable as e:
        pytest.skip(str(e))
    yield (lambda: SciWorldEnv(variations, sims=sims)), sims
    sims.close_idle()


def test_sciworld_gold_path_scores_one(sciworld):
    env = sciworld[0]()
    env._sim.load("find-living-thing", 0, env.simplification, generateGoldPath=True)
    gold = env._sim.get_gold_action_sequence()
    obs = env.reset(0)
    assert obs.info["task_description"].startswith("Your task is to find")
    assert obs.text.startswith(obs.info["task_description"] + "\n")
    assert env.available_actions()
    rewards = []
    for action in gold:
        step = env.step(f"Thought: next.\nAction: {action}")
        rewards.append(step.reward)
        if step.done:
            break
    assert step.done and step.info["game_score"] == 100
    assert sum(rewards) == pytest.approx(1.0) and min(rewards) >= 0
    env.close()


def test_sciworld_failure_ends_with_zero_and_simulators_are_reused(sciworld):
    make, _ = sciworld
    env = make()
    sim = env._sim
    env.reset(1)
    step = env.step("focus on agent")  # focusing on the wrong thing fails the task
    assert step.done and step.reward == 0.0 and step.info["game_score"] < 0
    with pytest.raises(EnvError):
        env.step("look around")
    env.close()
    with pytest.raises(EnvError):
        env.reset(0)
    again = make()
    assert again._sim is sim  # no second JVM
    assert again.reset(1).info["variation"] == 1
    again.close()


# ---------------------------------------------------------------- searchqa


def test_bm25_ranking():
    docs = ["the cat sat on the mat", "dogs chase cats", "a cat and a cat and a dog", "stock markets fell"]
    index = BM25(docs)
    hits = index.search("cat", 4)
    assert [d for d, _ in hits] == [2, 0]  # tf 2 beats tf 1; "cats" is another token
    assert all(s > 0 for _, s in hits) and hits[0][1] > hits[1][1]
    assert index.search("markets", 1)[0][0] == 3
    assert index.search("the a of", 3) == []  # stop words only
    assert index.search("zebra", 3) == []
    rare, common = BM25(["x y", "x z", "x w"]).search("x z", 3)[0], BM25(["x y", "x z", "x w"]).search("x", 3)[0]
    assert rare[0] == 1 and rare[1] > common[1]  # a rare term adds more than a term in every doc


def test_answer_scoring():
    assert normalize_answer("The  Black-Sea!") == "blacksea"
    assert normalize_answer("the Louvre museum") == "louvre museum"
    assert f1_score("the Black Sea coast", "Black Sea") == pytest.approx(0.8)  # p = 2/3, r = 1
    assert f1_score("Paris", "Athens") == 0.0
    assert score_answer("louvre", ["the Louvre", "Louvre museum"]) == {"em": True, "f1": 1.0}


def test_searchqa_parse_action():
    assert parse_action("think... search[deepest lake] then answer[x]") == ("search", "deepest lake")
    assert parse_action("<think>hm</think><answer> Athens </answer>") == ("answer", "Athens")
    assert parse_action("Answer[Bonn]") == ("answer", "Bonn")
    assert parse_action("I don't know") is None


def test_searchqa_episode_and_retrieval():
    make = make_factory("searchqa", max_turns=3)
    env = make()
    questions = load_questions(DEFAULT_DATA / "questions.jsonl")
    assert len(env) == len(questions) == 28
    for i, q in enumerate(questions):  # the shipped collection answers every question within the top 3
        env.reset(i)
        step = env.step(f"search[{q['question']}]")
        passages = normalize_answer(step.observation)
        assert any(normalize_answer(a) in passages for a in q["answers"]), q["question"]
    obs = env.reset(22)
    assert "Question: At which laboratory was the World Wide Web invented?" in obs.text
    step = env.step("answer[the CERN laboratory]")
    assert step.done and not step.info["em"] and step.reward == pytest.approx(2 / 3)  # "cern laboratory" vs "cern"
    env.reset(0)
    assert not env.step("hmm").done and not env.step("search[everest]").done
    step = env.step("still thinking")  # third turn: the budget is spent
    assert step.done and step.reward == 0.0


def test_searchqa_own_corpus_formats(tmp_path):
    (tmp_path / "corpus.jsonl").write_text(
        json.dumps({"contents": "Zorblax\nZorblax is the capital of the planet Quux."})
        + "\n"
        + json.dumps({"contents": "Quux\nQuux orbits a red dwarf."})
        + "\n"
    )
    (tmp_path / "questions.jsonl").write_text(json.dumps({"question": "Capital of Quux?", "golden_answers": "Zorblax"}))
    env = make_factory("searchqa", str(tmp_path), top_k=1)()
    env.reset(0)
    assert env.step("search[capital]").observation == (
        "<information>Doc 1 (Title: Zorblax) Zorblax is the capital of the planet Quux.</information>"
    )
    assert env.step("answer[Zorblax]").reward == 1.0
    (tmp_path / "questions.jsonl").write_text('{"question": "no answers"}\n')
    with pytest.raises(ValueError, match="answers"):
        make_factory("searchqa", str(tmp_path))


def test_sciworld_reset_payload_matches_agentgym_client():
    """AgentGym's SciworldEnvClient shows task_description + "\\n" + observation: the server must not send the task
    twice, and RemoteEnv must rebuild the in-process text from the two fields."""
    from env_servers.api import Observation
    from env_servers.client import _normalise
    from env_servers.protocol import reset_payload

    task, look = "Your task is to boil water.", "This room is called the kitchen."
    payload = reset_payload("agentgym", Observation(f"{task}\n{look}", {"task_description": task}))
    assert (payload["task_description"], payload["observation"], payload["done"]) == (task, look, False)
    assert payload["task_description"] + "\n" + payload["observation"] == f"{task}\n{look}"
    assert _normalise(payload)["task_description"] == task
