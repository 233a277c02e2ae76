"""Retrievers behind one small contract, for searchqa. No torch: a dense index runs behind HTTP, in its own process.

- `BM25Retriever`: the shipped default, pure Python over a corpus.jsonl (data/searchqa's mini collection, or any).
- `HTTPRetriever`: a retrieval service speaking Search-R1's `POST /retrieve {"queries", "topk", "return_scores"}`,
  the one AgentGym-RL's Wikipedia e5 index is served by (its retrieval_server.py), or rldock's own
  `python -m env_servers.retrieval` below.
- `PyseriniRetriever`: a Lucene index folder, when the `pyserini` package is installed.
A passage is its "contents": the title on the first line, the text after it (FlashRAG's corpus format).
`make_retriever(spec, corpus)` is the one place a spec string becomes a retriever.

`python -m env_servers.retrieval --corpus FILE [--port 8000]` serves a BM25 index over /retrieve, so several env
servers (or replicas) can share one index.
"""

from __future__ import annotations

import abc
import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request

from env_servers.api import EnvError
from env_servers.bm25 import BM25


class Retriever(abc.ABC):
    @abc.abstractmethod
    def search(self, query: str, k: int) -> list[str]:
        """The contents of the top `k` passages for `query`, best first."""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, one per non-empty line; ValueError naming the line otherwise."""
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


def load_corpus(path: Path) -> list[str]:
    """Passage contents ("title\\ntext") from `{"contents"}` or `{"title", "text"}` rows."""
    out = []
    for row in read_jsonl(path):
        if "contents" in row:
            out.append(str(row["contents"]))
        else:
            out.append(f"{str(row.get('title', '')).strip()}\n{str(row.get('text', '')).strip()}")
    return out


class BM25Retriever(Retriever):
    def __init__(self, passages: list[str]):
        self.passages = passages
        self.index = BM25(passages)

    def search(self, query: str, k: int) -> list[str]:
        return [self.passages[d] for d, _ in self.index.search(query, k)]


class HTTPRetriever(Retriever):
    """A Search-R1-style retrieval service at `url` (its base, or the full /retrieve address)."""

    def __init__(self, url: str, timeout: float = 60.0):
        import httpx

        self.url = url if url.rstrip("/").endswith("/retrieve") else url.rstrip("/") + "/retrieve"
        self._http = httpx.Client(timeout=timeout)

    def search(self, query: str, k: int) -> list[str]:
        import httpx

        try:
            resp = self._http.post(self.url, json={"queries": [query], "topk": k, "return_scores": True})
            resp.raise_for_status()
            hits = resp.json()["result"][0]
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
            raise EnvError(f"retrieval service {self.url} failed: {type(e).__name__}: {str(e)[:200]}") from None
        return [str((h.get("document", h) if isinstance(h, dict) else {}).get("contents", "")) for h in hits]


class PyseriniRetriever(Retriever):
    """A Lucene index built by Pyserini (its stored raw documents hold "contents")."""

    def __init__(self, index_dir: str):
        try:
            from pyserini.search.lucene import LuceneSearcher
        except ImportError:
            raise EnvError("a Lucene index needs the pyserini package (pip install pyserini) and Java") from None
        self.searcher = LuceneSearcher(index_dir)

    def search(self, query: str, k: int) -> list[str]:
        out = []
        for hit in self.searcher.search(query, k):
            raw = self.searcher.doc(hit.docid).raw()
            out.append(str(json.loads(raw).get("contents", raw)))
        return out


def make_retriever(spec: str | None, corpus: Path) -> Retriever:
    """`spec`: None or "bm25" (BM25 over `corpus`), an http(s) URL (a retrieval service), or a Lucene index folder."""
    if spec in (None, "", "bm25"):
        return BM25Retriever(load_corpus(corpus))
    if spec.startswith(("http://", "https://")):
        return HTTPRetriever(spec)
    if Path(spec).is_dir():
        return PyseriniRetriever(spec)
    raise EnvError(f"retriever {spec!r}: give 'bm25', an http(s) URL of a /retrieve service, or a Lucene index folder")


def _serve(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m env_servers.retrieval",
        description="Serve BM25 over a corpus.jsonl with Search-R1's retrieval API (POST /retrieve).",
    )
    p.add_argument("--corpus", required=True, help='JSONL of {"contents"} or {"title", "text"} passages')
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--topk", type=int, default=3, help="passages per query when a request gives no topk")
    args = p.parse_args(argv)
    try:
        retriever = BM25Retriever(load_corpus(Path(args.corpus)))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    import uvicorn

    app = FastAPI(title="rldock BM25 retrieval")

    @app.post("/retrieve")
    async def retrieve(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise HTTPException(400, "body is not valid JSON") from None
        queries, topk = body.get("queries") if isinstance(body, dict) else None, body.get("topk") or args.topk
        if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
            raise HTTPException(400, "'queries' must be a list of strings")
        if not isinstance(topk, int) or not 0 < topk <= 100:
            raise HTTPException(400, "'topk' must be an integer in 1..100")
        scores = bool(body.get("return_scores"))
        result = []
        for q in queries:
            hits = retriever.index.search(q, topk)
            docs = [({"id": str(d), "contents": retriever.passages[d]}, score) for d, score in hits]
            result.append([{"document": doc, "score": sc} for doc, sc in docs] if scores else [d for d, _ in docs])
        return {"result": result}

    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    _serve()
