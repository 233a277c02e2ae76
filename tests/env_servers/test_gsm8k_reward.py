"""GSM8K reward: answer forms, strict vs lenient, format reward, thread safety, the loader and the single-turn env."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from env_servers.api import EnvError
from env_servers.gsm8k import GSM8KEnv, extract_answer, gold_answer, load_gsm8k, score
from tests.conftest import ROOT

GOLD = "She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18"


@pytest.mark.parametrize(
    "text, correct, strict",
    [
        ("#### 18", True, False),
        ("The answer is 18.", True, False),
        ("So she makes $18", True, False),
        ("so \\boxed{18}", True, True),
        ("$\\boxed{18}$ dollars", True, True),
        ("\\boxed{\\frac{36}{2}}", True, True),
        ("\\boxed{36/2}", True, True),
        ("\\boxed{18.0}", True, True),
        ("\\boxed{\\$18}", True, True),
        ("\\boxed{18 \\text{ dollars}}", True, True),
        ("first 17, then 18", True, False),
        ("\\boxed{17}", False, False),
        ("18 at first, but finally 17", False, False),
        ("I cannot tell.", False, False),
        ("", False, False),
        ("\\boxed{18} was wrong, it is \\boxed{19}", False, False),  # the last box counts
        ("\\boxed{9^{9^{9^{9}}}}", False, False),  # refused quickly instead of hanging sympy
    ],
)
def test_answer_forms(text, correct, strict):
    result = score(text, GOLD)
    assert result["correct"] is correct
    assert result["strict"] is strict
    assert result["reward"] == (1.0 if correct else 0.0)


def test_commas_in_gold_and_prediction():
    assert score("They sold 1,800 cups.", "#### 1,800")["correct"]
    assert score("\\boxed{1,800}", "#### 1800")["strict"]
    assert not score("They sold 1,800 cups.", "#### 18")["correct"]
    assert score("a loss of -5 dollars", "#### -5")["correct"]


def test_format_reward_added_only_for_boxed():
    assert score("\\boxed{17}", GOLD, format_reward=0.25) == {
        "reward": 0.25,
        "correct": False,
        "format_ok": True,
        "strict": False,
        "pred": "17",
    }
    assert score("\\boxed{18}", GOLD, format_reward=0.25)["reward"] == 1.25
    assert score("18", GOLD, format_reward=0.25)["reward"] == 1.0
    assert score("\\boxed{} 18", GOLD, format_reward=0.25)["format_ok"] is False  # an empty box is no answer


def test_extract_answer():
    assert extract_answer("x \\boxed{\\frac{1}{2}} y") == "\\frac{1}{2}"
    assert extract_answer("\\boxed{a{b}c} 7") == "a{b}c"
    assert extract_answer("\\boxed{12 then 3") == "3"  # unclosed box: fall back to the last number
    assert extract_answer("1,234,567 and 2.5") == "2.5"
    assert extract_answer("nothing here") is None
    assert gold_answer("work\n#### 1,234") == "1234"


def test_scoring_from_eight_threads():
    """math-verify's signal-based timeouts would raise off the main thread; ours must not."""
    cases = [("\\boxed{\\frac{36}{2}}", True), ("\\boxed{17}", False), ("x = 18", True), ("\\boxed{x = 18}", True)] * 8
    errors: list[BaseException] = []

    def run(case):
        assert threading.current_thread() is not threading.main_thread()
        try:
            return score(case[0], GOLD)["correct"] == case[1]
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)
            return False

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, cases))
    assert not errors
    assert all(results)


def test_load_gsm8k_shipped_and_bad(tmp_path):
    items = load_gsm8k(ROOT / "data" / "gsm8k", "test")
    assert len(items) == 1319
    assert items[0]["answer"].endswith("#### 18")
    assert len(load_gsm8k(ROOT / "data" / "gsm8k" / "train.jsonl")) == 7473
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_gsm8k(bad)
    with pytest.raises(FileNotFoundError):
        load_gsm8k(tmp_path / "missing.jsonl")


def test_env_single_turn():
    env = GSM8KEnv([{"question": "2+2?", "answer": "#### 4"}, {"question": "3+3?", "answer": "#### 6"}], 0.5)
    assert len(env) == 2
    with pytest.raises(EnvError):
        env.step("4")
    assert env.reset(1).text == "3+3?"
    result = env.step("\\boxed{6}")
    assert (result.reward, result.done, result.info["strict"]) == (1.5, True, True)
    with pytest.raises(EnvError, match="done"):
        env.step("6")
    assert env.reset(0).text == "2+2?"
    assert env.step("5").reward == 0.0
    for bad in (2, -1, "0", True):
        with pytest.raises(EnvError):
            env.reset(bad)


def test_verifier_imported_by_the_scorers_setup_not_by_the_module():
    """Importing the module stays light (tools that only need the prompt template); building the env factory or the
    trainer's default workflow imports math-verify up front, so no step pays its ~1 s import mid-rollout."""
    code = (
        "import sys\n"
        "import env_servers.gsm8k as g\n"
        "print('math_verify' in sys.modules)\n"
        "g.factory()\n"
        "print('math_verify' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split()
    assert out == ["False", "True"]
    code = "import sys\nfrom trainer.workflow import SingleTurnWorkflow\nSingleTurnWorkflow(None, None)\nprint('math_verify' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert run.stdout.strip() == "True"
