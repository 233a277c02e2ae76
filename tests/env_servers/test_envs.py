"""Each environment's reset/step/reward in-process: gsm8k_tools, babyai, sciworld (skips without Java), searchqa,
textcraft. The AgentGym conformance over HTTP is in tests/env_servers/test_agentgym_conformance.py."""

from __future__ import annotations

import json

import pytest

from env_servers.api import EnvError
from env_servers.bm25 import BM25
from env_servers.gsm8k_tools import GSM8KToolsEnv, calculate
from env_servers.registry import EnvUnavailable, make_factory
from env_servers.searchqa import (
    DEFAULT_DATA,
    INVALID,
    RIGHT,
    WRONG,
    f1_score,
    last_answer,
    load_questions,
    normalize_answer,
    parse_action,
    score_answer,
)

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


def test_babyai_items_are_agentgyms():
    """Item i is AgentGym's: level LEVELS[i % 40] (its all_levels[i % 40 + 1]) with seed i // 40."""
    from env_servers.babyai import LEVELS

    env = make_factory("babyai")()
    assert (
        len(LEVELS) == 40 and LEVELS[0] == "BabyAI-GoToRedBallGrey-v0" and LEVELS[39] == "BabyAI-BossLevelNoUnlock-v0"
    )
    assert len(env) == 40 * 10_000
    for idx in (1, 41, 82):
        info = env.reset(idx).info
        assert (info["level"], info["seed"]) == (LEVELS[idx % 40], idx // 40)
    assert env.reset(41).text != env.reset(1).text  # same level, the next seed
    with pytest.raises(EnvError, match="deprecated"):  # this minigrid renamed GoToObjS6-v0; AgentGym says so too
        env.reset(3)
    for bad in (-1, 400_000, "3"):
        with pytest.raises(EnvError):
            env.reset(bad)
    env.close()


def _actions(text: str) -> list[str]:
    return text.rsplit("Available actions: [", 1)[1].rstrip("]").strip('"').split('", "')


def test_babyai_high_level_actions_reach_the_goal():
    """Item 1 (GoToRedBall, seed 0): "go to red ball 1" from the listed actions completes the mission."""
    env = make_factory("babyai")()
    obs = env.reset(1)
    assert obs.text.startswith("Your goal: go to the red ball\n")
    acts = _actions(obs.text)
    assert acts[:2] == ["turn left", "turn right"] and acts[-1] == "check available actions"
    for _ in range(8):  # turn until the ball is in view, then go to it
        step = env.step("go to red ball 1" if "go to red ball 1" in acts else "turn left")
        acts = _actions(step.observation)
        if step.done:
            break
    assert step.done and step.reward > 0.5 and step.info["success"]
    assert "\n The task is completed." in step.observation
    env.close()


def test_babyai_refusals_leave_the_state_unchanged():
    env = make_factory("babyai")()
    before = env.reset(1).text.split("\n", 1)[1]
    state = before.split("\nAvailable actions:")[0]
    pick = env.step("pick up red ball 1")  # the prompt's wording; the server's action is "pickup red ball 1"
    assert pick.observation.startswith("The action is not recognized. Please check valid actions.\nAvailable")
    assert env.step("").observation.startswith("No change in state.")
    listed = env.step("Check available actions").observation  # matched lower-cased, anywhere in the text
    assert listed.startswith("You can take the following actions: turn left, turn right, move forward")
    assert not pick.done and pick.reward == 0 and pick.info["valid_action"] is False
    assert env.observation() == f"Your goal: go to the red ball\n{listed}"
    assert env.step("turn left").observation != before and state not in env.observation()
    env.close()


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
    yield (lambda **kw: SciWorldEnv(variations, sims=sims, **kw)), sims
    sims.close_idle()


def test_sciworld_items_leave_out_agentgyms_tasks(sciworld):
    from env_servers.sciworld import EXCLUDED_TASKS, list_variations

    _, sims = sciworld
    items = list_variations(sims)
    assert len(items) == 4639  # AgentGym's item count: 30 tasks less 5-1, 5-2, 9-1, 9-2, 9-3, 10-1, 10-2
    names = {t for t, _ in items}
    assert len(names) == 23 and "grow-plant" not in names and "mendelian-genetics-known-plant" not in names
    assert items[0] == ("boil", 0) and len(EXCLUDED_TASKS) == 7


def test_sciworld_gold_path_scores_100(sciworld):
    env = sciworld[0]()
    env._sim.load("find-living-thing", 0, env.simplification, generateGoldPath=True)
    gold = env._sim.get_gold_action_sequence()
    obs = env.reset(0)
    assert obs.fields["task_description"].startswith("Your task is to find")
    assert obs.fields["task_name"] == "find-living-thing" and obs.fields["var_num"] == 0
    assert obs.text.startswith("This room is called") and env.available_actions()
    rewards, scores = [obs.reward], [obs.score]
    for action in gold:
        step = env.step(action)
        rewards.append(step.reward)
        scores.append(step.score)
        if step.done:
            break
    assert step.done and scores[-1] == 100 and sum(rewards) == 100  # ints: the game's own score, no drift
    assert all(isinstance(r, int) for r in rewards)
    env.close()


def test_sciworld_failure_ends_negative_and_simulators_are_reused(sciworld):
    make, _ = sciworld
    env = make()
    sim = env._sim
    env.reset(1)
    step = env.step("focus on agent")  # focusing on the wrong thing fails the task
    assert step.done and step.score < 0 and step.reward == step.score
    env.close()
    with pytest.raises(EnvError):
        env.reset(0)
    again = make(simplification="easy")  # rldock's opt-in: ScienceWorld's easy mode
    assert again._sim is sim  # no second JVM
    assert again.reset(1).info["variation"] == 1 and sim.get_simplifications_used()
    again.close()


def test_sciworld_queries(sciworld):
    env = sciworld[0]()
    env.reset(0)
    assert env.query("goals")["goals"] and env.query("task_description")["task_description"].startswith("Your task")
    hint = env.query("action_hint")
    assert "look around" in hint["possible_actions"] and hint["possible_objects"]
    assert set(env.query("state")) >= {"observation", "inventory", "goal_progress", "current_moves"}
    with pytest.raises(EnvError, match="nope"):
        env.query("nope")
    env.close()


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
    assert parse_action("<think>hm</think><search> deepest lake </search> <answer>x</answer>") == (
        "search",
        "deepest lake",
    )
    assert parse_action("<think>hm</think><answer> Athens </answer>") == ("answer", "Athens")
    assert parse_action("search[deepest lake]") is None  # AgentGym reads tags only
    assert parse_action("<Answer>Bonn</Answer>") is None
    assert last_answer("<answer>a</answer> or rather <answer> b </answer>") == "b"


def test_searchqa_episode_and_retrieval():
    env = make_factory("searchqa")()
    questions = load_questions(DEFAULT_DATA / "questions.jsonl")
    assert len(env) == len(questions) == 28
    for i, q in enumerate(questions):  # the shipped collection answers every question within the top 3
        env.reset(i)
        step = env.step(f"<search>{q['question']}</search>")
        assert step.observation.startswith("<information>Doc 1(Title: ") and step.observation.endswith("</information>")
        passages = normalize_answer(step.observation)
        assert any(normalize_answer(a) in passages for a in q["answers"]), q["question"]
    obs = env.reset(22)
    assert obs.text.startswith("You must reason inside <think>...</think> first.")
    assert obs.text.endswith("\n\n Question: At which laboratory was the World Wide Web invented?")
    wrong = env.step("<answer>the CERN laboratory</answer>")  # exact match only: no partial credit
    assert (wrong.observation, wrong.reward, wrong.done) == (WRONG, 0, False)
    assert wrong.info["f1"] == pytest.approx(2 / 3) and not wrong.info["em"]  # F1 stays an extra, off the wire
    assert env.step("I think it is CERN").observation == INVALID
    right = env.step("<answer>x</answer> no: <answer>CERN</answer>")  # the last answer is the one scored
    assert (right.observation, right.reward, right.done) == (RIGHT, 1, True)
    capped = make_factory("searchqa", max_turns=2)()  # rldock's opt-in turn budget
    capped.reset(0)
    assert not capped.step("hmm").done and capped.step("<answer>K2</answer>").done


def test_searchqa_own_corpus_and_question_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "corpus.jsonl").write_text(
        json.dumps({"contents": "Zorblax\nZorblax is the capital of the planet Quux."})
        + "\n"
        + json.dumps({"title": "Quux", "text": "Quux orbits a red dwarf."})
        + "\n"
    )
    (tmp_path / "questions.jsonl").write_text(json.dumps({"question": "Capital of Quux?", "golden_answers": "Zorblax"}))
    env = make_factory("searchqa", str(tmp_path))()
    env.reset(0)
    assert env.step("<search>capital</search>").observation == (
        "<information>Doc 1(Title: Zorblax) Zorblax is the capital of the planet Quux.</information>"
    )
    assert env.step("<answer>Zorblax</answer>").reward == 1
    # AgentGym-RL's layout: parquet files in order (test ids first), answers under reward_model.ground_truth.target
    rows = [{"question": "Orbit of Quux?", "reward_model": {"ground_truth": {"target": ["red dwarf"]}}}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test.parquet")
    pq.write_table(pa.Table.from_pylist(rows * 2), tmp_path / "train.parquet")
    files = f"{tmp_path}/test.parquet,{tmp_path}/train.parquet"
    env = make_factory("searchqa", str(tmp_path), questions=files)()
    assert len(env) == 3 and "Orbit of Quux?" in env.reset(2).text
    assert env.step("<answer>a red dwarf</answer>").done
    (tmp_path / "questions.jsonl").write_text('{"question": "no answers"}\n')
    with pytest.raises(ValueError, match="answers"):
        make_factory("searchqa", str(tmp_path))
    with pytest.raises(EnvError, match="retriever"):
        make_factory("searchqa", str(tmp_path), questions=files, retriever="nope")


def test_searchqa_over_a_retrieval_service(tmp_path):
    """The http retriever against a real /retrieve service (rldock's BM25 one, Search-R1's API)."""
    import subprocess
    import sys

    import httpx

    from tests.conftest import ROOT, free_port, start_server, stop_server

    port = free_port()
    args = ["-m", "env_servers.retrieval", "--corpus", str(DEFAULT_DATA / "corpus.jsonl"), "--port", str(port)]
    proc = start_server(args, f"http://127.0.0.1:{port}/docs", tmp_path / "retrieval.log", timeout=60)
    try:
        url = f"http://127.0.0.1:{port}"
        bad = httpx.post(url + "/retrieve", json={"queries": "nile"})
        assert bad.status_code == 400 and "queries" in bad.json()["detail"]
        remote = make_factory("searchqa", retriever=url)()
        local = make_factory("searchqa")()
        for env in (remote, local):
            env.reset(1)
        query = "<search>White Nile Blue Nile</search>"
        assert remote.step(query).observation == local.step(query).observation
    finally:
        stop_server(proc)
    with pytest.raises(EnvError, match="retrieval service"):
        remote.step(query)
    out = subprocess.run([sys.executable, "-m", "env_servers.retrieval", "--corpus", "/nope.jsonl"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "/nope.jsonl" in out.stderr


# ---------------------------------------------------------------- textcraft


def test_textcraft_items_and_a_solved_episode():
    from env_servers.textcraft import TextCraftEnv

    make = make_factory("textcraft")
    env, other = make(), make()
    assert isinstance(env, TextCraftEnv) and len(env) == 17
    assert env.reset(9).text == other.reset(9).text == env.reset(9 + 17).text  # ids wrap; the same task every time
    obs = env.reset(11)  # stick: depth 2 (logs → planks → sticks)
    assert obs.text.startswith("Crafting commands:\n") and obs.text.endswith("\n\nGoal: craft stick.")
    assert "craft 4 stick using 2 planks" in obs.text.split("\n")
    steps = [("get 1 oak logs", "Got 1 oak logs"), ("craft 4 oak planks using 1 oak logs", "Crafted 4 minecraft:oak_planks"),
             ("inventory", "Inventory: [oak planks] (4) "), ("craft 4 stick using 2 oak planks", "Crafted 4 minecraft:stick")]  # fmt: skip
    for action, expected in steps:
        step = env.step(action)
        assert step.observation == expected
    assert (step.reward, step.done, step.info["success"]) == (1, True, True)
    assert env.step("inventory").observation == "Inventory: [oak planks] (2) [stick] (4) "  # steps after done: allowed


def test_textcraft_refusals():
    env = make_factory("textcraft")()
    env.reset(11)
    assert env.step("inventory").observation == "Inventory: You are not carrying anything."
    assert env.step("get 2 stick").observation == "Could not find stick"  # craftable: not to be got
    assert env.step("get 1 diamond").observation == "Could not find diamond"
    assert env.step("get 1 planks").observation == "Could not find planks"  # a kind, not an item
    assert (
        env.step("craft 4 stick using 2 oak planks").observation
        == "Could not find enough items to craft minecraft:stick"
    )
    assert env.step("craft 4 stick using oak planks").observation == "Wrong item format: oak planks"
    assert env.step("get 3 oak planks").observation == "Could not find oak planks"  # craftable
    env.step("get 2 oak logs")
    assert env.step("craft 4 oak planks using 2 oak logs").observation == (  # the recipe takes 1
        "Could not find a valid recipe for "
        "ItemTagWithCount(item_tag=ItemTag(tag=None, item_id='minecraft:oak_planks'), count=4)"
    )
    assert env.step("dance").observation == "Could not execute dance"
    step = env.step("Craft 4 stick using 2 oak planks")  # case matters, as upstream
    assert step.observation.startswith("Could not execute") and step.reward == 0 and not step.done


def test_textcraft_data_errors(tmp_path):
    with pytest.raises(EnvError, match="recipes"):
        make_factory("textcraft", str(tmp_path))
    (tmp_path / "recipes").mkdir()
    with pytest.raises(EnvError, match="no recipe files"):
        make_factory("textcraft", str(tmp_path))
