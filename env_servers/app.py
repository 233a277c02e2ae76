"""One FastAPI app over any `Env`, answering as that env's AgentGym server does (shapes: the env's `Wire`).

Routes: `GET /` (the greeting), `GET /health`, `GET /list_envs`, `POST /create`, `POST /reset`, `POST /step`,
`GET /observation`, `GET /available_actions`, `POST /close`, plus the env's own GET routes (`Wire.queries`,
`/detail`). Bodies are parsed by hand (size-capped, type-checked): a malformed request gets a 4xx naming the field.
An env's own refusals (unknown id, finished episode, bad item) are answered AgentGym's way, 200 `{"error": ...}`,
or as 4xx `{"detail": ...}` with `http_errors`. Env code runs in the threadpool under a per-env lock
(`env_servers.pool`); a background task closes envs idle longer than the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from env_servers.api import Env, EnvError
from env_servers.pool import EnvNotFound, EnvPool, EpisodeDone, PoolFull
from env_servers.protocol import (
    MAX_BODY_BYTES,
    BadRequest,
    TooLarge,
    Wire,
    action_of,
    create_data_idx,
    data_idx_of,
    env_id_of,
    observation_payload,
    openapi_body,
    openapi_env_query,
    reset_payload,
    step_payload,
)
from env_servers.registry import EnvUnavailable
from rollout import auth

log = logging.getLogger("env_servers")

_STATUS = {BadRequest: 400, TooLarge: 413, EnvNotFound: 404, EpisodeDone: 409, PoolFull: 429, EnvUnavailable: 503}
_RLDOCK_LIMITS = (BadRequest, TooLarge, PoolFull, EnvUnavailable)  # no AgentGym server has these: always 4xx/5xx


def _status_of(err: EnvError) -> int:
    return next((_STATUS[t] for t in type(err).__mro__ if t in _STATUS), 400)


async def _read_json(request: Request, required: bool = True) -> dict[str, Any]:
    """The request's JSON object body, at most MAX_BODY_BYTES; {} for an empty body when not `required`."""
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise TooLarge(f"request body over {MAX_BODY_BYTES} bytes")
    if not raw.strip():
        if required:
            raise BadRequest("expected a JSON object body")
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError; deep nesting → RecursionError
        raise BadRequest(f"body is not valid JSON: {str(e)[:100]}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"body must be a JSON object, got {type(body).__name__}")
    return body


async def _reaper(pool: EnvPool) -> None:
    period = max(0.05, min(pool.ttl / 4, 30.0))
    while True:
        await asyncio.sleep(period)
        try:
            await run_in_threadpool(pool.evict_idle)
        except Exception:  # keep reaping whatever one close did
            log.exception("expiring idle envs failed")


def create_app(
    factory: Callable[[], Env],
    *,
    name: str = "env",
    wire: Wire = Wire(),
    ttl: float = 900.0,
    max_envs: int = 256,
    http_errors: bool = False,
) -> FastAPI:
    """The server app for slots built by `factory` (see `env_servers.registry.make_factory`), answering in `wire`'s
    shapes; `http_errors`: the env's refusals as 4xx instead of AgentGym's 200 {"error"}."""
    pool = EnvPool(factory, ttl=ttl, max_envs=max_envs, step_after_done=wire.step_after_done)
    error_status = None if http_errors else wire.error_status

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        reaper = asyncio.create_task(_reaper(pool))
        yield
        reaper.cancel()
        await run_in_threadpool(pool.close_all)

    app = FastAPI(title=f"rldock env server: {name}", lifespan=lifespan)
    app.state.pool = pool
    _add_token_check(app, auth.env_token())
    _add_error_handlers(app, name, error_status, pool.ttl)
    _add_info_routes(app, pool, name, wire)
    _add_env_routes(app, pool, wire, error_status)
    _add_query_routes(app, pool, wire)
    return app


OPEN_PATHS = frozenset({"/", "/health"})


def _add_token_check(app: FastAPI, token: str | None) -> None:
    """RLDOCK_ENV_TOKEN (rollout/auth.py): every route but / and /health wants it as a bearer token, when set."""
    if not token:
        return

    @app.middleware("http")
    async def check(request: Request, call_next):
        if request.url.path in OPEN_PATHS or auth.authorized(request.headers.get("authorization", ""), [token]):
            return await call_next(request)
        return JSONResponse({"detail": auth.refusal([auth.ENV_TOKEN])}, 401, {"WWW-Authenticate": "Bearer"})


def _add_error_handlers(app: FastAPI, name: str, error_status: int | None, ttl: float) -> None:
    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, err: ClientDisconnect) -> JSONResponse:
        log.info("%s %s: the client went away before its body arrived", request.method, request.url.path)
        return JSONResponse({"detail": "client closed the request"}, status_code=499)

    @app.exception_handler(EnvError)
    async def env_error(request: Request, err: EnvError) -> JSONResponse:
        if error_status is None or isinstance(err, _RLDOCK_LIMITS):
            why = f" (never created, closed, or expired after {ttl:g}s idle)" if isinstance(err, EnvNotFound) else ""
            return JSONResponse({"detail": f"{err}{why}"}, status_code=_status_of(err))
        return JSONResponse({"error": str(err)}, status_code=error_status)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error in env {name}: {type(err).__name__}: {err}"}, status_code=500)


