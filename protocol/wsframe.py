"""Server-to-client WebSocket text frames as bytes (RFC 6455 §5.2), built once per event.

A published event goes to every tab watching its conversation. Framing it here, once, lets
each socket write the same bytes object to its transport instead of framing the same text
again per socket. This is sound because Parley never negotiates an extension
(permessage-deflate would make each socket's bytes its own) and server frames are unmasked.
Frames from clients are parsed by `websockets`' sans-I/O protocol, except the commonest read
of all, which `client_text` takes alone: one whole small text message in one read.
"""

from __future__ import annotations

from typing import Final

from websockets.utils import apply_mask

_FIN_TEXT: Final = 0x81
_MASKED: Final = 0x80


def text(payload: bytes) -> bytes:
    """One unfragmented, unmasked text frame carrying `payload` (UTF-8 JSON)."""
    n = len(payload)
    if n < 126:
        return bytes((_FIN_TEXT, n)) + payload
    if n < 65_536:
        return bytes((_FIN_TEXT, 126)) + n.to_bytes(2, "big") + payload
    return bytes((_FIN_TEXT, 127)) + n.to_bytes(8, "big") + payload


def payload_of(frame: bytes) -> bytes:
    """The payload of a frame made by `text`."""
    n = frame[1]
    if n < 126:
        return frame[2:]
    if n == 126:
        return frame[4:]
    return frame[10:]


def client_text(data: bytes, max_size: int) -> bytes | None:
    """The payload of `data` if `data` is exactly one client text frame that needs nothing
    else from a parser: final, masked, no reserved bit, 7- or 16-bit length, at most
    `max_size` bytes of ASCII (so valid UTF-8). Anything else — a control frame, a fragment,
    two frames or part of one, non-ASCII text, a protocol error — is None: `websockets`'
    parser takes it and answers it as it always did. A socket's join, say or leave arrives
    this way, and sparing the parser (made anew for a socket parked between frames) is a
    tenth of a connection's set-up."""
    if len(data) < 6 or data[0] != _FIN_TEXT or not data[1] & _MASKED:
        return None
    n = data[1] & 0x7F
    start = 6
    if n == 126:
        n = int.from_bytes(data[2:4], "big")
        start = 8
        if n < 126:  # not the shortest encoding: the parser's call
            return None
    elif n == 127:
        return None
    if n > max_size or len(data) != start + n:
        return None
    payload = apply_mask(data[start:], data[start - 4 : start])
    return payload if payload.isascii() else None
