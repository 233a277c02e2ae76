"""A thread-safe pool of env slots: ids, a cap on live envs, idle expiry, one lock per env, episode bookkeeping.

Both the HTTP app and the in-process client sit on this, so the two behave alike. Every method may block (env code
runs inside it): the app calls them from its threadpool.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from env_servers.api import Env, EnvError, Observation, StepResult

log = logging.getLogger(__name__)


class EnvNotFound(EnvError):
    """Unknown, closed or expired env id (HTTP 404)."""


class PoolFull(EnvError):
    """The cap on live envs is reached (HTTP 429)."""


class EpisodeDone(EnvError):
    """Step after the episode ended (HTTP 409)."""


@dataclass
class _Slot:
    env: Env
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_used: float = field(default_factory=time.monotonic)
    reset_done: bool = False
    done: bool = False
    reward: float = 0  # the last reward and the episode's score, as AgentGym's servers report them
    score: float = 0
    detail: dict = field(default_factory=lambda: {"deleted": False, "done": False})  # GET /detail
    closed: bool = False


class EnvPool:
    """Env slots keyed by integer ids. `ttl` seconds idle → closed; at most `max_envs` live at once."""

    def __init__(
        self, factory: Callable[[], Env], ttl: float = 900.0, max_envs: int = 256, step_after_done: bool = False
    ):
        self.factory, self.ttl, self.max_envs = factory, ttl, max_envs
        self.step_after_done = step_after_done  # else step and observation after the episode ended: EpisodeDone
        self._slots: dict[int, _Slot] = {}
        self._pending = 0  # creations in progress count against the cap
        self.size: int | None = None  # the dataset size (len of an env), known once one exists
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._slots)

    def ids(self) -> list[int]:
        with self._lock:
            return sorted(self._slots)

    def create(self) -> int:
        """Build a new env slot and return its id; PoolFull when the cap is reached even after expiring idle ones."""
        self.evict_idle()
        with self._lock:
            if len(self._slots) + self._pending >= self.max_envs:
                raise PoolFull(f"{self.max_envs} envs are live (the cap): close some or wait for idle ones to expire")
            self._pending += 1
        try:
            env = self.factory()
        finally:
            with self._lock:
                self._pending -= 1
        with self._lock:
            env_id = next(self._ids)
            self._slots[env_id] = _Slot(env)
            if self.size is None:
                self.size = len(env)
        return env_id

    def _run(self, env_id: int, fn: Callable[[_Slot], object]) -> object:
        """Run `fn(slot)` holding the slot's lock; refreshes the idle clock."""
        with self._lock:
            slot = self._slots.get(env_id)
        if slot is None:  # AgentGym's words (never created, closed, or expired after the TTL)
            raise EnvNotFound(f"The id {env_id} is not valid.")
        with slot.lock:
            if slot.closed:
                raise EnvNotFound(f"The id {env_id} is not valid.")
            try:
                return fn(slot)
            finally:
                slot.last_used = time.monotonic()

    def reset(self, env_id: int, data_idx: int) -> Observation:
        def do(slot: _Slot) -> Observation:
            obs = slot.env.reset(data_idx)
            slot.reset_done, slot.done, slot.reward, slot.score = True, False, obs.reward, obs.score
            slot.detail.update(obs.fields, observation=obs.text, reward=obs.reward, score=obs.score, done=False)
            return obs

        return self._run(env_id, do)

    def _check_live(self, env_id: int, slot: _Slot) -> None:
        if not slot.reset_done:
            raise EnvError(f"env {env_id} has no episode: reset it first")
        if slot.done and not self.step_after_done:
            raise EpisodeDone(f"The task with environment {env_id} has finished.")

    def step(self, env_id: int, action: str) -> tuple[StepResult, float]:
        """Apply `action`; returns the step result and the episode's score so far."""

        def do(slot: _Slot) -> tuple[StepResult, float]:
            self._check_live(env_id, slot)
            result = slot.env.step(action)
            slot.done, slot.reward = bool(result.done), result.reward
            slot.score = slot.score + result.reward if result.score is None else result.score
            slot.detail.update(observation=result.observation, reward=slot.reward, score=slot.score, done=slot.done)
            return result, slot.score

        return self._run(env_id, do)

    def observation(self, env_id: int) -> tuple[str, float, float, bool]:
        """The env's observation text, its last reward, its score and whether its episode is done."""

        def do(slot: _Slot) -> tuple[str, float, float, bool]:
            self._check_live(env_id, slot)
            return slot.env.observation(), slot.reward, slot.score, slot.done

        return self._run(env_id, do)

    def detail(self, env_id: int) -> dict:
        def do(slot: _Slot) -> dict:
            self._check_live(env_id, slot)
            return dict(slot.detail)

        return self._run(env_id, do)

    def query(self, env_id: int, what: str) -> object:
        def do(slot: _Slot) -> object:
            self._check_live(env_id, slot)
            return slot.env.query(what)

        return self._run(env_id, do)

    def available_actions(self, env_id: int) -> list[str]:
        return self._run(env_id, lambda slot: slot.env.available_actions())

    def close(self, env_id: int) -> None:
        with self._lock:
            slot = self._slots.pop(env_id, None)
        if slot is None:
            raise EnvNotFound(f"The id {env_id} is not valid.")
        with slot.lock:
            self._close_slot(env_id, slot)

    def evict_idle(self) -> list[int]:
        """Close envs idle longer than the TTL (skipping ones in use); returns their ids."""
        now = time.monotonic()
        with self._lock:
            stale = [(i, s) for i, s in self._slots.items() if now - s.last_used > self.ttl]
        evicted = []
        for env_id, slot in stale:
            if not slot.lock.acquire(blocking=False):
                continue  # a request is using it right now: not idle
            try:
                with self._lock:
                    if self._slots.get(env_id) is not slot or time.monotonic() - slot.last_used <= self.ttl:
                        continue
                    del self._slots[env_id]
                self._close_slot(env_id, slot)
                evicted.append(env_id)
            finally:
                slot.lock.release()
        if evicted:
            log.info("closed %d env(s) idle for more than %gs: %s", len(evicted), self.ttl, evicted)
        return evicted

    def close_all(self) -> None:
        with self._lock:
            slots, self._slots = list(self._slots.items()), {}
        for env_id, slot in slots:
            with slot.lock:
                self._close_slot(env_id, slot)

    @staticmethod
    def _close_slot(env_id: int, slot: _Slot) -> None:
        slot.closed = True
        try:
            slot.env.close()
        except Exception:  # a failing close must not keep the slot alive or break the caller
            log.exception("closing env %d failed", env_id)
