"""AgentGym's wire format as pure functions: reading request bodies and shaping responses. No I/O here.

Each AgentGym env server shapes its answers its own way; an env module states its server's shape as a `Wire`
(babyai: create → `{"id"}`, reset → `{observation, reward, score, deleted, done}`, GET /observation → a dict;
searchqa: create `{"id": item}` → a bare integer, reset → the observation string, step → `{observation, reward, done,
info: null}`; ...). Close answers `true` (`false` for an unknown env); errors are `200 {"error": message}`, as
AgentGym's servers answer them, unless the server runs with --http-errors (then 4xx with `{"detail"}`).
Requests name the env by `env_idx` or `id`. When a body has `env_idx`, its `id` is the dataset item (searchqa's
reset `{env_idx, id}`); otherwise `id` is the env and `data_idx` the item (babyai's reset `{id, data_idx}`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from env_servers.api import EnvError, Observation, StepResult

MAX_BODY_BYTES = 1 << 20
MAX_ACTION_CHARS = 65536
MAX_ID = 2**53  # JSON-safe integers; larger ones are certainly not ours
# Idle keep-alive connections: the client drops its own well before our servers close theirs. With both at httpx's
# and uvicorn's default (5 s) a step sent on a connection the server was closing at that moment failed with "Server
# disconnected without sending a response" (a step is not retried: it is not idempotent); 2 s also stays under
# gunicorn's default for AgentGym servers run that way.
CLIENT_KEEPALIVE_S = 2.0
SERVER_KEEPALIVE_S = 30
_DECIMAL = re.compile(r"-?[0-9]{1,16}")


# The request bodies as JSON Schema, for the OpenAPI document (clients and fuzzers read the contract from it); the
# parsing functions below are what enforces them, with a 4xx naming the field.
_ID = {"type": "integer", "minimum": -MAX_ID + 1, "maximum": MAX_ID - 1}
_ENV = {"env_idx": {**_ID, "description": "the env (searchqa style); then `id` is the dataset item"},
        "id": {**_ID, "description": "the env (babyai style), or the dataset item when `env_idx` is given"}}  # fmt: skip
BODY_SCHEMAS: dict[str, dict[str, Any]] = {
    "create": {
        "type": "object",
        "properties": {
            "id": {**_ID, "description": "item to load at once (searchqa)"},
            "data_idx": {**_ID, "description": "item to load at once"},
        },
    },  # fmt: skip
    "reset": {
        "type": "object",
        "properties": {**_ENV, "data_idx": {**_ID, "description": "the dataset item"}},
        "anyOf": [{"required": ["env_idx"]}, {"required": ["id"]}],
    },  # fmt: skip
    "step": {
        "type": "object",
        "properties": {**_ENV, "action": {"type": "string", "maxLength": MAX_ACTION_CHARS}},
        "required": ["action"],
        "anyOf": [{"required": ["env_idx"]}, {"required": ["id"]}],
    },  # fmt: skip
    "close": {"type": "object", "properties": _ENV, "anyOf": [{"required": ["env_idx"]}, {"required": ["id"]}]},
}


def openapi_body(name: str, required: bool = True) -> dict[str, Any]:
    """`openapi_extra` for a route whose body is read by hand: the body's schema in the OpenAPI document."""
    content = {"application/json": {"schema": BODY_SCHEMAS[name]}}
    return {"requestBody": {"required": required, "content": content}}


def openapi_env_query() -> dict[str, Any]:
    """`openapi_extra` for GET routes that name the env in the query string (`env_idx` or `id`)."""
    params = [{"name": key, "in": "query", "required": False, "schema": schema} for key, schema in _ENV.items()]
    return {"parameters": params}


class BadRequest(EnvError):
    """Malformed request: wrong JSON, missing field, wrong type (HTTP 400)."""


class TooLarge(EnvError):
    """Body or action over the size limits (HTTP 413)."""


def as_int(value: Any, field: str) -> int:
    """An id or index from JSON (an int) or a query string (decimal digits)."""
    if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not -MAX_ID < value < MAX_ID:
        raise BadRequest(f"'{field}' must be an integer, got {str(value)[:50]!r}")
    return value


