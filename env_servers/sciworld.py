"""ScienceWorld (the `scienceworld` package, which runs a Java simulator) as AgentGym's sciworld server plays it.

Needs `pip install scienceworld` and a Java runtime (Debian: default-jre-headless). Without them the factory raises
`EnvUnavailable` with one line saying what is missing.

Dataset item `idx` is AgentGym's: the (task, variation) pairs of every task but 5-1, 5-2, 9-1, 9-2, 9-3, 10-1 and
10-2, all variations of a task before the next, in the simulator's task order (`--data` may name the tasks instead).
Tasks load with ScienceWorld's default simplifications (the `simplification` option, e.g. "easy", is rldock's
opt-in). `score` is the game score (0-100, negative when the task is failed) and `reward` its change since the last
step, as ints; the reset answer already carries the opening "look around" (whose score some variations start above
0). The episode ends when the task is completed or failed, or after STEP_LIMIT moves. Each slot runs its own JVM (a
few seconds to start, a few hundred MB), so keep `--max-envs` modest.

Steps talk to the simulator's server object directly: `ScienceWorldEnv.step` also lists every valid action after
each move, which takes ~1 s of the ~1.07 s a step costs there (measured on a 2-core CPU); the answers are the same.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from typing import Any

from env_servers.api import Env, EnvError, Observation, StepResult
from env_servers.gsm8k import check_index
from env_servers.protocol import Wire
from env_servers.registry import EnvUnavailable

STEP_LIMIT = 100  # ScienceWorldEnv's default envStepLimit, which AgentGym's server keeps
EXCLUDED_TASKS = frozenset({"5-1", "5-2", "9-1", "9-2", "9-3", "10-1", "10-2"})  # left out by AgentGym's server
WIRE = Wire(
    greeting="This is environment ScienceWorld.",
    reset_keys=("task_name", "var_num", "task_description", "observation", "reward", "score", "deleted", "done"),
    step_keys=("observation", "reward", "score", "done"),
    queries=("action_hint", "goals", "task_description", "object_tree", "state"),
    detail=True,
)


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
    """All (task, variation) pairs of `tasks` (default: AgentGym's, every task but EXCLUDED_TASKS)."""
    sim = sims.take()
    try:
        if tasks is None:
            tasks = [name for tid, name in sim.tasks.items() if tid not in EXCLUDED_TASKS]
        names = list(sim.get_task_names())
        unknown = sorted(set(tasks) - set(names))
        if unknown:
            raise EnvError(f"unknown ScienceWorld task(s) {', '.join(unknown)}; known: {', '.join(names)}")
        return [(t, v) for t in tasks for v in range(sim.get_max_variations(t))]
    finally:
        sims.give(sim)


class SciWorldEnv(Env):
    """One ScienceWorld simulator (a JVM) per slot, taken from `sims` and given back on close."""

    name = "sciworld"

    def __init__(self, variations: list[tuple[str, int]], simplification: str = "", sims: Simulators | None = None):
        self.variations, self.simplification = variations, simplification
        self._sims = sims or Simulators()
        self._sim = self._sims.take()
        self._fields: dict[str, Any] | None = None  # task_name, var_num, task_description of the episode
        self._obs = ""
        self._score = 0

    def __len__(self) -> int:
        return len(self.variations)

    def reset(self, idx: int) -> Observation:
        if self._sim is None:
            raise EnvError("this env is closed")
        task, variation = self.variations[check_index(idx, len(self.variations))]
        self._sim.load(task, variation, self.simplification)
        description = self._sim.get_task_description()
        self._score = 0
        look, reward, done = self._move("look around")
        self._fields = {"task_name": task, "var_num": variation, "task_description": description}
        info = {"task": task, "variation": variation, "done": done}
        return Observation(look, info, reward=reward, score=self._score, fields=dict(self._fields))

    def step(self, action: str) -> StepResult:
        if self._fields is None:
            raise EnvError("call reset before step")
        obs, reward, done = self._move(action)
        return StepResult(obs, reward, done, {"moves": int(self._sim.get_num_moves())}, score=self._score)

    def _move(self, action: str) -> tuple[str, int, bool]:
        """One simulator move, scored as ScienceWorldEnv.step scores it: (observation, reward, done)."""
        self._obs = str(self._sim.server.step(action))
        score = int(round(100 * self._sim.server.getScore()))
        reward, self._score = score - self._score, score
        done = bool(self._sim.server.getCompleted()) or score < 0 or self._sim.get_num_moves() > STEP_LIMIT
        return self._obs, reward, done

    def observation(self) -> str:
        if self._fields is None:
            raise EnvError("no observation: call reset first")
        return self._obs

    def available_actions(self) -> list[str]:
        if self._fields is None:
            raise EnvError("no actions: call reset first")
        return list(self._sim.get_valid_action_object_combinations())

    def query(self, what: str) -> Any:
        """AgentGym's sciworld GET routes: action_hint, goals, task_description, object_tree, state."""
        if self._fields is None:
            raise EnvError("call reset first")
        sim = self._sim
        if what == "action_hint":
            return {"possible_actions": sim.get_possible_actions(), "possible_objects": sim.get_possible_objects()}
        if what == "goals":
            return {"goals": sim.get_goal_progress()}
        if what == "task_description":
            return {"task_description": sim.get_task_description()}
        if what == "object_tree":
            return {"object_tree": sim.getObjectTree()}
        if what == "state":
            return {
                "observation": sim.look(),
                "inventory": sim.inventory(),
                "task_description": sim.get_task_description(),
                "goal_progress": sim.get_goal_progress(),
                "possible_actions": sim.get_possible_actions()[:10],
                "possible_objects": sim.get_possible_objects()[:10],
                "current_moves": sim.get_num_moves(),
            }
        return super().query(what)

    def close(self) -> None:
        sim, self._sim, self._fields = self._sim, None, None
        if sim is not None:
            self._sims.give(sim)


def factory(data: str | None = None, keep_simulators: int = 8, simplification: str = "") -> Callable[[], Env]:
    """`data`: comma-separated ScienceWorld task names (default: AgentGym's 23 tasks); `simplification`: e.g. "easy"
    (default: none, as AgentGym loads them)."""
    tasks = [t.strip() for t in data.split(",") if t.strip()] if data else None
    sims = Simulators(keep_simulators)
    variations = list_variations(sims, tasks)
    return lambda: SciWorldEnv(variations, simplification, sims=sims)
