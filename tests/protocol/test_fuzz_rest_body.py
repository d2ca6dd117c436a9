"""Fuzz the REST API's body decoding as the server runs it: the depth guard, then litestar's
msgspec decode into the bounded body types. Any body ends as the Struct, a 400 from the guard
or litestar's SerializationException (400) — never another exception (a 500)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from litestar.exceptions import SerializationException
from litestar.serialization import decode_json

from protocol.jsondepth import too_deep
from server.edge.rest import ConversationChange, DevLogin, NewConversation
from tests.protocol.fuzzing import HOSTILE_BYTES, JSON_VALUES, frame_like, to_json

BODIES = (
    HOSTILE_BYTES
    | st.dictionaries(
        st.sampled_from(["title", "system", "model", "user", "ttl"]), JSON_VALUES, max_size=4
    ).map(lambda d: to_json(d).encode("utf-8", "surrogatepass"))
    | frame_like(st.just("x")).map(lambda t: t.encode("utf-8", "surrogatepass"))
)


@pytest.mark.parametrize("body_type", [NewConversation, ConversationChange, DevLogin])
@settings(max_examples=120, deadline=None)
@given(body=BODIES)
def test_any_body_decodes_or_is_refused(body_type: type, body: bytes) -> None:
    if too_deep(body):
        return  # the guard answers 400 before litestar decodes
    try:
        decoded = decode_json(body, body_type)
    except SerializationException:
        return
    assert isinstance(decoded, body_type)
