"""Multi-turn agent workflow: rounds schedule, chat-template token pieces, and real episodes of the gsm8k_tools env
(in-process and over a real env server) driven by the real SmolLM2 engine, checked against an independent replay."""

from __future__ import annotations

import pytest

from trainer.agent_workflow import ChatTokens
from trainer.rounds import RoundsSchedule


def test_rounds_schedule_fixed_and_growing():
    assert [RoundsSchedule(3).at(s) for s in (0, 10, 1000)] == [3, 3, 3]
    growing = RoundsSchedule(2, [[5, 4], [10, 6]])  # ScalingInter-RL: 2 turns, 4 from step 5, 6 from step 10
    assert [growing.at(s) for s in (0, 4, 5, 9, 10, 99)] == [2, 2, 4, 4, 6, 6]


@pytest.mark.parametrize(
    "max_rounds, schedule",
    [(0, []), (2, [[5, 4], [5, 6]]), (2, [[10, 4], [5, 6]]), (2, [[5, 0]]), (2, [[5]]), (2, [[-1, 3]])],
)
def test_rounds_schedule_rejects_bad_entries(max_rounds, schedule):
    with pytest.raises(ValueError):
        RoundsSchedule(max_rounds, schedule)


@pytest.mark.parametrize("system", [None, "Use the calculator."])
def test_chat_pieces_concatenate_to_the_template(tokenizer, system):
    chat = ChatTokens(tokenizer, system)
    head = [{"role": "system", "content": system}] if system else []
    action = chat.encode("Let me compute 3*4.")
    conversation = [
        *head,
        {"role": "user", "content": "What is 3*4?"},
        {"role": "assistant", "content": "Let me compute 3*4."},
        {"role": "user", "content": "calculator: 12"},
    ]
    want = chat.encode(tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True))
    eos = tokenizer.eos_token_id
    # the model sampled its end-of-turn token: it is not repeated
    got = chat.prompt("What is 3*4?") + action + [eos] + chat.next_turn("calculator: 12", eos)
    assert got == want
    # cut off by max_new_tokens: the turn is closed for the model, so it sees the same conversation
    got = chat.prompt("What is 3*4?") + action + chat.next_turn("calculator: 12", action[-1])
    assert got == want
