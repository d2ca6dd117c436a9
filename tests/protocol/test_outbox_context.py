from __future__ import annotations

import uuid

from protocol.context import build_prompt
from protocol.frames import Message, utcnow
from protocol.outbox import Outbox


def test_outbox_is_bounded_in_bytes() -> None:
    box = Outbox(limit=10)
    assert box.push("12345") and box.push("12345")
    assert not box.push("1")
    assert box.drain() == ["12345", "12345", "1"] and box.size == 0 and not box


def message(role: str, text: str) -> Message:
    return Message(id=uuid.uuid4(), role=role, content=text, status="complete", created_at=utcnow())  # type: ignore[arg-type]


def test_prompt_keeps_the_newest_turns_within_budget() -> None:
    history = [message("user", "a" * 400), message("assistant", "b" * 400), message("user", "c" * 40)]
    prompt = build_prompt("be brief", history, budget=130)
    assert prompt[0] == {"role": "system", "content": "be brief"}
    assert [m["content"][0] for m in prompt[1:]] == ["b", "c"]


def test_the_last_message_is_always_sent_cut_to_fit() -> None:
    prompt = build_prompt("", [message("user", "z" * 10_000)], budget=100)
    assert len(prompt) == 1 and 0 < len(prompt[0]["content"]) <= 400
