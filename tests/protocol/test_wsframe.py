"""Server frames built once per event parse as what they carry, at every length class."""

from __future__ import annotations

import random

import pytest
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from protocol import wsframe


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65_535, 65_536, 200_000])
def test_a_client_reads_the_frame_as_the_payload(size: int) -> None:
    payload = ("é" * size).encode()[:size]
    frame = wsframe.text(payload)
    assert wsframe.payload_of(frame) == payload
    client = ClientProtocol(parse_uri("ws://127.0.0.1/ws"), state=State.OPEN, max_size=None)
    client.receive_data(frame)
    [event] = client.events_received()
    assert isinstance(event, Frame)
    assert (event.opcode, event.fin, event.data) == (Opcode.TEXT, True, payload)


def _server_reads(data: bytes, max_size: int) -> list[Frame]:
    """What `websockets`' server parser makes of `data` (a closed stream ends it)."""
    server = ServerProtocol(state=State.OPEN, max_size=max_size)
    server.receive_data(data)
    return [e for e in server.events_received() if isinstance(e, Frame)]


def _client_frame(opcode: Opcode, payload: bytes, fin: bool = True) -> bytes:
    return Frame(opcode, payload, fin).serialize(mask=True, extensions=[])


@pytest.mark.parametrize("size", [0, 1, 125, 126, 1000, 65_535])
def test_a_whole_ascii_text_frame_is_read_alone_as_the_parser_reads_it(size: int) -> None:
    payload = (b'{"type":"join"}' * (size // 15 + 1))[:size]
    data = _client_frame(Opcode.TEXT, payload)
    assert wsframe.client_text(data, 262_144) == payload
    [frame] = _server_reads(data, 262_144)
    assert (frame.opcode, frame.fin, frame.data) == (Opcode.TEXT, True, payload)


def _unmasked(payload: bytes) -> bytes:
    return Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])


def _long_length(payload: bytes) -> bytes:
    """A 16-bit length for a payload that fits in 7 bits (legal bytes, not the shortest)."""
    return bytes((0x81, 0x80 | 126)) + len(payload).to_bytes(2, "big") + b"\0" * 4 + payload


@pytest.mark.parametrize(
    "data",
    [
        _client_frame(Opcode.TEXT, "é".encode()),
        _client_frame(Opcode.TEXT, b"\xff\xfe"),
        _client_frame(Opcode.TEXT, b"ab", fin=False),
        _client_frame(Opcode.BINARY, b"ab"),
        _client_frame(Opcode.PING, b""),
        _client_frame(Opcode.CLOSE, b"\x03\xe8"),
        _client_frame(Opcode.TEXT, b"a") + _client_frame(Opcode.TEXT, b"b"),
        _client_frame(Opcode.TEXT, b"abc")[:-1],
        _client_frame(Opcode.TEXT, b"x" * 70_000),
        _client_frame(Opcode.TEXT, b"x" * 2_000),
        _unmasked(b"ab"),
        bytes((0xC1, 0x82)) + b"\0" * 4 + b"ab",  # RSV1 set
        _long_length(b"ab"),
        b"\x81",
    ],
    ids=[
        "non-ascii",
        "invalid utf-8",
        "fragment",
        "binary",
        "ping",
        "close",
        "two frames",
        "part of one",
        "64-bit length",
        "over max_size",
        "unmasked",
        "reserved bit",
        "longer length than needed",
        "one byte",
    ],
)
def test_anything_but_one_whole_small_ascii_text_frame_is_left_to_the_parser(data: bytes) -> None:
    assert wsframe.client_text(data, 1_000) is None


def test_whatever_is_read_alone_the_parser_reads_as_the_same_one_text_frame() -> None:
    """Random bytes near a client text frame's shape: each one taken alone is exactly what
    the full parser would deliver, and nothing more."""
    rng = random.Random(7)
    taken = 0
    for _ in range(3_000):
        text = rng.choices(b"ab{}\x80", weights=(40, 40, 10, 10, 1), k=rng.randrange(0, 200))
        data = bytearray(_client_frame(Opcode.TEXT, bytes(text)))
        for _ in range(rng.randrange(0, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.2:
            data = data[: rng.randrange(len(data) + 1)]
        payload = wsframe.client_text(bytes(data), 150)
        if payload is None:
            continue
        taken += 1
        [frame] = _server_reads(bytes(data), 150)
        assert (frame.opcode, frame.fin, frame.data) == (Opcode.TEXT, True, payload)
    assert taken > 200
