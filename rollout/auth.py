"""Who may call what on rldock's services: three optional bearer tokens, read from the environment (compose passes
them from .env; they never appear on a command line or in a log line). No torch.

  RLDOCK_API_KEY      the OpenAI routes (/v1/...) and /generate of the rollout service: for the people and programs
                      that query the model. Unset: open, as for local use.
  RLDOCK_ADMIN_TOKEN  what changes the policy or stops the service for everyone: /update_weights,
                      /init_weight_sync, /close_weight_sync, /pause, /resume. The trainer sends it (and it also opens
                      the generation routes). `make` writes a random one into .env once.
  RLDOCK_ENV_TOKEN    every route of an env server except /health.
A missing or wrong token is 401 with one line naming the variable; /health stays open for healthchecks.
"""

# No `from __future__ import annotations`: FastAPI must see the real Request class on the dependency below.
import os
import secrets
from collections.abc import Callable

API_KEY, ADMIN_TOKEN, ENV_TOKEN = "RLDOCK_API_KEY", "RLDOCK_ADMIN_TOKEN", "RLDOCK_ENV_TOKEN"


def token(name: str) -> str | None:
    return os.environ.get(name) or None


def admin_token() -> str | None:
    return token(ADMIN_TOKEN)


def env_token() -> str | None:
    return token(ENV_TOKEN)


def authorized(header: str, values: list[str]) -> bool:
    """An `Authorization` header value carries one of `values` as a bearer token (constant-time comparison)."""
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and any(secrets.compare_digest(given, v) for v in values)


def refusal(names: list[str]) -> str:
    return f"this route needs `Authorization: Bearer <{' or '.join(names)}>`"


def require(*accepted: tuple[str, str | None]) -> Callable:
    """A FastAPI dependency: the request's `Authorization: Bearer X` must equal one of the set tokens, given as
    (variable name, value) pairs; when none of them is set the route is open."""
    from fastapi import HTTPException, Request

    needed = [(name, value) for name, value in accepted if value]

    async def check(request: Request) -> None:
        if not needed:
            return
        if authorized(request.headers.get("authorization", ""), [v for _, v in needed]):
            return
        raise HTTPException(401, refusal([name for name, _ in needed]), {"WWW-Authenticate": "Bearer"})

    return check
