"""OpenAI's completions and chat completions over token-level completions: prompts to token ids (the chat template),
and completions back to OpenAI answers (stop strings, logprobs, usage, the streamed parts). Pure functions of a
tokenizer; the rollout service's routes call them. Bad input raises HTTPException (4xx).
"""

from __future__ import annotations

import time
import uuid
from itertools import accumulate
from typing import Any

from fastapi import HTTPException

from rollout import payloads as P
from rollout.api import Completion


def tokenize(tokenizer: Any, req: P.CompletionsRequest) -> list[list[int]]:
    prompts = []
    for p in req.prompt_list():
        ids = tokenizer(p)["input_ids"] if isinstance(p, str) else p
        if not ids:
            raise HTTPException(400, "a prompt tokenized to zero tokens")
        prompts.append(ids)
    return prompts


def render_chat(tokenizer: Any, req: P.ChatCompletionsRequest) -> list[int]:
    messages = [m.as_template_input() for m in req.messages]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # jinja raises for roles or orders the template refuses: the caller's input
        raise HTTPException(400, f"the chat template refused these messages: {err}") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _cut_at_stop(tokenizer, ids: list[int], stops: list[str]) -> int:
    """Fewest leading tokens whose text contains a stop string (the text grows with the prefix, so bisect)."""
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if P.first_stop(tokenizer.decode(ids[:mid], skip_special_tokens=True), stops) is None:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _finish(tokenizer, c: Completion, stops: list[str]) -> tuple[str, str, list[int], list[float], int]:
    """(text, finish reason, token ids, logprobs, tokens generated) of a completion, cut before the first stop
    string. The ending special token (EOS, end of turn) is generated but not part of the text: its id and logprob
    are left out too, so the logprob list matches the returned text."""
    ids, logprobs, finish = c.token_ids, list(c.logprobs), c.finish_reason
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cut = P.first_stop(text, stops) if stops else None
    if cut is not None:
        keep = _cut_at_stop(tokenizer, ids, stops)
        ids, logprobs, text, finish = ids[:keep], logprobs[:keep], text[:cut], "stop"
    generated = len(ids)
    special = set(tokenizer.all_special_ids)
    while ids and ids[-1] in special:
        ids, logprobs = ids[:-1], logprobs[:-1]
    return text, finish, ids, logprobs, generated


def _text_parts(tokenizer, ids: list[int], text: str) -> list[str]:
    """`text` split at token boundaries, one part per id, the parts concatenating to `text` (for streaming): each
    boundary is the length of the decoded prefix, clipped to the text (a stop string may have cut it)."""
    ends = [min(len(tokenizer.decode(ids[: k + 1], skip_special_tokens=True)), len(text)) for k in range(len(ids))]
    starts = [0, *ends[:-1]]
    parts = [text[a:b] if b > a else "" for a, b in zip(starts, ends, strict=True)]
    if parts:
        parts[-1] += text[ends[-1] :]
    return parts


def openai_body(tokenizer: Any, name: str, req: P.OpenAISampling, prompts: list[list[int]], completions):
    """The answer of /v1/completions or (for a ChatCompletionsRequest) /v1/chat/completions, and per choice the
    token-sized parts of its text when the request streams."""
    chat = isinstance(req, P.ChatCompletionsRequest)
    want = req.logprobs if chat else req.logprobs is not None
    tok, choices, parts, used = tokenizer, [], [], 0
    for i, c in enumerate(completions):
        text, finish, ids, logprobs, generated = _finish(tok, c, req.stop_strings())
        pieces = [tok.decode([t]) for t in ids] if want else None
        used += generated
        if req.stream:
            parts.append(_text_parts(tok, ids, text))
        if chat:
            choices.append(P.chat_choice(i, text, finish, pieces, logprobs, req.top_logprobs or 0))
        else:
            offsets = list(accumulate((len(p) for p in pieces[:-1]), initial=0)) if pieces else []
            choices.append(P.completion_choice(i, text, finish, pieces, logprobs, offsets))
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    prompt_tokens = sum(len(p) for p in prompts)
    body = P.completions_response(request_id, int(time.time()), name, choices, prompt_tokens, used)
    return body, parts
