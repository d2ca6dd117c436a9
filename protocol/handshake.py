"""The WebSocket opening handshake, server side (RFC 6455 §4.2), free of I/O.

Feed the bytes of the upgrade request to `RequestParser`; once the request is complete it
returns an `UpgradeRequest` (or raises `Refusal` with the HTTP status to answer). `accept`
and `refuse` give the exact response bytes. Parsing is httptools' C parser; after the
handshake, frames are `websockets`' sans-I/O protocol's business.

Parley does its own handshake rather than `websockets.ServerProtocol.accept` because, with one
web process taking thousands of sockets a second, the request's header parsing and the
response's assembly were the biggest cost of a connection after the kernel's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Final

import httptools

MAX_REQUEST_BYTES: Final = 16_384
_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_WANTED: Final = frozenset(
    {
        b"host",
        b"origin",
        b"upgrade",
        b"connection",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-protocol",
        b"x-forwarded-proto",
    }
)


class Refusal(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


@dataclass(slots=True)
class UpgradeRequest:
    target: str = ""
    """The request target: path and query string."""
    headers: dict[bytes, bytes] = field(default_factory=dict)
    """The headers the handshake needs, by lower-case name (repeated ones joined by ", ")."""
    complete: bool = False

    def header(self, name: bytes) -> str | None:
        value = self.headers.get(name)
        return None if value is None else value.decode("latin-1")

    @property
    def subprotocols(self) -> list[str]:
        offered = self.header(b"sec-websocket-protocol") or ""
        return [p.strip() for p in offered.split(",") if p.strip()]


class RequestParser:
    """Collects one upgrade request; the HTTP parser is dropped with this object."""

    __slots__ = ("_parser", "_received", "request", "rest")

    def __init__(self) -> None:
        self.request = UpgradeRequest()
        self.rest = b""
        """Bytes that followed the request in the same read: the client's first frames."""
        self._received = 0
        self._parser = httptools.HttpRequestParser(self)

    def feed(self, data: bytes) -> UpgradeRequest | None:
        """The request, once complete; None while more bytes are needed."""
        self._received += len(data)
        if self._received > MAX_REQUEST_BYTES:
            raise Refusal(431, "request header fields too large")
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.request.complete = True
            self.rest = data[upgrade.args[0] :] if upgrade.args else b""
        except httptools.HttpParserError:
            raise Refusal(400, "malformed HTTP request") from None
        if not self.request.complete:
            return None
        return self._checked()

    def _checked(self) -> UpgradeRequest:
        request = self.request
        if self._parser.get_method() != b"GET" or self._parser.get_http_version() != "1.1":
            raise Refusal(400, "a WebSocket upgrade is a GET over HTTP/1.1")
        upgrade = (request.header(b"upgrade") or "").lower()
        connection = (request.header(b"connection") or "").lower()
        if upgrade != "websocket" or "upgrade" not in {t.strip() for t in connection.split(",")}:
            raise Refusal(400, "not a WebSocket upgrade request")
        if request.header(b"sec-websocket-version") != "13":
            raise Refusal(426, "WebSocket version 13 is required")
        key = request.headers.get(b"sec-websocket-key", b"")
        try:
            valid_key = len(base64.b64decode(key, validate=True)) == 16
        except binascii.Error:
            valid_key = False
        if not valid_key:
            raise Refusal(400, "invalid Sec-WebSocket-Key")
        return request

    # httptools callbacks

    def on_url(self, url: bytes) -> None:
        self.request.target += url.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name not in _WANTED:
            return
        headers = self.request.headers
        headers[name] = headers[name] + b", " + value if name in headers else value

    def on_headers_complete(self) -> None:
        """A request that is complete but asks for no upgrade: httptools raises nothing."""
        self.request.complete = True


def accept(request: UpgradeRequest, subprotocol: str | None) -> bytes:
    """The 101 response to a request `RequestParser` returned."""
    digest = hashlib.sha1(request.headers[b"sec-websocket-key"] + _GUID).digest()
    lines = [
        b"HTTP/1.1 101 Switching Protocols",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: " + base64.b64encode(digest),
    ]
    if subprotocol is not None:
        lines.append(b"Sec-WebSocket-Protocol: " + subprotocol.encode("latin-1"))
    return b"\r\n".join(lines) + b"\r\n\r\n"


def refuse(status: int, text: str) -> bytes:
    """A plain-text HTTP response refusing the upgrade; the connection closes after it."""
    body = text.encode() + b"\n"
    head = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if status == 426:
        head.append("Sec-WebSocket-Version: 13")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
