"""Server-to-client WebSocket text frames as bytes (RFC 6455 §5.2), built once per event.

A published event goes to every tab watching its conversation. Framing it here, once, lets
each socket write the same bytes object to its transport instead of framing the same text
again per socket. This is sound because Parley never negotiates an extension
(permessage-deflate would make each socket's bytes its own) and server frames are unmasked.
Frames from clients are parsed by `websockets`' sans-I/O protocol, not here.
"""

from __future__ import annotations

from typing import Final

_FIN_TEXT: Final = 0x81


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
