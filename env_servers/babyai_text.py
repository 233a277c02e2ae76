"""BabyAI's grid as AgentGym's text: what the agent sees, and the high-level actions it may take. Pure (numpy only).

AgentGym's babyai server (agentenv-babyai) defines the text an agent reads and the actions it can name; rldock's
server must answer the same episode with the same words, so this module reproduces that behaviour from its
description, including its oddities (kept on purpose, each noted where it is made):
- the view is the 7x7 egocentric grid; every visible wall, door, key, ball, box, goal and lava is an object, sorted
  by Manhattan distance (stable, in scan order: far row to near row, left to right);
- objects are numbered per name in that order ("red ball 1", "red ball 2");
- a high-level action is a list of low-level minigrid actions found by a breadth-first search over (cell, heading)
  inside the view; a cell already popped is never pushed again, but a cell pushed twice keeps the *last* parent, so
  the path returned is not always the first one found.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# minigrid's encoding (minigrid.core.constants), headings: 0 east, 1 south, 2 west, 3 north
OBJECTS = {2: "wall", 4: "door", 5: "key", 6: "ball", 7: "box", 8: "goal", 9: "lava"}
COLORS = {0: "red", 1: "green", 2: "blue", 3: "purple", 4: "yellow", 5: "grey"}
DOOR_STATES = {0: "open", 1: "closed", 2: "locked"}
HEADINGS = ((1, 0), (0, 1), (-1, 0), (0, -1))
LEFT, RIGHT, FORWARD, PICKUP, DROP, TOGGLE = 0, 1, 2, 3, 4, 5
BLOCKING = frozenset({"wall", "box", "lava", "ball", "key"})  # cells a path may not enter, and drop may not target
CHECK = "check available actions"


@dataclass(frozen=True)
class Thing:
    """One visible object: `name` as the agent reads it ("red closed door"), its kind, absolute cell, distance."""

    name: str
    kind: str
    cell: tuple[int, int]
    dist: int


def _add(a: tuple[int, int], b: tuple[int, int], k: int = 1) -> tuple[int, int]:
    return a[0] + k * b[0], a[1] + k * b[1]


def _dot(a: tuple[int, int], b: tuple[int, int]) -> int:
    return a[0] * b[0] + a[1] * b[1]


@dataclass
class View:
    """What one observation shows: things by distance, barriers straight ahead, and the search bounds."""

    pos: tuple[int, int]
    heading: int
    things: list[Thing]
    barriers: list[Thing]  # walls and boxes on the line straight ahead; `dist` = steps ahead
    xs: range
    ys: range

    def rel(self, cell: tuple[int, int]) -> tuple[int, int]:
        """(steps ahead, steps to the right) of a cell."""
        d = (cell[0] - self.pos[0], cell[1] - self.pos[1])
        return _dot(HEADINGS[self.heading], d), _dot(HEADINGS[(self.heading + 1) % 4], d)


def _bounds(start: int, end: int) -> range:
    # AgentGym's bounds are one cell wider on one side than the other; the search space depends on it
    return range(end, start + 1) if end < start else range(start, end)


def scan(image: Any, pos: tuple[int, int], heading: int, size: int) -> View:
    """The view of a minigrid observation `image` (size x size x 3) for an agent at `pos` facing `heading`."""
    fwd, right = HEADINGS[heading], HEADINGS[(heading + 1) % 4]
    top_left = _add(_add(pos, fwd, size - 1), right, -(size // 2))
    corner = _add(top_left, (right[0] - fwd[0], right[1] - fwd[1]), size)
    things, barriers = [], []
    for j in range(size):
        for i in range(size):
            cell = _add(_add(top_left, fwd, -j), right, i)
            dist = abs(pos[0] - cell[0]) + abs(pos[1] - cell[1])
            if cell[0] < 0 or cell[1] < 0 or dist == 0:
                continue
            kind_idx, color_idx, state_idx = (int(v) for v in image[i, j])
            kind = OBJECTS.get(kind_idx)
            if kind is None:
                continue
            color = COLORS[color_idx]
            name = f"{color} {DOOR_STATES[state_idx]} door" if kind == "door" else f"{color} {kind}"
            things.append(Thing(name, kind, cell, dist))
            d = (cell[0] - pos[0], cell[1] - pos[1])
            if kind in ("box", "wall") and fwd[0] * d[1] - fwd[1] * d[0] == 0:
                barriers.append(Thing(kind, kind, cell, _dot(fwd, d)))
    things.sort(key=lambda t: t.dist)
    barriers.sort(key=lambda t: t.dist)
    return View(pos, heading, things, barriers, _bounds(top_left[0], corner[0]), _bounds(top_left[1], corner[1]))


def describe(view: View, carrying: Any) -> str:
    """AgentGym's description of a view: objects with their positions, the barrier ahead, what is carried."""
    seen = [t for t in view.things if t.kind != "wall"]
    if view.things:
        parts, counts = ["In front of you in this room, you can see several objects: "], {}
        for t in seen:
            counts[t.name] = counts.get(t.name, 0) + 1
            ahead, right = view.rel(t.cell)
            if right == 0:
                where = f"right in front of you {ahead} steps away. "
            else:
                side = "right" if right > 0 else "left"
                where = f"{ahead} steps in front of you and {abs(right)} steps to your {side}. "
            parts.append(f"There is a {t.name} {counts[t.name]} {where} ")
        text = "".join(parts)
    else:
        text = "You cannot see any objects within sight."
    text += "The room has walls around you. "
    if view.barriers:
        text += f"You are facing a {view.barriers[0].name} {view.barriers[0].dist} steps away. "
    if carrying is not None:
        return text + f"You are carrying a {carrying.color} {carrying.type}."
    return text + "You are not carrying anything."


