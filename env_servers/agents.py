"""The client side of AgentGym's envs: how an agent is prompted, how its reply becomes an action, how rewards scale.

AgentGym's servers expect what its client classes (agentenv.envs.*) send: the client opens the conversation with the
env's instructions and a scripted "OK" from the model, cuts the action out of each reply (babyai and TextCraft: the
line after "Action:", stripped to letters, digits, commas and spaces; sciworld: the ReAct text after the last
"Action:"; searchqa: the whole reply) and reports `score` (babyai, sciworld) or `reward` as the episode's result.
The trainer and the eval runner both talk to env servers through `AgentSpec`s, defined once here. Pure Python.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

OK = "OK. I'll follow your instructions and try my best to solve the task."
ONE_ACTION = "Error: Only one 'Action' is allowed per response. Please adjust your response."


class NoAction(Exception):
    """The reply cannot be sent (AgentGym's client answers it without calling the server); the text says why."""


def action_line(reply: str) -> str:
    """babyai and TextCraft: the one "Action:" line, cleaned; two or more "Action:" lines are refused."""
    found = re.findall(r"Action:\s*(.*?)(?=\n|$)", reply, re.DOTALL)
    if len(found) > 1:
        raise NoAction(ONE_ACTION)
    action = re.sub(r"[^A-Za-z0-9, ]+", "", found[-1] if found else "")
    return " ".join(action.split())


def react_action(reply: str) -> str:
    """sciworld (ReAct): everything after the last "Action:", stripped; "" when there is none."""
    parts = reply.rsplit("Action:", 1)
    return parts[1].strip() if len(parts) == 2 else ""


def whole_reply(reply: str) -> str:
    return reply


@dataclass(frozen=True)
class AgentSpec:
    """How to run one env the way AgentGym's client does."""

    instructions: str | None
    """The opening user turn (None: the first observation is the whole prompt)."""
    to_action: Callable[[str], str]
    """Model reply → the action text sent to /step (may raise NoAction)."""
    ack: str = OK
    """The model's scripted answer to `instructions`."""
    score_scale: float = 1.0
    """The env's best episode score (sciworld: 100); training rewards are scores / this."""
    prompt_with_task: bool = False
    """The reset answer's `task_description` goes before the first observation (sciworld)."""


BABYAI = (
    "You are an exploration master that wants to finish every goal you are given. Every round I will give you an "
    "observation, and you have to respond an action and your thought based on the observation to finish the given "
    "task. You are placed in a room and you need to accomplish the given goal with actions.\n\nYou can use the "
    "following actions: \n\n- turn right \n\n- turn left \n\n- move forward \n\n- go to <obj> <id> \n\n- pick up <obj> "
    "<id> \n\n- go through <door> <id>: <door> must be an open door. \n\n- toggle and go through <door> <id>: <door> "
    "can be a closed door or a locked door. If you want to open a locked door, you need to carry a key that is of the "
    "same color as the locked door. \n\n- toggle: there is a closed or locked door right in front of you and you can "
    "toggle it.\nYour response should use the following format:\nThought:\n<Your Thought>\n\nAction:\n<Your Action>"
)
TEXTCRAFT = (
    'You are given few useful crafting recipes to craft items in Minecraft. Crafting commands are of the format "craft '
    '[target object] using [input ingredients]".\nEvery round I will give you an observation, you have to respond an '
    'action based on the state and instruction. You can "get" an object (ingredients) from the inventory or the '
    'environment, look-up the game inventory by "inventory", or "craft" (target) using any of the crafting commands.\n'
    'Your output must strictly follow this format:"Thought:\nyour thoughts.\n\nAction:\nyour next action"\n\nReminder: '
    '\n1. Always specify the quantity when using "get" and "craft" commands. - Example of get: get 1 lapis lazuli - '
    "Example1 of craft: craft 1 blue dye using 1 lapis lazuli - Example2 of craft: craft 1 golden carrot using 8 gold "
    'nugget, 1 carrot\n2. When using "get" command, do not specify whether the item comes from the inventory or the '
    "environment.\n3. You can use ONLY crafting commands provided, do not use your own crafting commands. However, if "
    'the crafting command uses a generic ingredient like "planks", you can use special types of the same ingredient '
    'e.g. "dark oak planks" in the command instead.\n\n'
)
SCIWORLD = (
    "You are an agent for science world. Every round I will give you an observation, you have to respond an action "
    "based on the observation to finish the given task. Actions: open/close OBJ, activate/deactivate OBJ, connect OBJ "
    "to OBJ, disconnect OBJ, use OBJ [on OBJ], look around, look at OBJ, look in OBJ, read OBJ, move OBJ to OBJ, pick "
    "up OBJ, put down OBJ, pour OBJ into OBJ, dunk OBJ into OBJ, mix OBJ, go to LOC, eat OBJ, flush OBJ, focus on OBJ "
    "(signal intent on a task object), wait, wait1, examine OBJ, task, inventory.\nYour response should use the "
    "following format:\nThought:\nyour thoughts.\n\nAction:\nyour next action"
)
SEARCHQA = (
    "You must always reason inside <think>...</think> first; if you lack knowledge, issue a <search>...</search> and "
    "then stop; do not generate <information> or <answer> yet; wait for external input between "
    "<information>...</information> before continuing; resume only when new <information> is given; do not skip steps "
    "or anticipate answers early."
)

SPECS: dict[str, AgentSpec] = {
    "babyai": AgentSpec(BABYAI, action_line),
    "textcraft": AgentSpec(TEXTCRAFT, action_line),
    "sciworld": AgentSpec(SCIWORLD, react_action, score_scale=100.0, prompt_with_task=True),
    "searchqa": AgentSpec(SEARCHQA, whole_reply, ack="Ok."),
}
PLAIN = AgentSpec(None, whole_reply)  # rldock's own envs: the observation is the prompt, the reply the action


def spec_of(env_name: str) -> AgentSpec:
    return SPECS.get(env_name, PLAIN)


def first_prompt(spec: AgentSpec, observation: str, fields: Mapping[str, Any]) -> str:
    """The first observation a model reads: the reset's observation, after its task description where the env's
    client shows one (`fields`: the reset answer's other fields)."""
    task = fields.get("task_description")
    return f"{task}\n{observation}" if spec.prompt_with_task and isinstance(task, str) and task else observation
