"""The opening handshake without sockets: what is accepted, what is refused and with what."""

from __future__ import annotations

import base64
import hashlib

import pytest
from websockets.client import ClientProtocol
from websockets.http11 import Response
from websockets.uri import parse_uri

from protocol.handshake import MAX_REQUEST_BYTES, Refusal, RequestParser, accept, refuse

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def request(
    *extra: str, key: str = KEY, version: str = "13", first: str = "GET /ws HTTP/1.1"
) -> bytes:
    lines = [
        first,
        "Host: 127.0.0.1:8000",
        "Upgrade: websocket",
        "Connection: keep-alive, Upgrade",
        f"Sec-WebSocket-Key: {key}",
        f"Sec-WebSocket-Version: {version}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_the_rfc_example_key_gets_the_rfc_accept_value() -> None:
    parsed = RequestParser().feed(request("Sec-WebSocket-Protocol: parley.v1, bearer.abc"))
    assert parsed is not None
    assert parsed.target == "/ws" and parsed.subprotocols == ["parley.v1", "bearer.abc"]
    response = accept(parsed, "parley.v1")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in response  # RFC 6455 §1.3
    assert response.endswith(b"Sec-WebSocket-Protocol: parley.v1\r\n\r\n")


def test_a_websockets_client_accepts_the_response() -> None:
    client = ClientProtocol(parse_uri("ws://127.0.0.1:8000/ws"), subprotocols=["parley.v1"])  # type: ignore[list-item]
    sent = client.connect()
    client.send_request(sent)
    [raw] = client.data_to_send()
    parsed = RequestParser().feed(raw)
    assert parsed is not None
    client.receive_data(accept(parsed, "parley.v1"))
    [event] = client.events_received()
    assert isinstance(event, Response) and event.status_code == 101
    assert client.handshake_exc is None and client.subprotocol == "parley.v1"


def test_the_request_may_arrive_in_pieces_and_query_strings_are_kept() -> None:
    parser = RequestParser()
    data = request(first="GET /ws?token=abc HTTP/1.1")
    for i in range(len(data) - 1):
        assert parser.feed(data[i : i + 1]) is None
    parsed = parser.feed(data[-1:])
    assert parsed is not None and parsed.target == "/ws?token=abc"


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (request(version="8"), 426),
        (request(key="short"), 400),
        (request(key=base64.b64encode(b"x" * 15).decode()), 400),
        (request(first="POST /ws HTTP/1.1"), 400),
        (b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"\x00\x01garbage\r\n\r\n", 400),
        (request("X-Filler: " + "a" * MAX_REQUEST_BYTES), 431),
    ],
)
def test_bad_requests_get_a_status(data: bytes, status: int) -> None:
    with pytest.raises(Refusal) as refused:
        RequestParser().feed(data)
    assert refused.value.status == status


def test_a_refusal_is_a_complete_http_response() -> None:
    response = refuse(426, "WebSocket version 13 is required")
    head, body = response.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert b"Sec-WebSocket-Version: 13" in head
    assert f"Content-Length: {len(body)}".encode() in head


def test_repeated_headers_are_joined() -> None:
    parsed = RequestParser().feed(
        request("Sec-WebSocket-Protocol: parley.v1", "Sec-WebSocket-Protocol: bearer.t")
    )
    assert parsed is not None and parsed.subprotocols == ["parley.v1", "bearer.t"]
    digest = hashlib.sha1(KEY.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    assert base64.b64encode(digest) in accept(parsed, None)
