"""BabyAI as text: levels from the `minigrid` package, the agent's view described in words, actions as words.

Dataset item `idx` is level `levels[idx % L]` with seed `idx // L`, so every index is one reproducible episode.
The observation lists what the agent sees in its 7x7 egocentric view (objects with steps ahead/left/right, what
blocks the way straight ahead, what it carries). Actions: turn left, turn right, go forward, pick up, drop, toggle,
done (AgentGym's "move forward" is accepted too; text after a last "Action:" is used when present). Reward is
minigrid's: 1 - 0.9 * steps/max_steps on success, 0 otherwise; every turn, valid or not, counts toward max_steps.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

from env_servers.api import Env, EnvError, Observation, StepResult
from env_servers.gsm8k import check_index

LEVELS = (
    "BabyAI-GoToRedBallGrey-v0",
    "BabyAI-GoToRedBall-v0",
    "BabyAI-GoToObj-v0",
    "BabyAI-GoToLocal-v0",
    "BabyAI-PickupLoc-v0",
    "BabyAI-PutNextLocal-v0",
    "BabyAI-OpenDoor-v0",
    "BabyAI-GoToDoor-v0",
)
SEEDS_PER_LEVEL = 10_000
# minigrid action numbers: left, right, forward, pickup, drop, toggle, done
ACTIONS = {"turn left": 0, "turn right": 1, "go forward": 2, "pick up": 3, "drop": 4, "toggle": 5, "done": 6}
_ALIASES = {"move forward": 2, "forward": 2, "pickup": 3, "open": 5, "left": 0, "right": 1}
_PHRASES = sorted({**ACTIONS, **_ALIASES}.items(), key=lambda kv: -len(kv[0]))  # longest first: "turn left" > "left"
INSTRUCTIONS = (
    "You are an agent in a grid world. Your mission: {mission}.\n"
    "Each turn, answer with exactly one action: turn left, turn right, go forward, pick up, drop, toggle (open a door "
    "or box in front of you), done. You see only the 7x7 squares in front of you.\n\n{view}"
)


def _import_minigrid():
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")  # minigrid imports pygame, which greets on stdout
    try:
        import gymnasium
        import minigrid  # noqa: F401  (registers the BabyAI levels with gymnasium)
    except ImportError as e:
        from env_servers.registry import EnvUnavailable

        raise EnvUnavailable(f"babyai needs the minigrid package (pip install 'minigrid>=3.0,<4'): {e}") from None
    return gymnasium


def parse_action(text: str) -> int | None:
    """The minigrid action a reply names (the earliest action phrase after the last 'Action:'), or None."""
    text = text.rsplit("Action:", 1)[-1].lower()
    text = re.sub(r"[^a-z ]+", " ", text)
    text = f" {' '.join(text.split())} "
    best: tuple[int, int] | None = None
    for phrase, action in _PHRASES:
        pos = text.find(f" {phrase} ")
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, action)
    return None if best is None else best[1]


def _name(obj: Any) -> str:
    if obj.type == "door":
        state = "locked" if obj.is_locked else "open" if obj.is_open else "closed"
        return f"{state} {obj.color} door"
    return f"{obj.color} {obj.type}"


def _where(ahead: int, right: int) -> str:
    def steps(n: int, word: str) -> str:
        return f"{n} step{'s' if n != 1 else ''} {word}"

    parts = [steps(ahead, "ahead")] if ahead else []
    if right:
        parts.append(steps(abs(right), "to your right" if right > 0 else "to your left"))
    return " and ".join(parts)


def _free(n: int) -> str:
    return "nothing" if n == 0 else f"{n} free square{'s' if n != 1 else ''}"


def describe(env: Any) -> str:
    """The agent's egocentric view of a MiniGridEnv in words."""
    grid, visible = env.gen_obs_grid()
    size = env.agent_view_size
    me_i, me_j = size // 2, size - 1
    seen = []
    for j in range(size):
        for i in range(size):
            obj = grid.get(i, j)
            if visible[i, j] and obj is not None and obj.type != "wall" and (i, j) != (me_i, me_j):
                ahead, right = me_j - j, i - me_i
                seen.append((ahead + abs(right), f"a {_name(obj)} {_where(ahead, right)}"))
    lines = ["You see: " + "; ".join(s for _, s in sorted(seen)) + "." if seen else "You see no objects."]
    for ahead in range(1, size):  # what stops a walk straight ahead
        obj = grid.get(me_i, me_j - ahead)
        if obj is not None and not obj.can_overlap():
            what = "wall" if obj.type == "wall" else _name(obj)
            lines.append(f"Straight ahead: {_free(ahead - 1)}, then a {what}.")
            break
    else:
        lines.append(f"Straight ahead: at least {_free(size - 1)}.")
    carrying = env.carrying
    lines.append(f"You are carrying a {_name(carrying)}." if carrying else "You are carrying nothing.")
    return "\n".join(lines)


class BabyAIEnv(Env):
    """One BabyAI episode at a time; each level's minigrid env is built once per slot and reseeded on reset."""

    name = "babyai"

    def __init__(self, levels: tuple[str, ...] = LEVELS):
        self._gym = _import_minigrid()
        self.levels = levels
        self._envs: dict[str, Any] = {}
        self._env: Any = None
        self._obs = ""
        self._done = False
        self._turns = 0

    def __len__(self) -> int:
        return len(self.levels) * SEEDS_PER_LEVEL

    def reset(self, idx: int) -> Observation:
        check_index(idx, len(self))
        level, seed = self.levels[idx % len(self.levels)], idx // len(self.levels)
        if level not in self._envs:
            self._envs[level] = self._gym.make(level).unwrapped
        self._env = self._envs[level]
        obs, _ = self._env.reset(seed=seed)
        self._done, self._turns = False, 0
        self._obs = INSTRUCTIONS.format(mission=obs["mission"], view=describe(self._env))
        return Observation(self._obs, {"level": level, "seed": seed, "mission": obs["mission"]})

    def step(self, action: str) -> StepResult:
        if self._env is None:
            raise EnvError("call reset before step")
        if self._done:
            raise EnvError("episode is done: call reset to start another")
        self._turns += 1
        act = parse_action(action)
        reward, terminated = 0.0, False
        if act is None:
            self._obs = f"Not an action. Answer with one of: {', '.join(ACTIONS)}.\n{describe(self._env)}"
        else:
            _, reward, terminated, _, _ = self._env.step(act)
            self._obs = describe(self._env)
        truncated = self._turns >= self._env.max_steps
        self._done = bool(terminated or truncated)
        if terminated:
            self._obs += "\nMission complete." if reward > 0 else "\nThe episode ended."
        info = {"success": bool(terminated and reward > 0), "turns": self._turns, "valid_action": act is not None}
        return StepResult(self._obs, float(reward), self._done, info)

    def observation(self) -> str:
        if self._env is None:
            raise EnvError("no observation: call reset first")
        return self._obs

    def available_actions(self) -> list[str]:
        return list(ACTIONS)

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs.clear()


def factory(data: str | None = None) -> Callable[[], Env]:
    """`data`: comma-separated BabyAI level ids (default: eight single-room levels)."""
    gym = _import_minigrid()
    levels = tuple(s.strip() for s in data.split(",") if s.strip()) if data else LEVELS
    unknown = [lvl for lvl in levels if lvl not in gym.registry]
    if unknown or not levels:
        known = sorted(k for k in gym.registry if k.startswith("BabyAI-"))
        raise EnvError(f"unknown BabyAI level(s) {unknown or data!r}; known: {', '.join(known[:12])}, ...")
    return lambda: BabyAIEnv(levels)
