"""Server frames built once per event parse as what they carry, at every length class."""

from __future__ import annotations

import pytest
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
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
