"""Clients of env servers (httpx, no torch), and the same interface in-process.

- `EnvClient(base_url)`: AgentGym's paths and bodies (works against rldock's servers and upstream AgentGym ones).
  Babyai/sciworld-style and searchqa-style servers are told apart by what `/create` returns.
- `RemoteEnv`: an `Env` whose slot lives on a server, so code written against `Env` runs unchanged over HTTP.
- `env_factory(name, url=None, ...)`: what the trainer calls: in-process envs, or `RemoteEnv`s when a URL is given.

The client returns normalised dicts: reset/step → {observation, reward, score, done, info} plus the
env's own reset fields (sciworld's task_description, ...). `score` is None where the server reports none (searchqa,
TextCraft: the episode's result is then the sum of its rewards). AgentGym's error answers (`200 {"error"}`, searchqa's
500) become the same exceptions as rldock's 4xx.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from env_servers.api import Env, EnvError, Observation, StepResult
from env_servers.pool import EnvNotFound, EpisodeDone, PoolFull
from env_servers.protocol import CLIENT_KEEPALIVE_S
from rollout.recovery import DEFAULT_BUDGET_S, Recovery, http_attempt

_ERRORS = {404: EnvNotFound, 409: EpisodeDone, 429: PoolFull}


class EnvServerError(RuntimeError):
    """The server failed (5xx) or could not be reached."""


def _normalise(payload: Any) -> dict[str, Any]:
    """A reset/step answer of any env's shape as {observation, reward, score, done, info, ...}."""
    if isinstance(payload, str):  # searchqa's reset returns the observation itself
        payload = {"observation": payload}
    if not isinstance(payload, dict):
        raise EnvServerError(f"unexpected response: {str(payload)[:200]}")
    out = dict(payload)
    out["observation"] = str(payload.get("observation", ""))
    out["reward"] = float(payload.get("reward") or 0.0)
    out["score"] = None if payload.get("score") is None else float(payload["score"])
    out["done"] = bool(payload.get("done", False))
    out["info"] = payload.get("info") or {}
    return out


def _refusal(message: str) -> EnvError:
    """An AgentGym-style error message as the exception rldock's 4xx would have raised."""
    if message.endswith("is not valid."):
        return EnvNotFound(message)
    if message.endswith("has finished."):
        return EpisodeDone(message)
    return EnvError(message)


