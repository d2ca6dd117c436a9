"""The worker's queued text event (`OpenText`): the frame it gives is the one the part's event
encodes to, whatever the text, however many pieces joined it."""

from __future__ import annotations

import uuid

from hypothesis import example, given
from hypothesis import strategies as st

from protocol import frames as f
from protocol.parts import PartsBuilder
from protocol.text import scrub
from server.generation.worker import OpenText, token_head
from server.redis.eventlog import encode

# what a model's text can hold once scrubbed: any character but a lone surrogate
TEXTS = st.text(st.characters(codec="utf-8"), max_size=30)


@given(st.lists(TEXTS, min_size=1, max_size=4), st.uuids(), st.uuids())
@example(
    ['he said "hi"\\', "\x00\x1f\u2028</script>", "é😀\ufeff"], uuid.UUID(int=0), uuid.UUID(int=1)
)
def test_a_token_frame_made_from_its_head_is_the_frame_encoded_whole(
    pieces: list[str], conversation: uuid.UUID, message_id: uuid.UUID
) -> None:
    parts = PartsBuilder(conversation, message_id)
    parts.switch("text", 0.0)
    event = OpenText(0, pieces[0], parts, token_head(conversation, message_id))
    for piece in pieces[1:]:
        assert event.join(0, piece)
    whole = f.Token(conversation=conversation, message_id=message_id, text="".join(pieces))
    assert event() == encode(whole)
    assert not event.join(0, "late")  # sealed: a later piece starts a new event


def test_a_reasoning_events_frame_is_its_part_delta() -> None:
    conversation, message_id = uuid.uuid4(), uuid.uuid4()
    parts = PartsBuilder(conversation, message_id)
    parts.switch("reasoning", 0.0)
    event = OpenText(0, scrub("let me "), parts, None)
    assert event.join(0, "think")
    assert not event.join(1, "another part")
    assert event() == encode(parts.piece(0, "let me think"))
    assert b'"type":"part_delta"' in event()
