"""SSE framing and the AI SDK's UI message chunks made from conversation events (pure)."""

from __future__ import annotations

import json
import uuid

from protocol import frames as f
from protocol import sse

CONV = uuid.uuid4()
MSG = uuid.uuid4()


def test_an_event_carries_its_seq_type_and_the_websockets_json() -> None:
    payload = f.encode(f.Token(conversation=CONV, message_id=MSG, text="hi", seq=7))
    assert sse.event(payload) == b"id: 7\nevent: token\ndata: " + payload + b"\n\n"


def test_joined_carries_its_last_seq_and_a_user_event_no_id() -> None:
    changed = f.encode(f.ConversationChanged(conversation=CONV, deleted=True))
    assert sse.event(changed).startswith(b"event: conversation_changed\n")
    meta = f.Conversation(
        id=CONV, title="t", system="", model="m", created_at=f.utcnow(), updated_at=f.utcnow()
    )
    joined = f.encode(f.Joined(conversation=CONV, meta=meta, last_seq=0))
    assert sse.event(joined).startswith(b"id: 0\nevent: joined\n")


def test_a_payload_with_newlines_becomes_several_data_lines() -> None:
    assert (
        sse.event(b'{"type":"x",\n"seq":3}')
        == b'id: 3\nevent: x\ndata: {"type":"x",\ndata: "seq":3}\n\n'
    )


def test_last_event_id_wins_over_after_and_garbage_counts_as_absent() -> None:
    assert sse.last_event_id("12", 3) == 12
    assert sse.last_event_id(None, 3) == 3
    assert sse.last_event_id("abc", None) is None
    assert sse.last_event_id("-1", 5) == 5


def _chunks(out: list[bytes]) -> list[object]:
    return ["[DONE]" if c == sse.DONE else json.loads(c.removeprefix(b"data: ")) for c in out]


def test_a_reply_becomes_start_text_and_finish_then_done() -> None:
    reply = sse.UiReply()
    other = uuid.uuid4()
    out: list[bytes] = []
    for frame in (
        f.Token(conversation=CONV, message_id=other, text="stale", seq=1),
        f.Start(conversation=CONV, message_id=MSG, model="m", seq=2),
        f.Token(conversation=CONV, message_id=MSG, text="Hel", seq=3),
        f.Token(conversation=CONV, message_id=MSG, text="lo", seq=4),
        f.Done(conversation=CONV, message_id=MSG, reason="stop", seq=5),
        f.Token(conversation=CONV, message_id=MSG, text="after", seq=6),
    ):
        out += reply.feed(f.encode(frame))
    text_id = str(MSG)
    assert _chunks(out) == [
        {"type": "start", "messageId": text_id},
        {"type": "text-start", "id": text_id},
        {"type": "text-delta", "id": text_id, "delta": "Hel"},
        {"type": "text-delta", "id": text_id, "delta": "lo"},
        {"type": "text-end", "id": text_id},
        {"type": "finish", "finishReason": "stop"},
        "[DONE]",
    ]
    assert reply.ended


def test_a_failed_reply_sends_an_error_before_finish() -> None:
    reply = sse.UiReply()
    reply.feed(f.encode(f.Start(conversation=CONV, message_id=MSG, model="m", seq=1)))
    done = f.Done(conversation=CONV, message_id=MSG, reason="error", error="boom", seq=2)
    kinds = [c if c == "[DONE]" else c["type"] for c in _chunks(reply.feed(f.encode(done)))]  # type: ignore[index]
    assert kinds == ["text-end", "error", "finish", "[DONE]"]


def test_a_refused_turn_is_one_error_then_done() -> None:
    reply = sse.UiReply(MSG)
    user = f.Message(
        id=uuid.uuid4(), role="user", content="hi", status="complete", created_at=f.utcnow()
    )
    assert reply.feed(f.encode(f.MessageEvent(conversation=CONV, message=user, seq=1))) == []
    refusal = f.Error(
        code="refused", message="not on your plan", conversation=CONV, message_id=MSG, seq=2
    )
    chunks = _chunks(reply.feed(f.encode(refusal)))
    assert chunks == [{"type": "error", "errorText": "not on your plan"}, "[DONE]"]
    assert reply.ended


def test_a_reasoning_part_streams_as_reasoning_chunks_before_the_text() -> None:
    reply = sse.UiReply()
    out: list[bytes] = []
    for frame in (
        f.Start(conversation=CONV, message_id=MSG, model="m", seq=1),
        f.PartStart(conversation=CONV, message_id=MSG, index=0, kind="reasoning", seq=2),
        f.PartDelta(conversation=CONV, message_id=MSG, index=0, text="hmm", seq=3),
        f.PartEnd(conversation=CONV, message_id=MSG, index=0, duration_ms=5.0, seq=4),
        f.Token(conversation=CONV, message_id=MSG, text="yes", seq=5),
        f.PartStart(conversation=CONV, message_id=MSG, index=2, kind="reasoning", seq=6),
        f.PartDelta(conversation=CONV, message_id=MSG, index=2, text="again", seq=7),
        f.Done(conversation=CONV, message_id=MSG, reason="content_filter", seq=8),
    ):
        out += reply.feed(f.encode(frame))
    text_id = str(MSG)
    assert _chunks(out) == [
        {"type": "start", "messageId": text_id},
        {"type": "text-start", "id": text_id},
        {"type": "reasoning-start", "id": f"{text_id}:0"},
        {"type": "reasoning-delta", "id": f"{text_id}:0", "delta": "hmm"},
        {"type": "reasoning-end", "id": f"{text_id}:0"},
        {"type": "text-delta", "id": text_id, "delta": "yes"},
        {"type": "reasoning-start", "id": f"{text_id}:2"},
        {"type": "reasoning-delta", "id": f"{text_id}:2", "delta": "again"},
        {"type": "reasoning-end", "id": f"{text_id}:2"},  # left open: `done` ends it
        {"type": "text-end", "id": text_id},
        {"type": "finish", "finishReason": "content-filter"},
        "[DONE]",
    ]