def _json_or_none(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return None


class EnvClient:
    """AgentGym-protocol client of one env server. Thread-safe; 4xx → EnvError (with the server's message)."""

    def __init__(self, base_url: str, timeout: float = 300.0, recovery_s: float = DEFAULT_BUDGET_S, token=None):
        self.base_url = base_url.rstrip("/")
        self.timeout, self.recovery = timeout, Recovery(recovery_s)
        self.bare: bool | None = None  # searchqa-style server (bare int/str responses); known after create
        headers = {"Authorization": f"Bearer {token}"} if token else {}  # RLDOCK_ENV_TOKEN (env_servers/app.py)
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout, connect=10.0),
            headers=headers,
            limits=httpx.Limits(keepalive_expiry=CLIENT_KEEPALIVE_S),
        )

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        # only a refused connection is safe to retry: nothing was sent (a step is not idempotent)
        attempt = http_attempt(
            lambda: self._http.request(method, path, **kwargs), (httpx.ConnectError,), lambda status: False
        )
        try:
            resp = self.recovery.run(f"env server {self.base_url}", attempt, give_up=EnvServerError)
        except httpx.HTTPError as e:
            raise EnvServerError(f"{method} {self.base_url}{path} failed: {e}") from None
        body = _json_or_none(resp)
        if isinstance(body, dict) and set(body) == {"error"} and resp.status_code in (200, 500):
            raise _refusal(f"{path}: {body['error']}")
        if resp.status_code >= 500:
            raise EnvServerError(f"{method} {path}: server error {resp.status_code}: {resp.text[:300]}")
        if resp.status_code >= 400:
            detail = body.get("detail", resp.text) if isinstance(body, dict) else resp.text
            raise _ERRORS.get(resp.status_code, EnvError)(f"{path}: {detail}")
        return resp.json()

    def _id_key(self) -> str:
        return "env_idx" if self.bare else "id"

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health")

    def list_envs(self) -> list[int]:
        return self._call("GET", "/list_envs")

    def create(self, data_idx: int | None = None) -> int:
        """A new env id. Waits (until the timeout) while the server is at its cap (429)."""
        deadline, wait = time.monotonic() + self.timeout, 0.25
        body = {"id": data_idx or 0}  # searchqa-style servers require an item; the others ignore the body
        while True:
            try:
                out = self._call("POST", "/create", json=body)
                break
            except PoolFull:
                if time.monotonic() + wait > deadline:
                    raise
                time.sleep(wait)
                wait = min(wait * 2, 5.0)
        self.bare = isinstance(out, int)
        return out if self.bare else int(out["id"])

    def reset(self, env_id: int, data_idx: int = 0) -> dict[str, Any]:
        body = {"env_idx": env_id, "id": data_idx} if self.bare else {"id": env_id, "data_idx": data_idx}
        return _normalise(self._call("POST", "/reset", json=body))

    def step(self, env_id: int, action: str) -> dict[str, Any]:
        return _normalise(self._call("POST", "/step", json={self._id_key(): env_id, "action": action}))

    def observation(self, env_id: int) -> str:
        out = self._call("GET", "/observation", params={self._id_key(): env_id})
        return out["observation"] if isinstance(out, dict) else out  # babyai answers a dict

    def available_actions(self, env_id: int) -> list[str]:
        return self._call("GET", "/available_actions", params={self._id_key(): env_id})

    def close(self, env_id: int) -> None:
        if self._call("POST", "/close", json={self._id_key(): env_id}) is False:
            raise EnvNotFound(f"/close: the id {env_id} is not valid.")

    def shutdown(self) -> None:
        """Close the HTTP connections (the server's envs are untouched)."""
        self._http.close()


class RemoteEnv(Env):
    """An `Env` backed by one slot of a server: created on construction."""

    def __init__(self, client: EnvClient):
        self.client = client
        self.env_id = client.create()
        self._closed = False

    def __len__(self) -> int:
        size = self.client.health().get("size")
        if size is None:
            raise EnvError("the server does not report its dataset size")
        return int(size)

    def reset(self, idx: int) -> Observation:
        out = self.client.reset(self.env_id, idx)
        common = ("observation", "info", "reward", "score", "done", "deleted", "id")
        fields = {k: v for k, v in out.items() if k not in common}
        return Observation(out["observation"], out["info"], out["reward"], out["score"] or 0, fields)

    def step(self, action: str) -> StepResult:
        out = self.client.step(self.env_id, action)
        return StepResult(out["observation"], out["reward"], out["done"], out["info"], out["score"])

    def observation(self) -> str:
        return self.client.observation(self.env_id)

    def available_actions(self) -> list[str]:
        return self.client.available_actions(self.env_id)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.client.close(self.env_id)
        except EnvNotFound:
            pass  # already expired on the server: nothing left to free


def env_factory(
    name: str,
    url: str | None = None,
    data: str | None = None,
    timeout: float = 300.0,
    recovery_s: float = DEFAULT_BUDGET_S,
    token: str | None = None,
    **options: Any,
) -> Callable[[], Env]:
    """Slot constructor for env `name`: in-process when `url` is None, else `RemoteEnv`s on the server at `url`
    (then `data` and `options` are the server's business: its command line sets them, and they are ignored here)."""
    if url is None:
        from env_servers.registry import make_factory

        return make_factory(name, data, **options)
    client = EnvClient(url, timeout=timeout, recovery_s=recovery_s, token=token)
    return lambda: RemoteEnv(client)
