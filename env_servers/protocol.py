"""AgentGym's wire format as pure functions: reading request bodies and shaping responses. No I/O here.

Two response flavours exist upstream (see shared REFERENCE.md):
- "agentgym" (babyai, sciworld, …): `POST /create` → `{"id": N}`; reset/step → `{observation, reward, score, done}`.
- "searchqa": `POST /create {"id": item}` → a bare integer; reset → the observation string; step →
  `{observation, reward, done}`; close → `true`.
Requests name the env by `env_idx` or `id`. When a body has `env_idx`, its `id` is the dataset item (searchqa's
reset `{env_idx, id}`); otherwise `id` is the env and `data_idx` the item (babyai's reset `{id, data_idx}`).
"""

from __future__ import annotations

import re
from typing import Any

from env_servers.api import EnvError, Observation, StepResult

PROTOCOLS = ("agentgym", "searchqa")
MAX_BODY_BYTES = 1 << 20
MAX_ACTION_CHARS = 65536
MAX_ID = 2**53  # JSON-safe integers; larger ones are certainly not ours
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


def create_data_idx(body: dict[str, Any]) -> int | None:
    """The item a create asks to load at once (searchqa's `{"id": item}`), or None."""
    for key in ("data_idx", "id"):
        if body.get(key) is not None:
            return as_int(body[key], key)
    return None


def action_of(body: dict[str, Any]) -> str:
    action = body.get("action")
    if not isinstance(action, str):
        raise BadRequest(f"'action' must be a string, got {type(action).__name__}")
    if len(action) > MAX_ACTION_CHARS:
        raise TooLarge(f"action has {len(action)} characters; the limit is {MAX_ACTION_CHARS}")
    return action


def create_payload(protocol: str, env_id: int) -> Any:
    return env_id if protocol == "searchqa" else {"id": env_id}


def reset_payload(protocol: str, obs: Observation) -> Any:
    if protocol == "searchqa":
        return obs.text
    payload = {"observation": obs.text, "reward": 0.0, "score": 0.0, "done": False, "info": obs.info}
    task = obs.info.get("task_description")
    if isinstance(task, str):
        # sciworld clients print task_description + "\n" + observation: don't send the task twice
        payload["task_description"] = task
        payload["observation"] = obs.text.removeprefix(task + "\n")
    return payload


def step_payload(result: StepResult, score: float) -> dict[str, Any]:
    """`score` is the episode's summed reward: AgentGym's babyai/sciworld clients report it as the reward."""
    return {
        "observation": result.observation,
        "reward": float(result.reward),
        "score": float(score),
        "done": bool(result.done),
        "info": result.info,
    }


def close_payload(protocol: str, env_id: int) -> Any:
    return True if protocol == "searchqa" else {"id": env_id, "closed": True}
