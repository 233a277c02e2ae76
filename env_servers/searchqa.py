"""SearchQA as AgentGym's searchqa server plays it: search a document collection, answer, try again if wrong.

Actions (the first `<search>…</search>` or `<answer>…</answer>` in a reply): search returns the top 3 passages inside
`<information>…</information>`; an answer is scored by exact match (normalised: lower case, no punctuation or
articles) of the reply's *last* `<answer>` against the gold answers: right → reward 1, "Congratulations! …", done;
wrong → reward 0, "Sorry, your answer is incorrect. Please try again.", not done. A reply with neither gets the
"invalid action" message. Episodes end only on a right answer (the client's round limit stops the others); rldock's
opt-ins: `max_turns` (end after that many turns) and F1 (reported in `info`, which stays off the wire).

Data: `--data DIR` holds `corpus.jsonl` (`{"contents": "title\ntext"}` or `{"title", "text"}` per passage) and
`questions.jsonl` (`{"question", "answers": [...]}`; `golden_answers`, `answer` and Search-R1's
`reward_model.ground_truth.target` are read too). `questions` may instead name question files (JSONL or parquet),
concatenated in order: AgentGym-RL's ids are `queries/test.parquet,queries/train.parquet` (test 0-51712, then train).
`retriever` picks the search backend (`env_servers.retrieval`): BM25 over the corpus by default, a Search-R1-style
/retrieve URL (AgentGym-RL's e5 Wikipedia index), or a Lucene index folder. The repo ships a small collection under
data/searchqa/ (see its LICENSE).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from env_servers.api import Env, EnvError, Observation, StepResult
from env_servers.gsm8k import check_index
from env_servers.protocol import Wire
from env_servers.retrieval import Retriever, make_retriever, read_jsonl

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "data" / "searchqa"
TOP_K = 3  # AgentGym's server always asks its retriever for 3
INSTRUCTIONS = (  # AgentGym's searchqa observation: the prompt with the question
    "You must reason inside <think>...</think> first. If you do not have enough knowledge, issue a "
    "<search>...</search> and then STOP. Do not generate <information> or <answer> yet. Wait for external input "
    "wrapped in <information>...</information>. After receiving information, reason again in <think>. If confident, "
    "output your final answer in <answer>...</answer>. Do not output <answer> before receiving <information> unless "
    "you are fully confident. If you find no further external knowledge needed, you can directly provide the answer "
    "inside <answer> and </answer>, without detailed illustrations. For example, <answer> Beijing </answer>. Follow "
    "this process every time.\n\n Question: {question}"
)
RIGHT = "Congratulations! You have answered the question correctly."
WRONG = "Sorry, your answer is incorrect. Please try again."
INVALID = (
    "Your previous action is invalid. If you want to search, you should put the query between <search> and "
    "</search>. If you want to give the final answer, you should put the answer between <answer> and </answer>. "
    "Please try again."
)
WIRE = Wire(bare=True, step_keys=("observation", "reward", "done"), step_after_done=True, error_status=500, info=False)
_PUNCTUATION = frozenset(string.punctuation)
_ACTION = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and articles, collapse spaces (the usual QA answer normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def f1_score(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if not p or not g or common == 0:
        return float(p == g)
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def score_answer(pred: str, golds: list[str]) -> dict[str, Any]:
    em = any(normalize_answer(pred) == normalize_answer(g) for g in golds)
    return {"em": em, "f1": max((f1_score(pred, g) for g in golds), default=0.0)}


def parse_action(text: str) -> tuple[str, str] | None:
    """('search'|'answer', content) for the first tagged action in a reply, or None."""
    m = _ACTION.search(text)
    return None if m is None else (m.group(1), m.group(2).strip())


def last_answer(text: str) -> str | None:
    """The reply's last <answer> (the one AgentGym scores)."""
    answers = _ANSWER.findall(text)
    return answers[-1].strip() if answers else None


def load_questions(path: Path) -> list[dict[str, Any]]:
    """Questions of a JSONL or parquet file: {"question", "answers"} per row."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise EnvError("parquet question files need the pyarrow package") from None
        rows = pq.read_table(path).to_pylist()
    else:
        rows = read_jsonl(path)
    out = []
    for i, row in enumerate(rows, 1):
        target = ((row.get("reward_model") or {}).get("ground_truth") or {}).get("target")
        answers = target if target is not None else row.get("answers", row.get("golden_answers", row.get("answer")))
        answers = [answers] if isinstance(answers, str) else list(answers or [])
        if not isinstance(row.get("question"), str) or not answers:
            raise ValueError(f"{path}:{i}: needs a 'question' string and answers (a list or a string)")
        out.append({"question": row["question"], "answers": [str(a) for a in answers]})
    return out


def format_passages(passages: list[str]) -> str:
    """AgentGym's rendering of search results: "Doc i(Title: <first line>) <the rest>" per passage."""
    out = ""
    for i, contents in enumerate(passages, 1):
        title, _, text = contents.partition("\n")
        out += f"Doc {i}(Title: {title}) {text}\n"
    return out


class SearchQAEnv(Env):
    name = "searchqa"

    def __init__(self, questions: list[dict[str, Any]], retriever: Retriever, max_turns: int | None = None):
        self.questions, self.retriever, self.max_turns = questions, retriever, max_turns
        self._idx: int | None = None
        self._turns = 0

    def __len__(self) -> int:
        return len(self.questions)

    def reset(self, idx: int) -> Observation:
        self._idx, self._turns = check_index(idx, len(self.questions)), 0
        return Observation(self.observation(), {"data_idx": idx})

    def step(self, action: str) -> StepResult:
        if self._idx is None:
            raise EnvError("call reset before step")
        self._turns, parsed = self._turns + 1, parse_action(action)
        info: dict[str, Any] = {"turns": self._turns}
        reward, done = 0, False
        if parsed is None:
            obs = INVALID
        elif parsed[0] == "search":
            obs = f"<information>{format_passages(self.retriever.search(parsed[1], TOP_K)).strip()}</information>"
        else:
            answer = last_answer(action) or ""
            info.update(score_answer(answer, self.questions[self._idx]["answers"]), answer=answer)
            reward, done = int(info["em"]), info["em"]
            obs = RIGHT if done else WRONG
        if self.max_turns is not None and self._turns >= self.max_turns:
            done = True
        return StepResult(obs, reward, done, info)

    def observation(self) -> str:
        if self._idx is None:
            raise EnvError("no observation: call reset first")
        return INSTRUCTIONS.format(question=self.questions[self._idx]["question"].strip())


def factory(
    data: str | None = None, max_turns: int | None = None, questions: str | None = None, retriever: str | None = None
) -> Callable[[], Env]:
    """`data`: a folder holding corpus.jsonl and questions.jsonl (default: the shipped data/searchqa); `questions`:
    comma-separated question files instead (their rows in order are the item ids); `retriever`: see the module."""
    folder = Path(data) if data else DEFAULT_DATA
    files = [Path(q.strip()) for q in questions.split(",") if q.strip()] if questions else [folder / "questions.jsonl"]
    rows = [q for f in files for q in load_questions(f)]
    search = make_retriever(retriever, folder / "corpus.jsonl")
    return lambda: SearchQAEnv(rows, search, max_turns)
