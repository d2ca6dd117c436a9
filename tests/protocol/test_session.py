"""The connection state machine, driven by hand: no sockets, no event loop."""

from __future__ import annotations

import uuid

from protocol import frames as f
from protocol.session import (
    FIRST_FRAME_AUTH,
    Close,
    CloseCode,
    Command,
    Reply,
    Session,
    SessionLimits,
    State,
    Verify,
)

LIMITS = SessionLimits(
    max_text_chars=10,
    frames_per_second=2.0,
    frame_burst=3,
    bad_frames_before_close=3,
    auth_timeout=5.0,
)


def ready_session(now: float = 0.0) -> Session:
    session = Session(LIMITS, now)
    session.receive_text('{"type":"auth","token":"t"}', now)
    assert session.actions() == [Verify("t", None)]
    assert session.authenticated("alice", None, None)
    return session


def test_auth_frame_asks_for_verification_then_ready() -> None:
    session = ready_session()
    assert session.state is State.READY and session.user == "alice"


def test_frames_before_auth_close_4401() -> None:
    session = Session(LIMITS, 0.0)
    session.receive_text('{"type":"ping"}', 0.0)
    assert session.actions() == [Close(CloseCode.UNAUTHORIZED, FIRST_FRAME_AUTH)]


def test_garbage_or_binary_before_auth_closes_4401_at_once() -> None:
    for garbage in ("not json", '{"type":"nope"}', '{"type":"auth"}', "[1]"):
        session = Session(LIMITS, 0.0)
        session.receive_text(garbage, 0.0)
        assert session.actions() == [Close(CloseCode.UNAUTHORIZED, FIRST_FRAME_AUTH)], garbage
        assert session.state is State.CLOSED
    session = Session(LIMITS, 0.0)
    session.receive_binary(0.0)
    assert session.actions() == [Close(CloseCode.UNAUTHORIZED, FIRST_FRAME_AUTH)]


def test_garbage_while_the_token_is_checked_closes_4401() -> None:
    session = Session(LIMITS, 0.0)
    session.receive_text('{"type":"auth","token":"t"}', 0.0)
    session.receive_text("not json", 0.1)
    assert session.actions() == [Verify("t", None), Close(CloseCode.UNAUTHORIZED, FIRST_FRAME_AUTH)]


def test_silence_closes_4408_at_the_deadline() -> None:
    session = Session(LIMITS, 0.0)
    session.tick(4.9, 0.0)
    assert session.actions() == []
    session.tick(5.0, 0.0)
    assert session.actions()[0] == Close(CloseCode.AUTH_TIMEOUT, "no auth frame in time")


def test_token_expiry_closes_4401_and_reauth_extends() -> None:
    session = Session(LIMITS, 0.0)
    session.receive_text('{"type":"auth","token":"t"}', 0.0)
    session.actions()
    session.authenticated("alice", 100.0, None)
    session.tick(1.0, 99.0)
    assert session.actions() == []
    session.receive_text('{"type":"auth","token":"u","ref":"x"}', 1.0)
    session.actions()
    assert not session.authenticated("alice", 200.0, "x")
    assert isinstance(session.actions()[0], Reply)
    session.tick(2.0, 150.0)
    assert session.actions() == []
    session.tick(3.0, 200.0)
    assert session.actions() == [Close(CloseCode.UNAUTHORIZED, "token expired")]


def test_reauth_for_another_user_closes() -> None:
    session = ready_session()
    session.authenticated("mallory", None, None)
    assert session.actions() == [Close(CloseCode.UNAUTHORIZED, "token is for another user")]


def test_valid_requests_become_commands_and_ping_is_answered_here() -> None:
    session = ready_session()
    conv = uuid.uuid4()
    session.receive_text(f'{{"type":"say","conversation":"{conv}","text":"hi"}}', 0.1)
    session.receive_text('{"type":"ping","ref":"p"}', 0.2)
    actions = session.actions()
    assert actions[0] == Command(f.Say(conversation=conv, text="hi"))
    assert actions[1] == Reply(f.Pong(ref="p"))


def test_text_over_the_limit_is_too_large() -> None:
    session = ready_session()
    session.receive_text(
        f'{{"type":"say","conversation":"{uuid.uuid4()}","text":"{"x" * 11}","ref":"r"}}', 0.1
    )
    (reply,) = session.actions()
    assert isinstance(reply, Reply) and isinstance(reply.frame, f.Error)
    assert reply.frame.code == "too_large" and reply.frame.ref == "r"


def test_repeated_garbage_closes_4400_but_a_good_frame_resets_the_count() -> None:
    session = ready_session()
    for now in (0.1, 0.2):
        session.receive_text("junk", now)
    session.receive_text('{"type":"ping"}', 1.5)
    session.receive_text("junk", 1.6)
    assert session.state is State.READY
    session.receive_binary(2.5)
    session.receive_text("junk", 3.0)
    assert session.actions()[-1] == Close(CloseCode.PROTOCOL, "too many bad frames")


def test_flood_is_rate_limited_then_closed_4429() -> None:
    session = ready_session()
    for _ in range(3):
        session.receive_text('{"type":"ping"}', 0.0)
    session.actions()
    session.receive_text('{"type":"ping"}', 0.0)
    (limited,) = session.actions()
    assert isinstance(limited, Reply) and limited.frame.code == "rate_limited"  # type: ignore[union-attr]
    session.receive_text('{"type":"ping"}', 0.0)
    session.receive_text('{"type":"ping"}', 0.0)
    assert session.actions()[-1] == Close(CloseCode.TOO_MANY, "too many frames")


def test_nothing_happens_after_close() -> None:
    session = ready_session()
    session.close(CloseCode.GOING_AWAY, "bye")
    session.actions()
    session.receive_text('{"type":"ping"}', 0.0)
    assert session.actions() == []


def test_refresh_hint_before_expiry_then_close_after_the_grace() -> None:
    limits = SessionLimits(
        max_text_chars=10,
        frames_per_second=2.0,
        frame_burst=3,
        bad_frames_before_close=3,
        auth_timeout=5.0,
        refresh_hint=30.0,
        refresh_grace=25.0,
    )
    session = Session(limits, 0.0)
    session.receive_text('{"type":"auth","token":"t"}', 0.0)
    session.actions()
    session.authenticated("alice", 100.0, None)
    assert session.token_deadline() == 70.0
    session.tick(1.0, 69.0)
    assert session.actions() == []
    session.tick(1.0, 70.0)
    assert session.actions() == [Reply(f.Refresh(expires_at=100))]
    assert session.token_deadline() == 125.0
    session.tick(1.0, 124.0)  # expired, within the grace: still open, no second hint
    assert session.actions() == [] and session.state is State.READY
    session.authenticated("alice", 160.0, "r")  # a fresh token came
    assert session.actions() == [Reply(f.Ack(ref="r", expires_at=160))]
    assert session.token_deadline() == 130.0
    session.tick(1.0, 130.0)
    assert session.actions() == [Reply(f.Refresh(expires_at=160))]
    session.tick(1.0, 185.0)
    assert session.actions() == [Close(CloseCode.UNAUTHORIZED, "token expired")]
    assert session.token_deadline() is None
