"""A small BM25 retriever in pure Python (an inverted index in dicts): fine for collections up to ~10^5 passages.

Okapi BM25 with the usual k1 = 1.5, b = 0.75 and the non-negative idf log(1 + (N - df + 0.5) / (df + 0.5)).
Tokens: lower-cased alphanumeric runs, minus a short English stop-word list.
"""

from __future__ import annotations

import heapq
import math
import re
from collections import Counter

_TOKEN = re.compile(r"[a-z0-9]+")
STOPWORDS = frozenset(
    "a an and are as at be by did do does for from had has have how in is it its of on or that the this to was "
    "were what when where which who whom whose why with".split()
)


def tokenize(text: str) -> list[str]:
    return [t for t in _TOKEN.findall(text.lower()) if t not in STOPWORDS]


class BM25:
    """Index `docs` (strings) once; `search(query, k)` returns [(doc index, score)] best first, score > 0 only."""

    def __init__(self, docs: list[str], k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        self.doc_len: list[int] = []
        self.postings: dict[str, list[tuple[int, int]]] = {}
        for i, doc in enumerate(docs):
            counts = Counter(tokenize(doc))
            self.doc_len.append(sum(counts.values()))
            for term, tf in counts.items():
                self.postings.setdefault(term, []).append((i, tf))
        n = len(docs)
        self.avg_len = (sum(self.doc_len) / n) if n else 0.0
        self.idf = {t: math.log(1 + (n - len(p) + 0.5) / (len(p) + 0.5)) for t, p in self.postings.items()}

    def __len__(self) -> int:
        return len(self.doc_len)

    def search(self, query: str, k: int = 3) -> list[tuple[int, float]]:
        scores: dict[int, float] = {}
        for term in set(tokenize(query)):
            idf = self.idf.get(term)
            if idf is None:
                continue
            for doc, tf in self.postings[term]:
                norm = self.k1 * (1 - self.b + self.b * self.doc_len[doc] / (self.avg_len or 1.0))
                scores[doc] = scores.get(doc, 0.0) + idf * tf * (self.k1 + 1) / (tf + norm)
        # ties broken by document order, so results are deterministic
        return [(d, s) for d, s in heapq.nsmallest(k, scores.items(), key=lambda kv: (-kv[1], kv[0])) if s > 0]
