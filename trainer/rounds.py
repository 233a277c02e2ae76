"""How many agent turns an episode may take at a given training step (AgentGym-RL's ScalingInter-RL).

ScalingInter-RL starts with a short interaction horizon, so early, noisy policies learn from short episodes, and
lengthens it as training goes on. `env.rounds_schedule = [[step, rounds], ...]` says: from `step` on, episodes may
take `rounds` turns; before the first listed step they take `env.max_rounds`. An empty schedule is fixed.
"""

from __future__ import annotations

from collections.abc import Sequence


class RoundsSchedule:
    """`at(step)` → the max rounds in force at `step`. Steps must increase; rounds must be >= 1."""

    def __init__(self, max_rounds: int, schedule: Sequence[Sequence[int]] = ()) -> None:
        if max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
        points = [tuple(p) for p in schedule]
        for p in points:
            if len(p) != 2 or p[0] < 0 or p[1] < 1:
                raise ValueError(f"rounds_schedule entries are [step >= 0, rounds >= 1], got {list(p)}")
        steps = [s for s, _ in points]
        if steps != sorted(set(steps)):
            raise ValueError(f"rounds_schedule steps must strictly increase, got {steps}")
        self.max_rounds = max_rounds
        self.points = points

    def at(self, step: int) -> int:
        rounds = self.max_rounds
        for start, r in self.points:
            if step >= start:
                rounds = r
        return rounds