def env_id_of(body: dict[str, Any]) -> int:
    """The env a request addresses: `env_idx`, else `id`."""
    for key in ("env_idx", "id"):
        if key in body and body[key] is not None:
            return as_int(body[key], key)
    raise BadRequest("name the env with 'env_idx' or 'id'")


def data_idx_of(body: dict[str, Any], default: int | None = 0) -> int | None:
    """The dataset item a reset asks for: `data_idx`, else `id` when `env_idx` names the env, else `default`."""
    if body.get("data_idx") is not None:
        return as_int(body["data_idx"], "data_idx")
    if body.get("env_idx") is not None and body.get("id") is not None:
        return as_int(body["id"], "id")
    return default


def create_data_idx(body: dict[str, Any], bare: bool) -> int | None:
    """The item a create asks to load at once: searchqa's `{"id": item}`, rldock's `{"data_idx": item}`; or None.
    (babyai's and sciworld's creates take no body: their clients' `id` there means nothing.)"""
    key = "id" if bare else "data_idx"
    return None if body.get(key) is None else as_int(body[key], key)


def action_of(body: dict[str, Any]) -> str:
    action = body.get("action")
    if not isinstance(action, str):
        raise BadRequest(f"'action' must be a string, got {type(action).__name__}")
    if len(action) > MAX_ACTION_CHARS:
        raise TooLarge(f"action has {len(action)} characters; the limit is {MAX_ACTION_CHARS}")
    return action


@dataclass(frozen=True)
class Wire:
    """How one env's AgentGym server shapes its answers (read from that server's code: the facts, not the code)."""

    greeting: str = "ok"
    """What `GET /` answers."""
    bare: bool = False
    """searchqa's shape: create takes the item and answers the env id, reset answers the observation string."""
    reset_keys: tuple[str, ...] = ("observation", "reward", "score", "done")
    """The fields of a reset answer (of create's too, when `create_resets`)."""
    step_keys: tuple[str, ...] = ("observation", "reward", "score", "done")
    observation_dict: bool = False
    """babyai's GET /observation answers {observation, reward, score, done, deleted}; the others the text."""
    create_resets: bool = False
    """TextCraft's create starts an episode at once (item = the new env's id, or the body's commands and goal)."""
    step_after_done: bool = False
    """searchqa and TextCraft accept steps after the episode ended; babyai and sciworld answer "has finished"."""
    error_status: int | None = 200
    """AgentGym's status for a failed request: 200 with {"error"} (searchqa raises: 500); None: rldock's 4xx."""
    info: bool = True
    """rldock's "info" dict (success flags, turns) added to dict answers; searchqa's model declares info null."""
    queries: tuple[str, ...] = ()
    """Extra GET routes answered by `Env.query` (sciworld's /action_hint, /goals, ...)."""
    detail: bool = False
    """GET /detail: every field the env's answers have carried so far (sciworld, TextCraft)."""


RLDOCK_WIRE = Wire(error_status=None)  # rldock's own envs (the GSM8K family): no AgentGym server to match


def reset_payload(wire: Wire, obs: Observation, env_id: int) -> Any:
    if wire.bare:
        return obs.text
    fields = {"id": env_id, "observation": obs.text, "reward": obs.reward, "score": obs.score, "deleted": False}
    fields.update(done=False, **obs.fields)
    out = {k: fields[k] for k in wire.reset_keys}
    if wire.info:
        out["info"] = obs.info
    return out


def step_payload(wire: Wire, result: StepResult, score: float) -> dict[str, Any]:
    """`score`: the episode's score (its own, or the sum of its rewards)."""
    fields = {"observation": result.observation, "reward": result.reward, "score": score, "done": bool(result.done)}
    out = {k: fields[k] for k in wire.step_keys}
    out["info"] = result.info if wire.info else None
    return out


def observation_payload(wire: Wire, text: str, reward: float, score: float, done: bool) -> Any:
    if wire.observation_dict:
        return {"observation": text, "reward": reward, "score": score, "done": done, "deleted": False}
    return text