def find_path(view: View, goal: tuple[int, int], arrive: bool) -> list[int] | None:
    """Low-level actions that bring the agent onto `goal` (`arrive`) or facing it from next door; None if none."""
    blocked = {t.cell for t in view.things + view.barriers if t.kind in BLOCKING}
    start = (view.pos, view.heading)
    queue, popped, parent = [start], set(), {}
    while queue:
        node = queue.pop(0)
        popped.add(node)
        pos, heading = node
        if (pos == goal) if arrive else (_add(pos, HEADINGS[heading]) == goal):
            path = []
            while node != start:
                node, action = parent[node]
                path.append(action)
            return path[::-1]
        for action in (FORWARD, LEFT, RIGHT):
            if action == FORWARD:
                nxt = (_add(pos, HEADINGS[heading]), heading)
            else:
                nxt = (pos, (heading + (1 if action == RIGHT else -1)) % 4)
            cell = nxt[0]
            if cell[0] not in view.xs or cell[1] not in view.ys or nxt in popped or cell in blocked:
                continue
            queue.append(nxt)
            parent[nxt] = (node, action)  # a later push overwrites the parent (see the module docstring)
    return None


def _numbered(actions: dict, errors: dict, counts: dict, verb: str, name: str, path: list[int] | None) -> None:
    """Add "<verb> <name> <n>", numbering only the names a path reaches; else the "no path" error for the next n."""
    first = f"{verb} {name} 1"
    if path is not None:
        counts[name] = 1 if first not in actions else counts[name] + 1
        actions[f"{verb} {name} {counts[name]}"] = path
    else:
        key = first if first not in actions else f"{verb} {name} {counts[name] + 1}"
        errors[key] = f"You cannot {verb} {key.removeprefix(verb + ' ')}, as there is no path leading to it."


def _door_actions(view: View, carrying: Any, actions: dict, errors: dict) -> None:
    counts: dict[str, int] = {}
    for t in view.things:
        if t.kind != "door":
            continue
        counts[t.name] = counts.get(t.name, 0) + 1
        label, state = f"{t.name} {counts[t.name]}", t.name.split(" ")[1]
        if state == "open":
            path = find_path(view, t.cell, arrive=True)
            if path is not None:
                actions[f"go through {label}"] = path
            else:
                errors[f"go through {label}"] = f"You cannot go through {label}, as there is no path leading to it."
            continue
        if state == "locked":
            why = None
            if carrying is None or carrying.type != "key":
                why = "as you are not carrying a key."
            elif carrying.color != t.name.split(" ")[0]:
                why = "as the color of the key you are carrying does not match the color of door."
            if why:
                errors[f"toggle and go through {label}"] = f"You cannot toggle and go through {label}, {why}"
                continue
        path = find_path(view, t.cell, arrive=False)
        if path is not None:
            actions[f"toggle and go through {label}"] = path + [TOGGLE, FORWARD]
        else:  # AgentGym prints its whole door-count dict here
            errors[f"toggle and go through {label}"] = (
                f"You cannot toggle and go through {t.name} {counts}, as there is no path leading to it."
            )
        if path == []:
            actions["toggle"] = [TOGGLE]
        if state == "closed":
            errors[f"go through {label}"] = (
                f"You cannot go through {label}, as it is closed. You should toggle it first."
            )


def plan(view: View, carrying: Any) -> tuple[dict[str, list[int]], dict[str, str]]:
    """The actions available now (name → low-level actions, in AgentGym's order) and the errors for the others."""
    actions: dict[str, list[int]] = {"turn left": [LEFT], "turn right": [RIGHT]}
    errors: dict[str, str] = {}
    if not view.barriers or view.barriers[0].dist > 1:
        actions["move forward"] = [FORWARD]
    else:
        errors["move forward"] = "There is a barrier in front of you, you can't move forward."
    if carrying is None:
        counts: dict[str, int] = {}
        for t in view.things:
            if t.kind not in ("wall", "door", "goal"):
                path = find_path(view, t.cell, arrive=False)
                _numbered(actions, errors, counts, "pickup", t.name, None if path is None else path + [PICKUP])
        errors["drop"] = "You cannot drop the object, as you are not carrying anything."
    else:
        ahead = _add(view.pos, HEADINGS[view.heading])
        if any(t.cell == ahead and t.kind in BLOCKING for t in view.things):
            errors["drop"] = "You cannot drop the object, as there is already an object in front of you."
        else:
            actions["drop"] = [DROP]
    _door_actions(view, carrying, actions, errors)
    for t in view.things:
        if t.kind == "goal":
            path = find_path(view, t.cell, arrive=True)
            if path is not None:
                actions["go to goal"] = path
            else:
                errors["go to goal"] = "You cannot go to the goal, as there is no path leading to it."
    counts = {}
    for t in view.things:
        if t.kind not in ("wall", "goal"):
            _numbered(actions, errors, counts, "go to", t.name, find_path(view, t.cell, arrive=False))
    actions[CHECK] = []
    return actions, errors


def actions_suffix(actions: dict[str, list[int]]) -> str:
    """AgentGym appends the action names to every observation it sends."""
    return "\nAvailable actions: [" + ", ".join(f'"{a}"' for a in actions) + "]"


def goal_text(mission: str) -> str:
    """The mission as AgentGym words it: "then" and "after you" read as "and"."""
    return mission.replace("then", "and").replace("after you", "and")
