"""TextCraft (Prasad et al., ADaPT; AgentGym's agentenv-textcraft): craft a Minecraft item from a list of recipes.

The world is a crafting tree read from Minecraft-format recipe files (`<data>/recipes/*.json`, shaped and shapeless
crafting recipes). Item `idx` asks for goal number `idx % N` of the N craftable items, ordered by the depth of their
shallowest recipe tree; its observation lists the recipes needed plus up to 10 distractors, shuffled. Actions, as
AgentGym's server reads them: `get <n> <item>` (base items only), `craft <n> <item> using <n> <item>, ...` (inputs
must match one of the item's recipes exactly; a generic ingredient such as "planks" accepts any item of that kind),
`inventory`. Reward 1 and done when the goal item is crafted or got; everything else answers with a message and
reward 0, and steps after done are still accepted (as upstream).

Where upstream is not reproducible rldock is: it reads recipe files in sorted order (upstream: `os.listdir` order,
which decides item ids) and orders recipe sets before sampling and shuffling (upstream: Python set order, which
changes with PYTHONHASHSEED), so an id is the same task on every run; the seed-42 draws are otherwise the same.

Data: Minecraft's recipe files are Mojang's, not covered by AgentGym's MIT licence, so rldock does not ship them;
point `--data` at a folder holding `recipes/` (AgentGym's `agentenv-textcraft/agentenv_textcraft`). The default is
data/textcraft/, a small recipe set written for rldock's tests and smoke runs.
"""

from __future__ import annotations

import copy
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from env_servers.api import Env, EnvError, Observation, StepResult
from env_servers.protocol import Wire

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "data" / "textcraft"
SEED = 42  # AgentGym reseeds Python's random with 42 at every reset
MAX_DISTRACTORS = 10
WIRE = Wire(
    greeting="This is environment TextCraft.",
    create_resets=True,
    reset_keys=("id", "observation", "done", "reward"),
    step_keys=("observation", "reward", "done"),
    step_after_done=True,
    queries=("commands", "goal"),
    detail=True,
)
_CRAFT = re.compile(r"craft (.*) using (.*)")
_GET = re.compile(r"get ([0-9]+) (.*)")
_COUNT = re.compile(r"([0-9]+) (.*)")


class Failed(Exception):
    """An action the game refuses; its text is the observation."""


def readable(item_id: str) -> str:
    return item_id.replace("minecraft:", "").replace("_", " ")


@dataclass(frozen=True)
class Item:
    """An item id ("minecraft:oak_planks") or a tag, a kind of item ("minecraft:planks"), or both (a recipe output
    in a group)."""

    tag: str | None = None
    item_id: str | None = None

    @property
    def name(self) -> str:
        return self.item_id or self.tag


@dataclass
class Stack:
    item: Item
    count: int

    def __repr__(self) -> str:  # upstream prints this object in one message; the same words here
        return f"ItemTagWithCount(item_tag=ItemTag(tag={self.item.tag!r}, item_id={self.item.item_id!r}), count={self.count!r})"  # noqa: E501


@dataclass(frozen=True)
class Recipe:
    inputs: list[Stack]
    output: Stack

    @property
    def text(self) -> str:
        ins = ", ".join(f"{s.count} {readable(s.item.name)}" for s in self.inputs)
        return f"craft {self.output.count} {readable(self.output.item.name)} using {ins}"


def _ingredient(entry: Any, items: set[str], tags: set[str]) -> Item:
    entry = entry[0] if isinstance(entry, list) else entry
    if "item" in entry:
        items.add(entry["item"])
        return Item(item_id=entry["item"])
    if "tag" in entry:
        tags.add(entry["tag"])
        return Item(tag=entry["tag"])
    raise ValueError(f"recipe ingredient without item or tag: {entry}")


