"""Request and response bodies of the rollout service, built, validated and parsed by pure functions.

No torch and no I/O: the server validates with these models, the HTTP client builds its bodies with them, and the
tests check them without a server. Routes are described in rollout/server.py.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rollout.api import Completion, Count, SamplingParams, Temperature, TopK, TopP

TokenId = Annotated[int, Field(ge=0)]
Prompt = Annotated[list[TokenId], Field(min_length=1)]

# Bytes per element of every dtype a weight manifest may name (torch dtype names).
DTYPE_BYTES = {
    "float64": 8,
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}


class WeightSyncError(RuntimeError):
    """A weight-sync call out of order (e.g. an nccl update before /init_weight_sync): the service answers 409."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerateRequest(Strict):
    """POST /generate: token ids in, `len(prompts) * n` completions out (grouped by prompt)."""

    prompts: list[Prompt] = Field(min_length=1)
    n: Count = 1
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    max_new_tokens: Count = 256
    stop_token_ids: list[TokenId] = Field(default_factory=list)
    seed: int | None = None

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.model_dump(exclude={"prompts"}))


# OpenAI fields this service does not implement, with the values that change nothing: any other value is refused
# (400, naming the field) rather than silently ignored, since it would change the answer a client expects.
UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "repetition_penalty": (1, 1.0),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "best_of": (1,),
    "suffix": ("",),
    "prediction": (),
    "audio": (),
    "modalities": (["text"],),
    "reasoning_effort": (),
    "web_search_options": (),
}
# Fields that change nothing about the answer: accepted and ignored.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAISampling(BaseModel):
    """Sampling fields shared by the OpenAI routes. Unknown fields are kept so that `refused_field` can name the
    ones that would change the answer (a client asking for tools must not get a plain answer as if it worked)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: Count | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    n: Count = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] = Field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def refused_field(self) -> str | None:
        """One line naming the first field this service cannot honour, or None."""
        for name, value in (self.model_extra or {}).items():
            if name in IGNORED_FIELDS or value is None or value in UNSUPPORTED_FIELDS.get(name, ()):
                continue
            what = "is not supported by this service" if name in UNSUPPORTED_FIELDS else "is not an OpenAI field here"
            return f"'{name}' {what} (leave it out; DOCS.md, Rollout service API, lists what is honoured)"
        return None

    @model_validator(mode="after")
    def _stops(self):
        if any(s == "" for s in self.stop_strings()):
            raise ValueError("stop strings must be non-empty")
        return self

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        return SamplingParams(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_tokens or default_max_tokens,
            stop_token_ids=list(self.stop_token_ids),
            seed=self.seed,
        )


class CompletionsRequest(OpenAISampling):
    """POST /v1/completions, the OpenAI legacy completions body (max_tokens defaults to 16, as OpenAI's)."""

    prompt: str | list[str] | list[TokenId] | list[Prompt]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: Literal[False] = False

    @model_validator(mode="after")
    def _non_empty(self) -> CompletionsRequest:
        prompts = self.prompt_list()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompt must be a non-empty string, list of strings or list of token ids")
        return self

    def prompt_list(self) -> list[str | list[int]]:
        """The prompts as a list, each a string or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [list(self.prompt)]
        return list(self.prompt)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str = Field(min_length=1)
    content: str | list[TextPart] | None = None

    def as_template_input(self) -> dict[str, str]:
        content = self.content or ""
        if not isinstance(content, str):
            content = "".join(part.text for part in content)
        return {"role": self.role, "content": content}


class ChatCompletionsRequest(OpenAISampling):
    """POST /v1/chat/completions: the model's chat template renders `messages` with a generation prompt.
    max_tokens (or max_completion_tokens) defaults to 512 here."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _one_limit(self) -> ChatCompletionsRequest:
        self.max_tokens = self.max_tokens or self.max_completion_tokens
        return self


class TensorSpec(Strict):
    """One entry of a weight manifest: what the next bytes of a broadcast are."""

    name: str = Field(min_length=1)
    shape: list[Annotated[int, Field(ge=0)]]
    dtype: Literal[tuple(DTYPE_BYTES)]  # type: ignore[valid-type]


class UpdateWeightsRequest(Strict):
    """POST /update_weights. disk: `path` is an HF safetensors folder the service can read (a shared volume).
    nccl: the service receives `manifest` as uint8 buckets of at most `bucket_bytes` broadcast from rank 0 of the
    group opened by POST /init_weight_sync. `version=None` bumps the service's version by one."""

    method: Literal["disk", "nccl"] = "disk"
    path: str | None = None
    version: int | None = Field(None, ge=0)
    manifest: list[TensorSpec] | None = None
    bucket_bytes: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _complete(self) -> UpdateWeightsRequest:
        if self.method == "disk" and not self.path:
            raise ValueError("method 'disk' needs 'path' (an HF safetensors folder on a volume the service can read)")
        if self.method == "nccl" and (not self.manifest or self.bucket_bytes is None):
            raise ValueError("method 'nccl' needs a non-empty 'manifest' and 'bucket_bytes'")
        return self


class InitWeightSyncRequest(Strict):
    """POST /init_weight_sync: join the trainer's process group (the trainer is rank 0 and hosts the TCP store).
    The service's workers take ranks rank_offset .. rank_offset + sync_ranks - 1."""

    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    rank_offset: int = Field(ge=1)
    world_size: int = Field(ge=2)
    backend: Literal["nccl", "gloo"] = "nccl"
    timeout_s: float = Field(600.0, gt=0)

    @model_validator(mode="after")
    def _rank_fits(self) -> InitWeightSyncRequest:
        if self.rank_offset >= self.world_size:
            raise ValueError(f"rank_offset {self.rank_offset} must be < world_size {self.world_size}")
        return self


# ---- bodies the client sends -------------------------------------------------------------------------------------


def generate_body(prompts: list[list[int]], params: SamplingParams) -> dict[str, Any]:
    return {"prompts": [list(p) for p in prompts], **params.to_dict()}


def disk_update_body(path: str, version: int | None) -> dict[str, Any]:
    return {"method": "disk", "path": path, "version": version}


def nccl_update_body(manifest: list[dict[str, Any]], bucket_bytes: int, version: int | None) -> dict[str, Any]:
    return {"method": "nccl", "manifest": manifest, "bucket_bytes": bucket_bytes, "version": version}


def init_sync_body(host: str, port: int, rank_offset: int, world_size: int, backend: str, timeout_s: float) -> dict:
    return {
        "host": host,
        "port": port,
        "rank_offset": rank_offset,
        "world_size": world_size,
        "backend": backend,
        "timeout_s": timeout_s,
    }


# ---- responses -----------------------------------------------------------------------------------------------------


def generate_response(completions: list[Completion], boot_id: str) -> dict[str, Any]:
    """The /generate answer. One request runs in one engine call, so every completion shares one version."""
    version = completions[0].weight_version if completions else None
    fields = tuple(Completion.__dataclass_fields__)
    items = [{f: getattr(c, f) for f in fields} for c in completions]  # shallow: asdict deep-copies every list
    return {"completions": items, "weight_version": version, "boot_id": boot_id}


def parse_generate_response(body: dict[str, Any], num_prompts: int, n: int) -> list[Completion]:
    """Completions from a /generate answer; raises ValueError when the answer does not match the request."""
    items = body.get("completions")
    if not isinstance(items, list) or len(items) != num_prompts * n:
        got = len(items) if isinstance(items, list) else type(items).__name__
        raise ValueError(f"expected {num_prompts * n} completions, got {got}")
    return [Completion.from_dict(item) for item in items]


def first_stop(text: str, stops: list[str]) -> int | None:
    """Index of the earliest occurrence of any stop string in text (None when there is none)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def completion_choice(
    index: int, text: str, finish_reason: str, tokens: list[str] | None, logprobs: list[float], offsets: list[int]
) -> dict[str, Any]:
    """One OpenAI choice; `tokens=None` when the request asked for no logprobs. Only the sampled token's logprob is
    known, so each position's `top_logprobs` holds that token alone."""
    lp = None
    if tokens is not None:
        top = [{t: p} for t, p in zip(tokens, logprobs, strict=True)]
        lp = {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": lp}


def completions_response(
    request_id: str, created: int, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """The body of both OpenAI routes: the object is "chat.completion" when the choices are chat choices."""
    return {
        "id": request_id,
        "object": "chat.completion" if choices and "message" in choices[0] else "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def chat_choice(
    index: int, text: str, finish_reason: str, tokens: list[str] | None, logprobs: list[float], top: int = 0
) -> dict:
    """One chat choice; `tokens=None` when the request asked for no logprobs. Only the sampled token's logprob is
    known: with `top` > 0 each position's top_logprobs holds that token alone."""
    lp = None
    if tokens is not None:
        content = []
        for t, p in zip(tokens, logprobs, strict=True):
            entry = {"token": t, "logprob": p, "bytes": list(t.encode())}
            content.append({**entry, "top_logprobs": [entry] if top else []})
        lp = {"content": content}
    message = {"role": "assistant", "content": text}
    return {"index": index, "message": message, "finish_reason": finish_reason, "logprobs": lp}


def stream_events(body: dict[str, Any], pieces: list[list[str]], include_usage: bool) -> list[str]:
    """A finished answer of either OpenAI route as server-sent events: one chunk per token of each choice (`pieces`:
    per choice, the token-sized parts of its text, which concatenate to it), a last chunk per choice with the finish
    reason, the usage chunk when asked for, then `[DONE]`."""
    chat = body["object"] == "chat.completion"
    head = {"id": body["id"], "object": "chat.completion.chunk" if chat else "text_completion"}
    head.update(created=body["created"], model=body["model"])
    extra = {"usage": None} if include_usage else {}
    chunks = []
    for choice, parts in zip(body["choices"], pieces, strict=True):
        i, lp = choice["index"], choice["logprobs"]
        if chat:
            chunks.append({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None})
        for k, part in enumerate(parts):
            chunks.append(_token_chunk(chat, i, part, lp, k))
        end = {"delta": {}} if chat else {"text": ""}
        chunks.append({"index": i, **end, "logprobs": None, "finish_reason": choice["finish_reason"]})
    events = [{**head, "choices": [{"finish_reason": None, **c}], **extra} for c in chunks]
    if include_usage:
        events.append({**head, "choices": [], "usage": body["usage"]})
    return [f"data: {json.dumps(e)}\n\n" for e in events] + ["data: [DONE]\n\n"]


def _token_chunk(chat: bool, index: int, part: str, lp: dict | None, k: int) -> dict[str, Any]:
    if chat:
        return {"index": index, "delta": {"content": part}, "logprobs": lp and {"content": [lp["content"][k]]}}
    one = lp and {key: [values[k]] for key, values in lp.items()}
    return {"index": index, "text": part, "logprobs": one}


# ---- weight manifests ----------------------------------------------------------------------------------------------


def tensor_nbytes(spec: dict[str, Any] | TensorSpec) -> int:
    spec = spec if isinstance(spec, dict) else spec.model_dump()
    numel = 1
    for dim in spec["shape"]:
        numel *= dim
    return numel * DTYPE_BYTES[spec["dtype"]]


def plan_buckets(manifest: list[dict[str, Any]] | list[TensorSpec], bucket_bytes: int) -> list[list[int]]:
    """Split manifest indices, in order, into buckets of at most bucket_bytes (a bigger tensor gets its own)."""
    buckets: list[list[int]] = []
    size = 0
    for i, spec in enumerate(manifest):
        nbytes = tensor_nbytes(spec)
        if not buckets or size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += nbytes
    return buckets
