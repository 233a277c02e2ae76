"""BabyAI as AgentGym's babyai server plays it: minigrid levels, the view in words, high-level actions by name.

Dataset item `idx` is AgentGym's: level `LEVELS[idx % 40]` with seed `idx // 40` (`--data` may name other levels,
then `idx % len(levels)`). Observations, actions, rewards and done flags follow agentenv-babyai (see
`env_servers.babyai_text` for the text and the action search): an action is one of the names listed under
"Available actions" ("go to red ball 1", "pickup grey key 1", "toggle and go through red closed door 1", "move
forward", ...), matched exactly after lower-casing; anything else leaves the state as it was and answers why.
`reward` is minigrid's (1 - 0.9 * steps/max_steps) of the last low-level step; the episode is done when minigrid
ends it with reward > 0.5. minigrid's own step limit does not end an episode (AgentGym ignores it): the client's
round limit does.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from env_servers import babyai_text as text
from env_servers.api import Env, EnvError, Observation, StepResult
from env_servers.gsm8k import check_index
from env_servers.protocol import Wire

# AgentGym's 40 levels, in its order (item i plays level i % 40)
LEVELS = (
    "BabyAI-GoToRedBallGrey-v0", "BabyAI-GoToRedBall-v0", "BabyAI-GoToRedBallNoDists-v0", "BabyAI-GoToObjS6-v0",
    "BabyAI-GoToLocalS8N7-v0", "BabyAI-GoToObjMazeS7-v0", "BabyAI-GoToImpUnlock-v0", "BabyAI-GoToSeqS5R2-v0",
    "BabyAI-GoToRedBlueBall-v0", "BabyAI-GoToDoor-v0", "BabyAI-GoToObjDoor-v0", "BabyAI-Open-v0",
    "BabyAI-OpenRedDoor-v0", "BabyAI-OpenDoorLoc-v0", "BabyAI-OpenRedBlueDoorsDebug-v0",
    "BabyAI-OpenDoorsOrderN4Debug-v0", "BabyAI-Pickup-v0", "BabyAI-UnblockPickup-v0", "BabyAI-PickupLoc-v0",
    "BabyAI-PickupDistDebug-v0", "BabyAI-PickupAbove-v0", "BabyAI-PutNextLocalS6N4-v0",
    "BabyAI-PutNextS7N4Carrying-v0", "BabyAI-Unlock-v0", "BabyAI-UnlockLocalDist-v0", "BabyAI-KeyInBox-v0",
    "BabyAI-UnlockPickupDist-v0", "BabyAI-BlockedUnlockPickup-v0", "BabyAI-UnlockToUnlock-v0",
    "BabyAI-ActionObjDoor-v0", "BabyAI-FindObjS7-v0", "BabyAI-KeyCorridorS6R3-v0", "BabyAI-OneRoomS20-v0",
    "BabyAI-MoveTwoAcrossS8N9-v0", "BabyAI-SynthS5R2-v0", "BabyAI-SynthLoc-v0", "BabyAI-SynthSeq-v0",
    "BabyAI-MiniBossLevel-v0", "BabyAI-BossLevel-v0", "BabyAI-BossLevelNoUnlock-v0",
)  # fmt: skip
SEEDS_PER_LEVEL = 10_000
WIRE = Wire(
    greeting="This is environment BabyAI.",
    reset_keys=("observation", "reward", "score", "deleted", "done"),
    step_keys=("observation", "reward", "score", "done"),
    observation_dict=True,
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


class BabyAIEnv(Env):
    """One BabyAI episode at a time; each level's minigrid env is built once per slot and reseeded on reset."""

    name = "babyai"

    def __init__(self, levels: tuple[str, ...] = LEVELS):
        self._gym = _import_minigrid()
        self.levels = levels
        self._envs: dict[str, Any] = {}
        self._env: Any = None

    def __len__(self) -> int:
        return len(self.levels) * SEEDS_PER_LEVEL

    def reset(self, idx: int) -> Observation:
        check_index(idx, len(self))
        level, seed = self.levels[idx % len(self.levels)], idx // len(self.levels)
        try:
            env = self._envs.get(level) or self._envs.setdefault(level, self._gym.make(level))
        except self._gym.error.Error as e:  # e.g. a level this minigrid marks deprecated: AgentGym says so too
            raise EnvError(str(e)) from None
        obs, _ = env.reset(seed=seed)
        self._env, self._image, self.reward, self._done = env, obs["image"], 0, False
        self._goal = text.goal_text(env.unwrapped.mission)
        self._look(obs)
        return Observation(self.observation(), {"level": level, "seed": seed, "mission": env.unwrapped.mission})

    def _look(self, obs: dict) -> None:
        """Describe `obs` and list the actions it allows."""
        u = self._env.unwrapped
        view = text.scan(obs["image"], tuple(int(v) for v in u.agent_pos), int(obs["direction"]), u.agent_view_size)
        self._state = text.describe(view, u.carrying)
        self._actions, self._errors = text.plan(view, u.carrying)

    def step(self, action: str) -> StepResult:
        if self._env is None:
            raise EnvError("call reset before step")
        action = action.lower().strip()
        valid = "check" in action or action in self._actions
        if "check" in action:
            self._state = "You can take the following actions: " + ", ".join(self._actions)
        elif not action:
            self._state = "No change in state."
        elif action not in self._actions:
            self._state = self._errors.get(action, "The action is not recognized. Please check valid actions.")
        elif not self._actions[action]:
            self._state = "No change in state."
        else:
            self._act(self._actions[action])
        info = {"success": self._done, "valid_action": valid}
        return StepResult(self._state + text.actions_suffix(self._actions), self.reward, self._done, info)

    def _act(self, low_level: list[int]) -> None:
        """Run the low-level actions, stopping after one that changed nothing in view (it failed)."""
        for a in low_level:
            obs, reward, terminated, _, _ = self._env.step(a)
            changed = (obs["image"] != self._image).any()
            self._image = obs["image"]
            if not changed:
                break
        self._look(obs)
        self.reward = reward
        if terminated:
            self._state += "\n The task is completed."  # AgentGym keeps this line even when it then says not done
        self._done = bool(terminated) and reward > 0.5

    def observation(self) -> str:
        if self._env is None:
            raise EnvError("no observation: call reset first")
        return f"Your goal: {self._goal}\n{self._state}{text.actions_suffix(self._actions)}"

    def available_actions(self) -> list[str]:
        if self._env is None:
            raise EnvError("no actions: call reset first")
        return list(self._actions)

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs.clear()


def factory(data: str | None = None) -> Callable[[], Env]:
    """`data`: comma-separated BabyAI level ids (default: AgentGym's 40). The defaults are not checked here: a level
    this minigrid lacks answers its reset with gymnasium's error, as AgentGym's server does; levels asked for are."""
    gym = _import_minigrid()
    if not data:
        return lambda: BabyAIEnv(LEVELS)
    levels = tuple(s.strip() for s in data.split(",") if s.strip())
    unknown = [lvl for lvl in levels if lvl not in gym.registry]
    if unknown or not levels:
        known = sorted(k for k in gym.registry if k.startswith("BabyAI-"))
        raise EnvError(f"unknown BabyAI level(s) {unknown or data!r}; known: {', '.join(known[:12])}, ...")
    return lambda: BabyAIEnv(levels)
