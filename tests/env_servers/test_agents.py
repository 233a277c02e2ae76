"""The client side of AgentGym's envs (env_servers.agents): action extraction as AgentGym's clients do it, the
opening turns, and the first prompt."""

from __future__ import annotations

import pytest

from env_servers.agents import (
    BABYAI,
    ONE_ACTION,
    PLAIN,
    NoAction,
    action_line,
    first_prompt,
    react_action,
    spec_of,
)


def test_action_line_is_agentgyms_babyai_and_textcraft_parser():
    reply = "Thought:\nThe ball is ahead.\n\nAction:\ngo to red ball 1."
    assert action_line(reply) == "go to red ball 1"  # punctuation other than commas dropped
    assert (
        action_line("Action: craft 1 blue dye using 1 lapis lazuli, 2 x!")
        == "craft 1 blue dye using 1 lapis lazuli, 2 x"
    )
    assert action_line("Action:   turn  left  ") == "turn left"
    assert action_line("Action: turn\tleft") == "turnleft"  # a tab is not a space to AgentGym's cleaning
    assert action_line("no action at all") == ""  # sent as "" (babyai: "No change in state.")
    with pytest.raises(NoAction, match="Only one 'Action'"):
        action_line("Action: turn left\nAction: turn right")
    assert str(NoAction(ONE_ACTION)).startswith("Error:")


def test_react_action_is_sciworlds():
    assert react_action("Thought:\nhm\n\nAction:\nopen door to kitchen\n") == "open door to kitchen"
    assert react_action("Action: a\nAction: look around") == "look around"  # the last one
    assert react_action("just words") == ""


def test_specs_and_first_prompt():
    assert spec_of("babyai").instructions == BABYAI and "pick up <obj> <id>" in BABYAI
    assert spec_of("sciworld").score_scale == 100.0 and spec_of("searchqa").ack == "Ok."
    assert spec_of("gsm8k") is PLAIN and PLAIN.to_action("x y") == "x y"
    fields = {"task_description": "Your task is to boil water."}
    assert first_prompt(spec_of("sciworld"), "This room is called the kitchen.", fields) == (
        "Your task is to boil water.\nThis room is called the kitchen."
    )
    assert first_prompt(spec_of("babyai"), "Your goal: x", fields) == "Your goal: x"
