"""The storable-text rule: refused at the edge, replaced where Parley must keep the text."""

from __future__ import annotations

import uuid

import pytest

from protocol import frames as f
from protocol import text
from protocol.session import Reply, Session
from tests.protocol.test_session import ready_session


@pytest.mark.parametrize("clean", ["", "hello", "héllo wörld", "emoji 😀", "tab\tand\nnewline"])
def test_clean_text_passes_untouched(clean: str) -> None:
    assert text.problem(clean) is None
    assert text.scrub(clean) is clean


@pytest.mark.parametrize(
    ("bad", "words", "scrubbed"),
    [
        ("a\x00b", "NUL", "a\ufffdb"),
        ("\x00", "NUL", "\ufffd"),
        ("a\ud800b", "surrogate (\\ud800)", "a\ufffdb"),
        ("é\udfff", "surrogate (\\udfff)", "é\ufffd"),
        ("\x00é\ud83d", "NUL", "\ufffdé\ufffd"),
    ],
)
def test_unstorable_text_is_named_and_scrubbed(bad: str, words: str, scrubbed: str) -> None:
    why = text.problem(bad)
    assert why is not None and words in why
    assert text.scrub(bad) == scrubbed
    assert text.problem(text.scrub(bad)) is None
    assert why.isascii()  # safe to put in any error frame or log line


def test_unstorable_field_names_the_first_bad_string_field() -> None:
    create = f.Create(title="fine", system="has \x00 in it", model="m")
    assert text.unstorable_field(create) == ("system", text.problem("\x00"))
    assert text.unstorable_field(f.Create(title="fine")) is None


def test_surrogate_field_finds_the_field_msgspec_refused() -> None:
    raw = '{"type": "say", "conversation": "x", "text": "a\\ud800"}'
    assert text.surrogate_field(raw) == ("text", text.problem("\ud800"))
    assert text.surrogate_field("[1, 2]") is None
    assert text.surrogate_field("{nope") is None


def say(session: Session, body: str) -> list[object]:
    session.receive_text(
        f'{{"type": "say", "ref": "r", "conversation": "{uuid.uuid4()}", "text": {body}}}', 0
    )
    return session.actions()


def test_session_refuses_a_nul_in_say_text_as_invalid_naming_the_field() -> None:
    actions = say(ready_session(), '"hi\\u0000"')
    assert len(actions) == 1 and isinstance(actions[0], Reply)
    error = actions[0].frame
    assert isinstance(error, f.Error) and error.code == "invalid" and error.ref == "r"
    assert "`text`" in error.message and "NUL" in error.message


def test_session_refuses_a_lone_surrogate_as_invalid_naming_the_field() -> None:
    actions = say(ready_session(), '"hi\\ud800"')
    assert len(actions) == 1 and isinstance(actions[0], Reply)
    error = actions[0].frame
    assert isinstance(error, f.Error) and error.code == "invalid"
    assert "`text`" in error.message and "surrogate" in error.message


@pytest.mark.parametrize("field", ["title", "system", "model"])
def test_session_refuses_a_nul_in_create_fields(field: str) -> None:
    session = ready_session()
    session.receive_text(f'{{"type": "create", "{field}": "x\\u0000"}}', 0)
    (reply,) = session.actions()
    assert isinstance(reply, Reply) and isinstance(reply.frame, f.Error)
    assert reply.frame.code == "invalid" and f"`{field}`" in reply.frame.message
    session.receive_text('{"type": "create", "title": "ok"}', 0)
    assert [type(a).__name__ for a in session.actions()] == ["Command"]