def _add_info_routes(app: FastAPI, pool: EnvPool, name: str, wire: Wire) -> None:
    @app.get("/")
    async def root() -> str:
        return wire.greeting

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "env": name,
            "live": len(pool),
            "max_envs": pool.max_envs,
            "ttl": pool.ttl,
            "size": pool.size,
        }

    @app.get("/list_envs")
    async def list_envs() -> list[int]:
        return pool.ids()


def _add_env_routes(app: FastAPI, pool: EnvPool, wire: Wire, error_status: int | None) -> None:
    @app.post("/create", openapi_extra=openapi_body("create", required=False))
    async def create(request: Request) -> Any:
        data_idx = create_data_idx(await _read_json(request, required=False), wire.bare)
        env_id = await run_in_threadpool(pool.create)
        if wire.create_resets:
            data_idx = env_id  # TextCraft: the new env plays the item of its own id (its commands/goal are unused)
        if data_idx is None:
            return env_id if wire.bare else {"id": env_id}
        try:
            obs = await run_in_threadpool(pool.reset, env_id, data_idx)
        except EnvError:
            await run_in_threadpool(pool.close, env_id)
            raise
        return reset_payload(wire, obs, env_id) if wire.create_resets else env_id if wire.bare else {"id": env_id}

    @app.post("/reset", openapi_extra=openapi_body("reset"))
    async def reset(request: Request) -> Any:
        body = await _read_json(request)
        env_id, data_idx = env_id_of(body), data_idx_of(body)
        return reset_payload(wire, await run_in_threadpool(pool.reset, env_id, data_idx), env_id)

    @app.post("/step", openapi_extra=openapi_body("step"))
    async def step(request: Request) -> dict[str, Any]:
        body = await _read_json(request)
        env_id, action = env_id_of(body), action_of(body)
        return step_payload(wire, *await run_in_threadpool(pool.step, env_id, action))

    @app.get("/observation", openapi_extra=openapi_env_query())
    async def observation(request: Request) -> Any:
        env_id = env_id_of(dict(request.query_params))
        return observation_payload(wire, *await run_in_threadpool(pool.observation, env_id))

    @app.get("/available_actions", openapi_extra=openapi_env_query())
    async def available_actions(request: Request) -> list[str]:
        return await run_in_threadpool(pool.available_actions, env_id_of(dict(request.query_params)))

    @app.post("/close", openapi_extra=openapi_body("close"))
    async def close(request: Request) -> bool:
        env_id = env_id_of(await _read_json(request))
        try:
            await run_in_threadpool(pool.close, env_id)
        except EnvNotFound:
            if error_status is None:
                raise
            return False  # AgentGym's answer for an env it does not know
        return True


def _add_query_routes(app: FastAPI, pool: EnvPool, wire: Wire) -> None:
    def route(what: str) -> None:
        @app.get(f"/{what}", name=what, openapi_extra=openapi_env_query())
        async def query(request: Request) -> Any:
            return await run_in_threadpool(pool.query, env_id_of(dict(request.query_params)), what)

    for what in wire.queries:
        route(what)
    if wire.detail:

        @app.get("/detail", openapi_extra=openapi_env_query())
        async def detail(request: Request) -> dict[str, Any]:
            fields = await run_in_threadpool(pool.detail, env_id_of(dict(request.query_params)))
            shown = {"deleted", "done", *wire.reset_keys, *wire.step_keys} - {"id"}
            return {k: v for k, v in fields.items() if k in shown}
