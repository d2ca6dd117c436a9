"""Fuzz the simulated model's request decoding and prompt controls: any body is a chat
request or a ValueError (HTTP 400); any user text gives bounded controls."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from server.dev.simulator import MAX_CONTROL_DELAY, MAX_CONTROL_TOKENS, _Controls, decode_request
from server.dev.simulator import _Message as Message
from tests.protocol.fuzzing import ANY_CHARACTER, HOSTILE_BYTES, JSON_VALUES, to_json

REQUESTS = st.fixed_dictionaries(
    {"model": JSON_VALUES, "messages": JSON_VALUES | st.lists(JSON_VALUES, max_size=3)},
    optional={"stream": JSON_VALUES, "max_tokens": JSON_VALUES},
).map(to_json)
NUMBER_TEXT = st.integers(0, 10**500).map(str) | st.sampled_from(["9" * 400, "1.5", "0"])
CONTROLS = st.builds(
    lambda name, value, noise: f"{noise}[sim:{name}={value}]{noise}",
    st.sampled_from(["tokens", "delay", "tps", "status"]),
    NUMBER_TEXT,
    st.text(ANY_CHARACTER, max_size=20),
)


@settings(max_examples=200, deadline=None)
@given(HOSTILE_BYTES | REQUESTS.map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_any_body_is_a_request_or_a_value_error(body: bytes) -> None:
    try:
        decode_request(body)
    except ValueError as exc:
        assert str(exc)


def test_deep_body_is_a_value_error() -> None:
    body = json.dumps({"model": "m", "messages": []}).encode()[:-1] + b', "x": ' + b"[" * 50_000
    try:
        decode_request(body)
    except ValueError as exc:
        assert "levels deep" in str(exc)
    else:
        raise AssertionError("accepted")


@settings(max_examples=200, deadline=None)
@given(st.lists(CONTROLS, min_size=1, max_size=4).map("".join))
def test_controls_are_bounded(text: str) -> None:
    controls = _Controls.parse([Message(role="user", content=text)])
    assert controls.tokens is None or 1 <= controls.tokens <= MAX_CONTROL_TOKENS
    assert controls.delay is None or 0 <= controls.delay <= MAX_CONTROL_DELAY
    assert controls.status is None or 400 <= controls.status <= 599
