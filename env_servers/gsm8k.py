"""GSM8K: answer extraction, the reward, a pure-Python JSONL loader and a single-turn `Env`. No torch.

Lenient correctness: the last `\\boxed{}` value (or, when there is no box, the last number in the text) equals the
gold answer according to math-verify. Strict: the answer was inside `\\boxed{}` and is correct.

math-verify's own timeouts use `signal.alarm`, which only works on the main thread; rewards are scored from worker
threads (the env server's threadpool, the trainer's workers), so its timeouts are always off and `_sympy_safe` keeps
inputs that could make sympy run for ever (towers of powers, factorials) away from it.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from env_servers.api import Env, EnvError, Observation, StepResult

_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_EXPONENT = re.compile(r"(?:\^|\*\*)\s*(\{[^{}]*\}|\S)")
_MAX_ANSWER_CHARS = 100


class _DropTimeoutWarning(logging.Filter):
    """math-verify warns on every call made with timeouts off; we turn them off on purpose (see module doc)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutWarning())


def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (nested braces allowed); None when there is none or it is unclosed."""
    matches = list(_BOX.finditer(text))
    for match in reversed(matches):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def _last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def extract_answer(text: str) -> str | None:
    """The answer a completion gives: its last non-empty `\\boxed{}` content, else its last number (commas removed)."""
    boxed = _last_boxed(text)
    return boxed if boxed else _last_number(text)


def gold_answer(answer: str) -> str:
    """The number after `####` in a GSM8K answer field (the whole field when there is no `####`), commas removed."""
    return answer.split("####")[-1].strip().replace(",", "")


def _sympy_safe(expr: str) -> bool:
    """False for inputs sympy may take unbounded time on: long strings, factorials, nested or long exponents."""
    if len(expr) > _MAX_ANSWER_CHARS or "!" in expr:
        return False
    exponents = _EXPONENT.findall(expr)
    return len(exponents) <= 1 and all(len(e.strip("{}").strip()) <= 3 for e in exponents)


def _as_decimal(s: str) -> Decimal | None:
    if not _PLAIN_NUMBER.fullmatch(s):
        return None
    try:
        return Decimal(s)
    except InvalidOperation:
        return None


@functools.cache
def load_verifier() -> tuple[Callable, Callable]:
    """math-verify's (parse, verify), imported on first use: sympy takes ~1 s to import, which tools that only
    need the prompt template should not pay. Whoever scores calls this up front (`factory`, the trainer's workflow),
    so the import does not land in the middle of the first step whose completions hold a number."""
    from math_verify import parse, verify

    return parse, verify


def answers_match(pred: str, gold: str) -> bool:
    """Whether `pred` (a boxed content or a number) equals the gold answer, by value."""
    parse, verify = load_verifier()
    pred_num, gold_num = _as_decimal(pred.replace(",", "")), _as_decimal(gold)
    if pred_num is not None and gold_num is not None:
        return pred_num == gold_num
    if not _sympy_safe(pred):
        return False
    parsed_gold = parse(gold, parsing_timeout=None)
    parsed_pred = parse("\\boxed{" + pred + "}", parsing_timeout=None)
    return bool(parsed_pred) and verify(parsed_gold, parsed_pred, timeout_seconds=None)


def score(completion_text: str, gold: str, format_reward: float = 0.0) -> dict[str, Any]:
    """Reward one completion against a gold answer (a `#### N` field or a bare number). Safe from any thread.

    Returns reward (1.0 if correct, plus `format_reward` when a `\\boxed{}` answer is present), correct (lenient),
    format_ok (a non-empty `\\boxed{}` is present), strict (boxed and correct) and the extracted answer.
    """
    pred = extract_answer(completion_text)
    correct = pred is not None and answers_match(pred, gold_answer(gold))
    format_ok = bool(_last_boxed(completion_text))
    reward = (1.0 if correct else 0.0) + (format_reward if format_ok else 0.0)
    return {"reward": reward, "correct": correct, "format_ok": format_ok, "strict": correct and format_ok, "pred": pred}


def load_gsm8k(path: str | Path, split: str | None = None) -> list[dict[str, str]]:
    """Read GSM8K-style JSONL (`question`, `answer`). `path` is a .jsonl file or a folder holding `<split>.jsonl`."""
    path = Path(path)
    if path.is_dir():
        path = path / f"{split or 'train'}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"GSM8K data not found: {path}")
    items = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                items.append({"question": str(row["question"]), "answer": str(row["answer"])})
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with question and answer ({e})") from None
    return items


def check_index(idx: object, size: int) -> int:
    """`idx` if it is a valid dataset index, else EnvError (the server's 400)."""
    if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < size:
        raise EnvError(f"data index must be an integer in [0, {size}), got {str(idx)[:50]!r}")
    return idx


class GSM8KEnv(Env):
    """Single turn: `reset(idx)` shows question `idx`; `step(completion)` scores it and ends the episode."""

    name = "gsm8k"

    def __init__(self, items: list[dict[str, str]], format_reward: float = 0.0):
        self.items = items
        self.format_reward = format_reward
        self._idx: int | None = None
        self._done = False

    def __len__(self) -> int:
        return len(self.items)

    def reset(self, idx: int) -> Observation:
        self._idx, self._done = check_index(idx, len(self.items)), False
        return Observation(self.items[idx]["question"], {"data_idx": idx})

    def step(self, action: str) -> StepResult:
        if self._idx is None:
            raise EnvError("call reset before step")
        if self._done:
            raise EnvError("episode is done: call reset to start another")
        result = score(action, self.items[self._idx]["answer"], self.format_reward)
        self._done = True
        return StepResult("", result.pop("reward"), True, result)

    def observation(self) -> str:
        if self._idx is None:
            raise EnvError("no observation: call reset first")
        return self.items[self._idx]["question"]


DEFAULT_DATA = Path(__file__).resolve().parent.parent / "data" / "gsm8k" / "test.jsonl"
_ANNOTATION = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator calls, e.g. <<48/2=24>>: never seen at test time


def solution_text(answer: str) -> str:
    """A GSM8K answer field → the completion a model should learn: reasoning lines, then the boxed final answer."""
    reasoning = _ANNOTATION.sub("", answer.rsplit("####", 1)[0]).strip()
    final = f"The final answer is \\boxed{{{gold_answer(answer)}}}."
    return f"{reasoning}\n{final}" if reasoning else final


# The user turn a GSM8K question is asked in, by default (the trainer's data.prompt_template and the eval runner's):
# one definition, so training-time and standalone eval numbers are comparable.
PROMPT_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."


def factory(data: str | None = None, format_reward: float = 0.0) -> Callable[[], Env]:
    """Load the data once; return a constructor of env slots sharing it (used by the server and the adapter)."""
    items = load_gsm8k(data or DEFAULT_DATA, "test")
    load_verifier()
    return lambda: GSM8KEnv(items, format_reward)