class CraftingTree:
    """Every crafting recipe of a recipe folder, indexed by output item and by output tag."""

    def __init__(self, recipe_dir: Path):
        self.by_item: dict[str, list[Recipe]] = {}
        self.by_tag: dict[str, list[Recipe]] = {}
        self.items: set[str] = set()
        self.tags: set[str] = set()
        self.tag_of: dict[str, str] = {}
        self.deps: dict[
            str, set[str]
        ] = {}  # all inputs an item needs, transitively: recipes closing a cycle are dropped
        self._depth: dict[str, int] = {}
        files = sorted(recipe_dir.glob("*.json"))
        if not files:
            raise EnvError(f"no recipe files (*.json) in {recipe_dir}")
        for path in files:
            self._add(json.loads(path.read_text(encoding="utf-8")))
        self._untag_uncraftable()

    def _inputs(self, recipe: dict) -> list[Stack] | None:
        if recipe["type"] == "minecraft:crafting_shaped":
            return [
                Stack(_ingredient(entry, self.items, self.tags), sum(row.count(key) for row in recipe["pattern"]))
                for key, entry in recipe["key"].items()
            ]
        if recipe["type"] == "minecraft:crafting_shapeless":
            stacks: dict[str, Stack] = {}
            for entry in recipe["ingredients"]:
                item = _ingredient(entry, self.items, self.tags)
                if item.name in stacks:
                    stacks[item.name].count += 1
                else:
                    stacks[item.name] = Stack(item, 1)
            return list(stacks.values())
        return None  # smelting, stonecutting, ...: not crafting

    def _add(self, recipe: dict) -> None:
        inputs = self._inputs(recipe)
        if inputs is None:
            return
        result = recipe["result"]
        out_id, count = (result, 1) if isinstance(result, str) else (result["item"], result.get("count") or 1)
        self.items.add(out_id)
        if len(inputs) == 1 and inputs[0].item.name.endswith("_block"):
            return  # un-crafting a storage block
        tag = f"minecraft:{recipe['group']}" if "group" in recipe else None
        if tag is not None and tag != out_id:
            self.tags.add(tag)
            self.tag_of[out_id] = tag
        deps = self.deps.setdefault(out_id, set())
        if any(out_id in self.deps.get(s.item.name, ()) for s in inputs):
            return
        made = Recipe(inputs, Stack(Item(tag=tag, item_id=out_id), count))
        self.by_item.setdefault(out_id, []).append(made)
        for s in inputs:
            deps.add(s.item.name)
            deps |= self.deps.get(s.item.name, set())
        if tag is not None:
            self.by_tag.setdefault(tag, []).append(made)

    def _untag_uncraftable(self) -> None:
        """A tag input with no craftable member is a base item of that name."""
        untagged = set()
        for recipes in self.by_item.values():
            for recipe in recipes:
                for s in recipe.inputs:
                    tag = s.item.tag
                    if s.item.item_id is None and not any(
                        i in self.by_item for i, t in self.tag_of.items() if t == tag
                    ):
                        s.item = Item(item_id=tag)
                        untagged.add(tag)
        for tag in untagged:
            self.items.add(tag)
            self.tags.remove(tag)

    def craft(self, wanted: Recipe) -> Stack | None:
        """The output of the recipe of `wanted`'s item whose inputs `wanted` gives exactly, or None."""
        for recipe in self.by_item.get(wanted.output.item.item_id, []):
            offered = copy.deepcopy(wanted.inputs)
            for need in recipe.inputs:
                match = next((s for s in offered if self._fits(need.item, s.item)), None)
                if match is None or match.count != need.count:
                    break
                offered.remove(match)
            else:
                if not offered:
                    return recipe.output
        return None

    def _fits(self, need: Item, given: Item) -> bool:
        if need.item_id is not None:
            return given.item_id == need.item_id
        return need.tag is not None and (given.tag == need.tag or self.tag_of.get(given.item_id) == need.tag)

    def depth(self, name: str) -> int:
        """Levels of crafting the shallowest way to make `name` takes (0: a base item)."""
        if name not in self._depth:
            recipes = self.by_item.get(name) or self.by_tag.get(name)
            self._depth[name] = (
                min(max(self.depth(s.item.name) + 1 for s in r.inputs) for r in recipes) if recipes else 0
            )
        return self._depth[name]

    def goals(self) -> list[str]:
        """Craftable items by depth (stable), the order items ids index."""
        return [
            i for i, _ in sorted(((i, self.depth(i)) for i in self.by_item if self.depth(i) >= 1), key=lambda x: x[1])
        ]

    def tree(self, name: str, seen: frozenset[str] = frozenset()) -> list[Recipe]:
        """Every recipe that can take part in making `name` (with repeats), breadth of a level first."""
        if name in seen:
            return []
        recipes = self.by_item.get(name) or self.by_tag.get(name) or []
        out = list(recipes)
        for r in recipes:
            for s in r.inputs:
                out += self.tree(s.item.name, seen | {name})
        return out

    def uses(self) -> dict[str, list[Recipe]]:
        """Recipes by each input they take."""
        out: dict[str, list[Recipe]] = {}
        for recipes in list(self.by_item.values()) + list(self.by_tag.values()):
            for r in recipes:
                for s in r.inputs:
                    out.setdefault(s.item.name, []).append(r)
        return out

    def commands(self, goal: str) -> str:
        """The recipe list shown for `goal`: its tree's recipes and up to 10 distractors, shuffled (seeded)."""
        rng = random.Random(SEED)
        uses, needed = self.uses(), self.tree(goal)
        distractors = []
        for r in needed:
            for s in r.inputs:
                pool = uses.get(s.item.name, [])
                distractors += rng.sample(pool, min(len(pool), 10))
        shown = sorted({r.text for r in needed})
        extra = sorted({d.text for d in distractors} - set(shown))
        lines = shown + rng.sample(extra, min(len(extra), MAX_DISTRACTORS))
        rng.shuffle(lines)
        return "\n".join(lines)


