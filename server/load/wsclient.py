"""A minimal RFC 6455 WebSocket client on a bare asyncio Protocol, for the load generator.

The `websockets` library (what `server.dev.client` uses) costs tens of microseconds per frame in
the client; a load generator that shares a core with the server under test must spend as little
as possible, so this one does only what a Parley tab needs: the upgrade request (subprotocols
`parley.v1` and `bearer.<JWT>`), unmasked text frames from the server, masked text frames to
it, ping/pong, and close codes. No extensions, no compression.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from collections.abc import Callable
from typing import Final, cast
from urllib.parse import urlsplit

OP_CONT: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

MAX_HEADER_BYTES: Final = 16_384

_pack_short = struct.Struct("!H").pack
_pack_long = struct.Struct("!Q").pack
_unpack_short = struct.Struct("!H").unpack_from
_unpack_long = struct.Struct("!Q").unpack_from


class HandshakeError(Exception):
    """The upgrade failed; `reason` is a short label for the failure table."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class Endpoint:
    """Where to connect, parsed once from a `ws://host:port/path` URL."""

    __slots__ = ("host", "path", "port", "request_head")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "ws":
            raise ValueError(f"only ws:// URLs are supported, not {url!r}")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.request_head = (
            f"GET {self.path} HTTP/1.1\r\n"
            f"Host: {self.host}:{self.port}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            "Sec-WebSocket-Version: 13\r\n"
        )


def _mask(payload: bytes) -> bytes:
    """Client frames must be masked (RFC 6455 5.3): a fresh 4-byte key XORed over the payload."""
    key = os.urandom(4)
    n = len(payload)
    if n == 0:
        return key
    repeated = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")).to_bytes(
        n, "little"
    )
    return key + masked


def encode_frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + _pack_short(n)
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + _pack_long(n)
    return head + _mask(payload)


class WSClient(asyncio.Protocol):
    """One client socket. `on_text(payload)` is called for every text message in order;
    `on_closed(code, reason)` once, when the connection ends for whatever reason (`code` is
    None when no close frame came: a reset or EOF)."""

    __slots__ = (
        "_buffer",
        "_fragments",
        "_upgraded",
        "close_code",
        "close_reason",
        "closed",
        "on_closed",
        "on_text",
        "opened",
        "transport",
    )

    def __init__(
        self,
        on_text: Callable[[bytes], None],
        on_closed: Callable[[int | None, str], None],
    ) -> None:
        self.on_text = on_text
        self.on_closed = on_closed
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False
        self.close_code: int | None = None
        self.close_reason = ""
        self._buffer = bytearray()
        self._upgraded = False
        self._fragments: list[bytes] | None = None

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self._upgraded:
            if not self._buffer and self._one_text_frame(data):
                return
            self._buffer += data
            self._parse_frames()
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEADER_BYTES:
                self._fail(HandshakeError("bad_response", "response head too large"))
            return
        head = bytes(self._buffer[:end]).decode("latin-1")
        del self._buffer[: end + 4]
        status_line = head.split("\r\n", 1)[0]
        parts = status_line.split(" ", 2)
        status = parts[1] if len(parts) > 1 else "?"
        if status != "101":
            self._fail(HandshakeError(f"http_{status}", status_line))
            return
        self._upgraded = True
        if not self.opened.done():
            self.opened.set_result(None)
        if self._buffer:
            self._parse_frames()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(
                HandshakeError("reset_before_upgrade", str(exc) if exc else "EOF")
            )
        self._finish()

    def eof_received(self) -> bool:
        return False

    # ------------------------------------------------------------------ sending

    def handshake(self, endpoint: Endpoint, protocols: list[str]) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"{endpoint.request_head}Sec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Protocol: {', '.join(protocols)}\r\n\r\n"
        )
        assert self.transport is not None
        self.transport.write(request.encode("latin-1"))

    def send_text(self, payload: bytes) -> bool:
        if self.closed or self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(encode_frame(OP_TEXT, payload))
        return True

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame and hang up (the load generator does not wait for the echo)."""
        if self.transport is None or self.transport.is_closing():
            return
        if self._upgraded:
            self.transport.write(encode_frame(OP_CLOSE, _pack_short(code) + reason.encode()))
        self.transport.close()

    def abort(self) -> None:
        """Drop the connection without a close frame, as a lost network would."""
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------------ frames

    def _one_text_frame(self, data: bytes) -> bool:
        """The common case, one whole unmasked text frame of < 64 KiB in one read, without
        the buffer: the generator's cost per frame is most of what it measures with."""
        n = len(data)
        if n < 2 or data[0] != 0x81:
            return False
        length = data[1]
        header = 2
        if length == 126:
            if n < 4:
                return False
            length = _unpack_short(data, 2)[0]
            header = 4
        elif length > 126:
            return False
        if n != header + length:
            return False
        self.on_text(data[header:])
        return True

    def _parse_frames(self) -> None:
        buf = self._buffer
        pos = 0
        size = len(buf)
        while size - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            header = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = _unpack_short(buf, pos + 2)[0]
                header = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = _unpack_long(buf, pos + 2)[0]
                header = 10
            if b1 & 0x80:  # servers must not mask; tolerate it anyway
                header += 4
            end = pos + header + length
            if end > size:
                break
            payload = bytes(buf[pos + header : end])
            if b1 & 0x80:
                key = buf[pos + header - 4 : pos + header]
                payload = bytes(c ^ key[i % 4] for i, c in enumerate(payload))
            pos = end
            opcode = b0 & 0x0F
            fin = b0 & 0x80
            if opcode in (OP_TEXT, OP_BINARY):
                if fin:
                    self.on_text(payload)
                else:
                    self._fragments = [payload]
            elif opcode == OP_CONT:
                if self._fragments is not None:
                    self._fragments.append(payload)
                    if fin:
                        whole = b"".join(self._fragments)
                        self._fragments = None
                        self.on_text(whole)
            elif opcode == OP_PING:
                if self.transport is not None and not self.transport.is_closing():
                    self.transport.write(encode_frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                if len(payload) >= 2:
                    self.close_code = _unpack_short(payload, 0)[0]
                    self.close_reason = payload[2:].decode(errors="replace")
                else:
                    self.close_code = 1005
                if self.transport is not None and not self.transport.is_closing():
                    self.transport.write(encode_frame(OP_CLOSE, payload[:2]))
                    self.transport.close()
                del buf[:pos]
                self._finish()
                return
        if pos:
            del buf[:pos]

    def _fail(self, exc: HandshakeError) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def _finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.on_closed(self.close_code, self.close_reason)


async def connect(
    endpoint: Endpoint,
    protocols: list[str],
    on_text: Callable[[bytes], None],
    on_closed: Callable[[int | None, str], None],
    timeout: float,
) -> WSClient:
    """Open a TCP connection, send the upgrade and wait for `101 Switching Protocols`."""
    loop = asyncio.get_running_loop()
    client = WSClient(on_text, on_closed)
    try:
        async with asyncio.timeout(timeout):
            await loop.create_connection(lambda: client, endpoint.host, endpoint.port)
            client.handshake(endpoint, protocols)
            await client.opened
    except BaseException:
        client.abort()
        raise
    return client
