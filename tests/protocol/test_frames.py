"""Wire types and codecs, without sockets."""

from __future__ import annotations

import uuid

import pytest

from protocol import frames as f


def test_client_frames_decode_to_their_types() -> None:
    conv = uuid.uuid4()
    frame = f.decode_client(f'{{"type":"join","conversation":"{conv}","after":3,"ref":"a"}}')
    assert frame == f.Join(conversation=conv, after=3, ref="a")


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("{", "bad_frame"),
        ("[]", "bad_frame"),
        ('{"type":"nope"}', "bad_frame"),
        ('{"type":"say"}', "invalid"),
        ('{"type":"ping","extra":1}', "invalid"),
    ],
)
def test_bad_frames_explain_themselves(raw: str, code: str) -> None:
    with pytest.raises(f.FrameError) as error:
        f.decode_client(raw)
    assert error.value.code == code


def test_the_ref_of_a_bad_frame_is_kept() -> None:
    with pytest.raises(f.FrameError) as error:
        f.decode_client('{"type":"join","conversation":"x","ref":"r1"}')
    assert error.value.ref == "r1"


def test_events_are_encoded_without_seq_and_spliced() -> None:
    event = f.Token(conversation=uuid.uuid4(), message_id=uuid.uuid4(), text="hi")
    encoded = f.encode(event)
    assert b'"seq"' not in encoded and encoded.startswith(b'{"type":"token"')
    framed = f.splice_seq(encoded, 42)
    assert f.seq_of(framed) == 42
    decoded = f.decode_server(framed)
    assert isinstance(decoded, f.Token) and decoded.seq == 42 and decoded.text == "hi"


def test_optional_fields_are_absent_not_null() -> None:
    assert f.encode(f.Pong()) == b'{"type":"pong"}'
    assert b"null" not in f.encode(f.Ack(message_id=uuid.uuid4()))


def test_a_frame_that_is_not_utf8_is_a_bad_frame() -> None:
    with pytest.raises(f.FrameError) as bad:
        f.decode_client(b'{"type":"ping","ref":"\xff"}')
    assert bad.value.code == "bad_frame"


def test_approve_and_deny_name_a_call_and_bound_the_reason() -> None:
    conv = uuid.uuid4()
    frame = f.decode_client(
        f'{{"type":"deny","conversation":"{conv}","call_id":"call_1","reason":"no","ref":"r"}}'
    )
    assert frame == f.Deny(conversation=conv, call_id="call_1", reason="no", ref="r")
    approve = f.decode_client(f'{{"type":"approve","conversation":"{conv}","call_id":"c"}}')
    assert approve == f.Approve(conversation=conv, call_id="c")
    for bad in ('"call_id":""', '"call_id":"c","reason":"' + "x" * 501 + '"', '"reason":"x"'):
        with pytest.raises(f.FrameError) as error:
            f.decode_client(f'{{"type":"approve","conversation":"{conv}",{bad}}}')
        assert error.value.code == "invalid"


def test_an_approval_request_takes_its_expiry_spliced_in_front_like_its_seq() -> None:
    """The open script splices `expires_at` (Redis's clock) in front of the encoded request,
    then `seq`: the frame decodes with both."""
    conv, message = uuid.uuid4(), uuid.uuid4()
    request = f.ApprovalRequest(
        conversation=conv, message_id=message, call_id="c", tool="rm", arguments="{}"
    )
    encoded = f.encode(request)
    assert b"expires_at" not in encoded and b"seq" not in encoded
    framed = f.splice_seq(b'{"expires_at":1764470000.125,' + encoded[1:], 12)
    decoded = f.decode_server(framed)
    assert isinstance(decoded, f.ApprovalRequest) and f.seq_of(framed) == 12
    assert (decoded.expires_at, decoded.seq, decoded.tool) == (1764470000.125, 12, "rm")