class TextCraftEnv(Env):
    name = "textcraft"

    def __init__(self, tree: CraftingTree):
        self.tree = tree
        self._goals = tree.goals()
        self.inventory: dict[str, int] = {}
        self.goal: str | None = None
        self.commands = ""

    def __len__(self) -> int:
        return len(self._goals)

    def reset(self, idx: int) -> Observation:
        if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
            raise EnvError(f"data index must be a non-negative integer, got {str(idx)[:50]!r}")
        goal = self._goals[idx % len(self._goals)]
        return self._start(self.tree.commands(goal), goal, {"data_idx": idx})

    def _start(self, commands: str, goal: str, info: dict) -> Observation:
        self.inventory, self.commands, self.goal = {}, commands, goal
        self._obs = f"Crafting commands:\n{commands}\n\nGoal: craft {readable(goal)}."
        return Observation(self._obs, {**info, "goal": goal})

    def step(self, action: str) -> StepResult:
        if self.goal is None:
            raise EnvError("call reset before step")
        try:
            self._obs, reward = self._act(action)
        except Failed as e:
            self._obs, reward = str(e), 0
        return StepResult(self._obs, reward, reward == 1, {"success": reward == 1})

    def _act(self, action: str) -> tuple[str, int]:
        if m := _CRAFT.match(action):
            return self._craft(m.group(1), m.group(2))
        if m := _GET.match(action):
            return self._get(m.group(2), int(m.group(1)))
        if re.match("inventory", action):
            held = "".join(f"[{readable(i)}] ({n}) " for i, n in self.inventory.items())
            return "Inventory: " + (held or "You are not carrying anything."), 0
        raise Failed(f"Could not execute {action}")

    def _item(self, text: str) -> Item:
        item_id = "minecraft:" + text.replace(" ", "_")
        return Item(tag=item_id) if item_id in self.tree.tags else Item(item_id=item_id)

    def _stack(self, text: str, default_count: int | None = None) -> Stack:
        m = _COUNT.match(text)
        if m:
            return Stack(self._item(m.group(2)), int(m.group(1)))
        if default_count is None:
            raise Failed(f"Wrong item format: {text}")
        return Stack(self._item(text), default_count)

    def _craft(self, output: str, inputs: str) -> tuple[str, int]:
        wanted = Recipe([self._stack(s.strip()) for s in inputs.split(",")], self._stack(output, 1))
        if any(s.item.item_id not in self.inventory or self.inventory[s.item.item_id] < s.count for s in wanted.inputs):
            raise Failed(f"Could not find enough items to craft {wanted.output.item.item_id}")
        made = self.tree.craft(wanted)
        if made is None:
            raise Failed(f"Could not find a valid recipe for {wanted.output!r}")
        for s in wanted.inputs:
            self.inventory[s.item.item_id] -= s.count
            if self.inventory[s.item.item_id] == 0:
                del self.inventory[s.item.item_id]
        self._add(made.item.item_id, made.count)
        return f"Crafted {made.count} {made.item.item_id}", int(made.item.item_id == self.goal)

    def _get(self, text: str, count: int) -> tuple[str, int]:
        item = self._item(text)
        craftable = item.name in self.tree.by_item or item.name in self.tree.by_tag
        if craftable or item.item_id is None or item.item_id not in self.tree.items:
            raise Failed(f"Could not find {text}")
        self._add(item.item_id, count)
        return f"Got {count} {text}", int(item.item_id == self.goal)

    def _add(self, item_id: str, count: int) -> None:
        self.inventory[item_id] = self.inventory.get(item_id, 0) + count

    def observation(self) -> str:
        if self.goal is None:
            raise EnvError("no observation: call reset first")
        return self._obs

    def query(self, what: str) -> Any:
        if what == "commands":
            return self.commands
        if what == "goal":
            return self.goal
        return super().query(what)


def factory(data: str | None = None) -> Callable[[], Env]:
    """`data`: a folder holding `recipes/` (default: the shipped data/textcraft)."""
    folder = Path(data) if data else DEFAULT_DATA
    if not (folder / "recipes").is_dir():
        raise EnvError(f"no recipes/ folder in {folder}")
    tree = CraftingTree(folder / "recipes")
    if not tree.goals():
        raise EnvError(f"the recipes in {folder} make nothing craftable")
    return lambda: TextCraftEnv(tree)
