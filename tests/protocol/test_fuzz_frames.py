"""Fuzz the client frame decoder and the session that wraps it: whatever arrives, the answer
is a frame or a clear `FrameError`, and the session answers with an action, never raises."""

from __future__ import annotations

import contextlib

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import frames as f
from protocol.session import Close, Reply, Session, SessionLimits
from tests.protocol.fuzzing import HOSTILE_BYTES, HOSTILE_TEXT, deep_nesting

LIMITS = SessionLimits(
    max_text_chars=32_000,
    frames_per_second=1e9,
    frame_burst=1_000_000,
    bad_frames_before_close=1_000_000,
    auth_timeout=5.0,
)


def decodes_or_explains(data: str | bytes) -> None:
    try:
        frame = f.decode_client(data)
    except f.FrameError as exc:
        assert exc.code in ("bad_frame", "invalid")
        assert exc.message and len(exc.message) < 1000
        assert exc.ref is None or len(exc.ref) <= 64
    else:
        assert isinstance(frame, f.ClientFrame)
        assert f.decode_client(f.encode(frame)) == frame


@settings(max_examples=150, deadline=None)
@given(HOSTILE_TEXT)
def test_client_decoder_on_text(data: str) -> None:
    decodes_or_explains(data)


@settings(max_examples=100, deadline=None)
@given(HOSTILE_BYTES)
def test_client_decoder_on_bytes(data: bytes) -> None:
    decodes_or_explains(data)


@settings(max_examples=60, deadline=None)
@given(deep_nesting())
def test_deep_nesting_is_a_bad_frame_or_invalid(data: str) -> None:
    try:
        f.decode_client(data)
    except f.FrameError as exc:
        assert exc.code in ("bad_frame", "invalid")


@settings(max_examples=200, deadline=None)
@given(st.integers() | st.sampled_from([2**53 + 1, 2**64, 10**30, -1]))
def test_after_is_bounded_by_the_type(after: int) -> None:
    data = f'{{"type":"join","conversation":"{f.new_id()}","after":{after}}}'
    if 0 <= after <= f.MAX_SEQ:
        frame = f.decode_client(data)
        assert isinstance(frame, f.Join) and frame.after == after
    else:
        try:
            f.decode_client(data)
        except f.FrameError as exc:
            assert exc.code == "invalid" and "after" in exc.message
        else:
            raise AssertionError(f"after={after} was accepted")


@settings(max_examples=100, deadline=None)
@given(HOSTILE_BYTES)
def test_server_decoder_raises_only_decode_errors(data: bytes) -> None:
    with contextlib.suppress(msgspec.DecodeError):
        f.decode_server(data)


@settings(max_examples=60, deadline=None)
@given(st.lists(HOSTILE_TEXT | HOSTILE_BYTES, min_size=1, max_size=6))
def test_session_answers_every_frame(frames: list[str | bytes]) -> None:
    session = Session(LIMITS, now=0.0)
    assert session.authenticated("alice", None, None)
    for i, data in enumerate(frames):
        session.receive_text(data, now=float(i))
        for action in session.actions():
            assert not isinstance(action, Close) or action.code != 1011
            if isinstance(action, Reply) and isinstance(action.frame, f.Error):
                assert action.frame.code in ("bad_frame", "invalid", "too_large")
