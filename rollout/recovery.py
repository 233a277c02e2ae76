"""Waiting out a restarting service on a time budget, not a retry count (the rollout, env and eval clients' one
retry loop).

A service restarted by its supervisor (compose `restart:`, Kubernetes) is back in seconds to minutes depending on the
model it loads, so a fixed number of quick retries gives up too early or waits too long. `Recovery.run` retries what
raises `Retryable` with exponential backoff (0.5 s doubling up to 10 s) until `budget_s` have passed since the first
failure, logging one line per attempt; then it raises the caller's error class with one line naming the service.
`http_attempt` turns one httpx call into such an attempt, with the caller's choice of what is worth retrying.
No torch.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import httpx

T = TypeVar("T")
DEFAULT_BUDGET_S = 300.0


class Retryable(Exception):
    """Raised by an attempt that may succeed later (refused connection, reset, 5xx); the message says what failed."""


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class Recovery:
    budget_s: float = DEFAULT_BUDGET_S
    """Seconds from the first failure until giving up (0: one attempt)."""
    first_wait_s: float = 0.5
    max_wait_s: float = 10.0
    log: Callable[[str], None] = field(default=_stderr, repr=False)

    def run(self, what: str, attempt: Callable[[], T], give_up: type[Exception] = RuntimeError) -> T:
        """attempt() until it returns; on Retryable wait and try again within the budget, then raise give_up."""
        first_failure, tries = None, 0
        while True:
            try:
                return attempt()
            except Retryable as err:
                now = time.monotonic()
                first_failure = now if first_failure is None else first_failure
                spent, tries = now - first_failure, tries + 1
                if spent >= self.budget_s:
                    raise give_up(
                        f"{what} unreachable for {spent:.0f} s ({tries} attempts, recovery budget "
                        f"{self.budget_s:.0f} s); last error: {err}"
                    ) from None
                wait = min(self.first_wait_s * 2 ** (tries - 1), self.max_wait_s, self.budget_s - spent)
                self.log(
                    f"[rldock] {what}: {err}; attempt {tries + 1} in {wait:.1f} s ({spent:.0f} of {self.budget_s:.0f} s)"
                )
                time.sleep(wait)


def http_attempt(
    send: Callable[[], httpx.Response],
    retry_errors: tuple[type[Exception], ...] = (httpx.TransportError,),
    retry_status: Callable[[int], bool] = lambda status: status >= 500,
) -> Callable[[], httpx.Response]:
    """`send` as a Recovery attempt: `retry_errors` (default: any transport error) and answers whose status
    `retry_status` picks (default: 5xx) raise Retryable; other errors propagate, other answers are returned."""

    def attempt() -> httpx.Response:
        try:
            r = send()
        except retry_errors as err:
            raise Retryable(f"{type(err).__name__}: {err}") from None
        if retry_status(r.status_code):
            raise Retryable(f"HTTP {r.status_code}: {r.text[:300]}")
        return r

    return attempt
