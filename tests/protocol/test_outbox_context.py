from __future__ import annotations

import uuid

from protocol import frames as f
from protocol import wsframe
from protocol.context import build_prompt, reply_messages
from protocol.frames import Message, utcnow
from protocol.outbox import Outbox


def test_outbox_is_bounded_in_bytes() -> None:
    box = Outbox(limit=10, merge_after=1000)
    assert box.push(b"12345") and box.push(b"12345")
    assert not box.push(b"1")
    assert box.drain() == [b"12345", b"12345", b"1"] and box.size == 0 and not box


def token(conv: uuid.UUID, message: uuid.UUID, seq: int, text: str) -> bytes:
    event = f.Token(conversation=conv, message_id=message, text=text)
    return wsframe.text(f.splice_seq(f.encode(event), seq))


def test_a_lagging_socket_gets_consecutive_pieces_merged_nothing_dropped() -> None:
    conv, message = uuid.uuid4(), uuid.uuid4()
    box = Outbox(limit=100_000, merge_after=0)
    box.push(wsframe.text(b'{"seq":4,"type":"start"}'))
    for seq, text in enumerate(["He", "llo", ",", " world"], start=5):
        assert box.push(token(conv, message, seq, text))
    frames = box.drain()
    assert len(frames) == 2 and box.merged == 3
    payload = wsframe.payload_of(frames[1])
    merged = f.decode_server(payload)
    assert isinstance(merged, f.Token)
    assert (merged.first_seq, merged.seq, merged.text) == (5, 8, "Hello, world")
    assert f.seq_of(payload) == 8


def test_no_merge_across_messages_or_gaps_or_before_the_threshold() -> None:
    conv, one, two = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    box = Outbox(limit=100_000, merge_after=0)
    for frame in (token(conv, one, 1, "a"), token(conv, two, 2, "b"), token(conv, two, 4, "c")):
        box.push(frame)
    assert len(box.drain()) == 3
    calm = Outbox(limit=100_000, merge_after=10_000)
    calm.push(token(conv, one, 1, "a"))
    calm.push(token(conv, one, 2, "b"))
    assert len(calm.drain()) == 2 and calm.merged == 0


def message(role: str, text: str) -> Message:
    return Message(id=uuid.uuid4(), role=role, content=text, status="complete", created_at=utcnow())  # type: ignore[arg-type]


def test_prompt_keeps_the_newest_turns_within_budget() -> None:
    history = [
        message("user", "a" * 400),
        message("assistant", "b" * 400),
        message("user", "c" * 40),
    ]
    prompt = build_prompt("be brief", history, budget=130)
    assert prompt[0] == {"role": "system", "content": "be brief"}
    assert [m["content"][0] for m in prompt[1:]] == ["b", "c"]


def test_the_last_message_is_always_sent_cut_to_fit() -> None:
    prompt = build_prompt("", [message("user", "z" * 10_000)], budget=100)
    assert len(prompt) == 1 and 0 < len(prompt[0]["content"]) <= 400


def _reply_with_tools() -> f.Message:
    parts = [
        f.Part(kind="reasoning", text="hmm"),
        f.Part(kind="text", text="Looking."),
        f.Part(kind="tool_call", call_id="c1", name="weather", text='{"city":"Oslo"}'),
        f.Part(kind="tool_call", call_id="c2", name="time", text="{}"),
        f.Part(kind="tool_result", call_id="c1", name="weather", text='{"t":3}', status="ok"),
        f.Part(kind="tool_result", call_id="c2", name="time", text="late", status="error"),
        f.Part(kind="tool_call", call_id="c3", name="weather", text='{"city":"Rome"}'),
        f.Part(kind="tool_result", call_id="c3", name="weather", text='{"t":20}', status="ok"),
        f.Part(kind="text", text="Oslo 3, Rome 20."),
    ]
    return f.Message(
        id=uuid.uuid4(), role="assistant", content="Looking.Oslo 3, Rome 20.",
        status="complete", created_at=f.utcnow(), parts=parts,
    )  # fmt: skip


def test_a_reply_that_called_tools_goes_back_to_the_model_step_by_step() -> None:
    messages = reply_messages(_reply_with_tools().parts or [])
    assert messages == [
        {
            "role": "assistant",
            "content": "Looking.",
            "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}},
                {"id": "c2", "type": "function", "function": {"name": "time", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"t":3}'},
        {"role": "tool", "tool_call_id": "c2", "content": "late"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c3", "type": "function",
                 "function": {"name": "weather", "arguments": '{"city":"Rome"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "c3", "content": '{"t":20}'},
        {"role": "assistant", "content": "Oslo 3, Rome 20."},
    ]  # fmt: skip


def test_later_prompts_hold_the_tool_results_of_earlier_turns_or_none_of_that_turn() -> None:
    question = f.Message(
        id=uuid.uuid4(), role="user", content="Weather?", status="complete",
        created_at=f.utcnow(),
    )  # fmt: skip
    reply = _reply_with_tools()
    prompt = build_prompt("", [question, reply], 10_000)
    assert [m["role"] for m in prompt] == ["user", "assistant", "tool", "tool", "assistant",
                                           "tool", "assistant"]  # fmt: skip
    assert not any("hmm" in str(m) for m in prompt)  # reasoning stays out
    tight = build_prompt("", [question, reply], 20)
    assert [m["role"] for m in tight] == ["assistant", "tool", "tool", "assistant", "tool",
                                          "assistant"]  # fmt: skip


def test_a_call_without_a_recorded_result_is_answered_for_the_model() -> None:
    parts = [f.Part(kind="tool_call", call_id="c1", name="slow", text="{}")]
    assert reply_messages(parts)[1] == {
        "role": "tool",
        "tool_call_id": "c1",
        "content": "the call has no result",
    }
