"""ScienceWorld (the `scienceworld` package, which runs a Java simulator): optional.

Needs `pip install scienceworld` and a Java runtime (Debian: default-jre-headless). Without them the factory raises
`EnvUnavailable` with one line saying what is missing.

Dataset item `idx` enumerates (task, variation) pairs: all variations of the first task, then of the next, in the
simulator's task order (restricted to the tasks `--data` names). Each slot runs its own JVM (a few seconds to start,
a few hundred MB), so keep `--max-envs` modest. Step reward = the change of the game score (0–100) / 100, so an
episode's rewards sum to its final score in [0, 1]; a failed task (score < 0) or STEP_LIMIT moves end the episode.

Steps talk to the simulator's server object directly: `ScienceWorldEnv.step` also lists every valid action after
each move, which takes ~1 s of the ~1.07 s a step costs there (measured on a 2-core CPU).
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from typing import Any

from env_servers.api import Env, EnvError, Observation, StepResult
from env_servers.gsm8k import check_index
from env_servers.registry import EnvUnavailable

STEP_LIMIT = 100


def _import_scienceworld() -> Any:
    if shutil.which("java") is None:
        raise EnvUnavailable("sciworld needs Java on PATH (Debian: apt-get install default-jre-headless)")
    try:
        from scienceworld import ScienceWorldEnv
    except ImportError:
        raise EnvUnavailable("sciworld needs the scienceworld package (pip install 'scienceworld>=1.2,<2')") from None
    return ScienceWorldEnv


class Simulators:
    """Idle simulators kept for reuse (up to `keep`): a JVM takes seconds to start, and the trainer opens one env per
    episode. `load` resets everything a simulator holds, so a reused one is as good as new."""

    def __init__(self, keep: int = 0):
        self.keep = keep
        self._idle: list[Any] = []
        self._lock = threading.Lock()

    def take(self) -> Any:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return _import_scienceworld()("", envStepLimit=STEP_LIMIT)

    def give(self, sim: Any) -> None:
        with self._lock:
            if len(self._idle) < self.keep:
                self._idle.append(sim)
                return
        sim.close()

    def close_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for sim in idle:
            sim.close()


def list_variations(sims: Simulators, tasks: list[str] | None = None) -> list[tuple[str, int]]:
    """All (task, variation) pairs of `tasks` (default: every task)."""
    sim = sims.take()
    try:
        names = list(sim.get_task_names())
        unknown = sorted(set(tasks or []) - set(names))
        if unknown:
            raise EnvError(f"unknown ScienceWorld task(s) {', '.join(unknown)}; known: {', '.join(names)}")
        return [(t, v) for t in (tasks or names) for v in range(sim.get_max_variations(t))]
    finally:
        sims.give(sim)


class SciWorldEnv(Env):
    """One ScienceWorld simulator (a JVM) per slot, taken from `sims` and given back on close."""

    name = "sciworld"

    def __init__(self, variations: list[tuple[str, int]], simplification: str = "easy", sims: Simulators | None = None):
        self.variations, self.simplification = variations, simplification
        self._sims = sims or Simulators()
        self._sim = self._sims.take()
        self._task: str | None = None
        self._obs = ""
        self._score = 0
        self._done = False

    def __len__(self) -> int:
        return len(self.variations)

    def reset(self, idx: int) -> Observation:
        if self._sim is None:
            raise EnvError("this env is closed")
        task, variation = self.variations[check_index(idx, len(self.variations))]
        self._sim.load(task, variation, self.simplification)
        self._sim.server.reset()
        look, _, _ = self._move("look around")
        # score 0, not the starting score: some variations start with credit (e.g. 8), which the first step's reward
        # then includes, so an episode's rewards always sum to its final score / 100
        self._task, self._score, self._done = self._sim.get_task_description(), 0, False
        self._obs = f"{self._task}\n{look}"
        return Observation(self._obs, {"task_description": self._task, "task": task, "variation": variation})

    def step(self, action: str) -> StepResult:
        if self._task is None:
            raise EnvError("call reset before step")
        if self._done:
            raise EnvError("episode is done: call reset to start another")
        text = action.rsplit("Action:", 1)[-1].strip()  # AgentGym replies end with "Action:\n<action>"
        action = text.splitlines()[0] if text else ""
        self._obs, score, moves = self._move(action)
        reward = (max(score, 0) - max(self._score, 0)) / 100.0
        self._score = score
        self._done = bool(self._sim.server.getCompleted()) or score < 0 or moves > STEP_LIMIT
        return StepResult(self._obs, reward, self._done, {"game_score": score, "moves": moves})

    def _move(self, action: str) -> tuple[str, int, int]:
        """One simulator move: (observation, game score 0-100 or negative on failure, moves so far)."""
        observation = str(self._sim.server.step(action))
        return observation, int(round(100 * self._sim.server.getScore())), int(self._sim.get_num_moves())

    def observation(self) -> str:
        if self._task is None:
            raise EnvError("no observation: call reset first")
        return self._obs

    def available_actions(self) -> list[str]:
        if self._task is None:
            raise EnvError("no actions: call reset first")
        return list(self._sim.get_valid_action_object_combinations())

    def close(self) -> None:
        sim, self._sim, self._task = self._sim, None, None
        if sim is not None:
            self._sims.give(sim)


def factory(data: str | None = None, keep_simulators: int = 8) -> Callable[[], Env]:
    """`data`: comma-separated ScienceWorld task names (default: all 30 tasks)."""
    tasks = [t.strip() for t in data.split(",") if t.strip()] if data else None
    sims = Simulators(keep_simulators)
    variations = list_variations(sims, tasks)
    return lambda: SciWorldEnv(variations, sims=sims)
