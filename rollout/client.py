"""RolloutEngine over HTTP: one or more rollout services (rollout/server.py) behind the engine contract. No torch.

- Timeouts are explicit (`timeout` for a generation, `update_timeout` for weight loads, `connect_timeout`).
- Retries only where a retry can help: transport errors (refused, reset, timed out) and 5xx answers, on a time
  budget (`recovery_s`, rollout/recovery.py: a restarting service is waited for, one log line per attempt); a 4xx
  answer is raised at once as ServiceError with the service's message.
- Several URLs: each `generate` splits its prompts into contiguous chunks, one per service, sent concurrently; the
  service that gets the first chunk rotates from call to call (round-robin).
- Restarts: every answer names the service's boot id and weight version. A new boot id, or a version older than
  the last one synced, means the service restarted or missed an update: the client re-syncs it (a re-post of the
  last synced safetensors folder, or after a broadcast the trainer's `resync(url)` callback) and asks again.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from rollout import payloads as P
from rollout.api import Completion, RolloutEngine, SamplingParams, prompt_caps
from rollout.recovery import DEFAULT_BUDGET_S, Recovery, http_attempt


class ServiceError(RuntimeError):
    """A rollout service refused a request (4xx) or answered nonsense."""


class ServiceUnavailable(ServiceError):
    """A rollout service stayed unreachable (or failing with 5xx) for the whole recovery budget."""


class HTTPRolloutClient(RolloutEngine):
    def __init__(
        self,
        urls: list[str] | str,
        timeout: float = 600.0,
        recovery_s: float = DEFAULT_BUDGET_S,
        *,
        connect_timeout: float = 10.0,
        update_timeout: float = 900.0,
        resync: Callable[[str], None] | None = None,
        token: str | None = None,
    ):
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("HTTPRolloutClient needs at least one service URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.update_timeout, self.recovery = update_timeout, Recovery(recovery_s)
        self.resync = resync
        headers = {"Authorization": f"Bearer {token}"} if token else {}  # the admin token (rollout/auth.py)
        self._http = httpx.Client(timeout=httpx.Timeout(timeout, connect=connect_timeout), headers=headers)
        # two pools: a generation thread may re-sync a service, which posts through the admin pool (no deadlock)
        self._gen_pool = ThreadPoolExecutor(len(self.urls), thread_name_prefix="rollout-gen")
        self._admin_pool = ThreadPoolExecutor(len(self.urls), thread_name_prefix="rollout-admin")
        self._lock = threading.Lock()
        self._next = 0
        self._boot_ids: dict[str, str] = {}
        self._synced: tuple[str | None, int] | None = None  # (folder or None for a broadcast, version)

    # ---- plumbing -------------------------------------------------------------------------------------------------

    def request(self, method: str, url: str, route: str, body: Any = None, *, timeout=None, retry: bool = True) -> dict:
        """One call; transport errors and 5xx are retried within the recovery budget (retry=False: one attempt, for
        calls that must not be re-sent); 4xx raises ServiceError at once."""

        attempt = http_attempt(
            lambda: self._http.request(method, url + route, json=body, timeout=timeout or httpx.USE_CLIENT_DEFAULT)
        )
        recovery = self.recovery if retry else Recovery(0.0)
        r = recovery.run(f"rollout service {url}{route}", attempt, give_up=ServiceUnavailable)
        if r.status_code >= 400:
            raise ServiceError(f"{url}{route} answered {r.status_code}: {_detail(r)}")
        try:
            return r.json()
        except ValueError:
            raise ServiceError(f"{url}{route} answered 200 with a body that is not JSON: {r.text[:200]}") from None

    def post_all(self, route: str, body: Any = None, *, timeout=None, retry: bool = True) -> list[dict]:
        """POST the same body to every service concurrently; answers in URL order."""
        futures = [
            self._admin_pool.submit(self.request, "POST", url, route, body, timeout=timeout, retry=retry)
            for url in self.urls
        ]
        return [f.result() for f in futures]

    def health(self, url: str) -> dict:
        return self.request("GET", url, "/health", timeout=10.0)

    def metrics(self, url: str) -> dict:
        return self.request("GET", url, "/metrics", timeout=10.0)

    def weights_checksum(self, url: str) -> str:
        return self.request("GET", url, "/weights_checksum", timeout=self.update_timeout)["checksum"]

    # ---- generation -----------------------------------------------------------------------------------------------

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, max_new_tokens: list[int] | None = None
    ) -> list[Completion]:
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        if max_new_tokens is not None:
            return self._generate_capped(prompts, params, prompt_caps(prompts, params, max_new_tokens))
        with self._lock:
            first = self._next
            self._next = (self._next + 1) % len(self.urls)
        k = min(len(self.urls), len(prompts))
        bounds = [len(prompts) * i // k for i in range(k + 1)]
        futures = [
            self._gen_pool.submit(
                self._generate_on, self.urls[(first + i) % len(self.urls)], prompts[bounds[i] : bounds[i + 1]], params
            )
            for i in range(k)
        ]
        out: list[Completion] = []
        for i, f in enumerate(futures):
            for c in f.result():
                c.prompt_index += bounds[i]
                out.append(c)
        return out

    def _generate_capped(self, prompts: list[list[int]], params: SamplingParams, caps: list[int]) -> list[Completion]:
        """Per-prompt caps over HTTP: one request per distinct cap (each is a /generate with that max_new_tokens),
        sent together; the answers are put back in prompt order."""
        groups: dict[int, list[int]] = {}
        for i, cap in enumerate(caps):
            groups.setdefault(cap, []).append(i)
        by_prompt: list[list[Completion]] = [[] for _ in prompts]
        with ThreadPoolExecutor(len(groups)) as pool:  # its own threads: generate itself fills _gen_pool
            futures = {
                cap: pool.submit(
                    self.generate, [prompts[i] for i in idx], dataclasses.replace(params, max_new_tokens=cap)
                )
                for cap, idx in groups.items()
            }
            for cap, idx in groups.items():
                for c in futures[cap].result():
                    c.prompt_index = idx[c.prompt_index]
                    by_prompt[c.prompt_index].append(c)
        return [c for group in by_prompt for c in group]

    def _generate_on(self, url: str, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        body = P.generate_body(prompts, params)
        for _ in range(3):
            expected = self._synced[1] if self._synced else None  # read before asking: a later update is no fault
            answer = self.request("POST", url, "/generate", body)
            if not self._stale(url, answer, expected):
                try:
                    return P.parse_generate_response(answer, len(prompts), params.n)
                except (ValueError, TypeError, KeyError) as err:
                    raise ServiceError(f"{url}/generate answered an unexpected body: {err}") from None
            self.resync_service(url)
        raise ServiceError(f"{url} still serves weight version {answer.get('weight_version')} after re-syncing")

    def _stale(self, url: str, answer: dict, expected: int | None) -> bool:
        boot = answer.get("boot_id")
        restarted = url in self._boot_ids and boot != self._boot_ids[url]
        behind = expected is not None and (answer.get("weight_version") or 0) < expected
        if not restarted and not behind:
            self._boot_ids[url] = boot
        return restarted or behind

    def resync_service(self, url: str) -> None:
        """Bring a restarted or lagging service to the last synced weights, then trust its new boot id."""
        if self._synced is not None and self._synced[0] is not None:
            path, version = self._synced
            self.request("POST", url, "/update_weights", P.disk_update_body(path, version), timeout=self.update_timeout)
        elif self.resync is not None:
            self.resync(url)
        self._boot_ids[url] = self.health(url)["boot_id"]

    # ---- weights and admin ----------------------------------------------------------------------------------------

    def update_weights(self, source: Any, version: int | None = None) -> int:
        """Load an HF safetensors folder (on a volume every service can read) into every service."""
        if not isinstance(source, str | Path):
            raise TypeError(
                "HTTPRolloutClient.update_weights takes a safetensors folder path; for NCCL use trainer.weight_sync"
            )
        version = self.weight_version + 1 if version is None else int(version)
        path = str(Path(source).resolve())
        answers = self.post_all("/update_weights", P.disk_update_body(path, version), timeout=self.update_timeout)
        self.mark_synced(path, version, answers)
        return version

    def mark_synced(self, path: str | None, version: int, answers: list[dict]) -> None:
        """Record what every service now holds (path=None: a broadcast, re-synced by the `resync` callback);
        `answers` are the services' /update_weights answers in URL order (their boot ids hold these weights)."""
        self._synced = (path, version)
        for url, answer in zip(self.urls, answers, strict=True):
            self._boot_ids[url] = answer["boot_id"]

    @property
    def weight_version(self) -> int:
        if self._synced is not None:
            return self._synced[1]
        return self.health(self.urls[0])["weight_version"]

    def close(self) -> None:
        self._gen_pool.shutdown(wait=False)
        self._admin_pool.shutdown(wait=False)
        self._http.close()


def _detail(r: httpx.Response) -> str:
    try:
        detail = r.json().get("detail", r.text)
    except ValueError:
        return r.text[:300]
    if isinstance(detail, list):  # pydantic validation errors
        return "; ".join(f"{'.'.join(str(x) for x in e.get('loc', []))}: {e.get('msg')}" for e in detail[:3])
    return str(detail)
