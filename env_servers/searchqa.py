"""SearchQA: answer a question by searching a local document collection (BM25) then answering. Multi-turn.

Actions: `search[query]` (or AgentGym-RL's `<search>query</search>`) returns the top-k passages inside
`<information>…</information>`; `answer[text]` (or `<answer>text</answer>`) ends the episode with reward = the best
token F1 against the gold answers (1.0 exactly when the normalised answer matches one: exact match is reported as
`em`). The first action in a reply counts. A reply with neither gets a hint and no reward; after `max_turns` turns
without an answer the episode ends with reward 0.

Data (`--data DIR`): `DIR/corpus.jsonl` with `{"title", "text"}` per passage (or FlashRAG's `{"contents":
"title\\ntext"}`) and `DIR/questions.jsonl` with `{"question", "answers": [...]}` (or `golden_answers`, or one
`answer` string). The repo ships a small collection under data/searchqa/ (see its LICENSE).
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from env_servers.api import Env, EnvError, Observation, StepResult
from env_servers.bm25 import BM25
from env_servers.gsm8k import check_index

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "data" / "searchqa"
INSTRUCTIONS = (
    "Answer the question using a search engine over a document collection. Each turn, reason briefly, then write "
    "exactly one action and stop: search[your query] to see the top passages, or answer[your short answer] to give "
    "the final answer (a few words).\n\nQuestion: {question}"
)
_PUNCTUATION = frozenset(string.punctuation)
_ACTION = re.compile(r"\b(search|answer)\[(.*?)\]|<(search|answer)>(.*?)</\3>", re.DOTALL | re.IGNORECASE)


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
    """('search'|'answer', argument) for the first action in a reply, or None."""
    m = _ACTION.search(text)
    if m is None:
        return None
    kind = (m.group(1) or m.group(3)).lower()
    return kind, (m.group(2) if m.group(1) else m.group(4)).strip()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"searchqa data not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not JSON ({e})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object")
                rows.append(row)
    return rows


def load_corpus(path: Path) -> list[tuple[str, str]]:
    """(title, text) per passage."""
    docs = []
    for row in _read_jsonl(path):
        if "contents" in row:
            title, _, text = str(row["contents"]).partition("\n")
        else:
            title, text = str(row.get("title", "")), str(row.get("text", ""))
        docs.append((title.strip(), text.strip()))
    return docs


def load_questions(path: Path) -> list[dict[str, Any]]:
    out = []
    for i, row in enumerate(_read_jsonl(path), 1):
        answers = row.get("answers", row.get("golden_answers", row.get("answer")))
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(row.get("question"), str) or not answers:
            raise ValueError(f"{path}:{i}: needs a 'question' string and 'answers' (a list or a string)")
        out.append({"question": row["question"], "answers": [str(a) for a in answers]})
    return out


class Retriever:
    """BM25 over (title, text) passages; `search` formats the top k as AgentGym-RL's searchqa does."""

    def __init__(self, docs: list[tuple[str, str]], k: int = 3):
        self.docs, self.k = docs, k
        self.index = BM25([f"{title} {text}" for title, text in docs])

    def search(self, query: str) -> str:
        hits = self.index.search(query, self.k)
        if not hits:
            return "No passages match the query."
        return "\n".join(f"Doc {n} (Title: {self.docs[d][0]}) {self.docs[d][1]}" for n, (d, _) in enumerate(hits, 1))


class SearchQAEnv(Env):
    name = "searchqa"

    def __init__(self, questions: list[dict[str, Any]], retriever: Retriever, max_turns: int = 8):
        self.questions, self.retriever, self.max_turns = questions, retriever, max_turns
        self._idx: int | None = None
        self._turns = 0
        self._done = False

    def __len__(self) -> int:
        return len(self.questions)

    def reset(self, idx: int) -> Observation:
        self._idx, self._turns, self._done = check_index(idx, len(self.questions)), 0, False
        return Observation(self.observation(), {"data_idx": idx})

    def step(self, action: str) -> StepResult:
        if self._idx is None:
            raise EnvError("call reset before step")
        if self._done:
            raise EnvError("episode is done: call reset to start another")
        self._turns, parsed = self._turns + 1, parse_action(action)
        info: dict[str, Any] = {"turns": self._turns}
        if parsed and parsed[0] == "answer":
            info.update(score_answer(parsed[1], self.questions[self._idx]["answers"]), answer=parsed[1])
            self._done = True
            return StepResult("", info["f1"], True, info)
        if parsed and parsed[0] == "search":
            obs = f"<information>{self.retriever.search(parsed[1])}</information>"
        else:
            obs = "No action found. Write search[your query] to search, or answer[your answer] to answer."
        self._done = self._turns >= self.max_turns
        return StepResult(obs, 0.0, self._done, info)

    def observation(self) -> str:
        if self._idx is None:
            raise EnvError("no observation: call reset first")
        return INSTRUCTIONS.format(question=self.questions[self._idx]["question"])


def factory(data: str | None = None, top_k: int = 3, max_turns: int = 8) -> Callable[[], Env]:
    """`data`: a folder holding corpus.jsonl and questions.jsonl (default: the shipped data/searchqa)."""
    folder = Path(data) if data else DEFAULT_DATA
    retriever = Retriever(load_corpus(folder / "corpus.jsonl"), top_k)
    questions = load_questions(folder / "questions.jsonl")
    return lambda: SearchQAEnv(questions, retriever, max_turns)
