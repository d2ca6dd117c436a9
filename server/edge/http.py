"""The HTTP edge: every request a Parley process serves over plain HTTP is bounded before
the app sees it.

uvicorn's httptools protocol has no deadline for an incomplete request and no bound on its
head: half a request line holds a connection open for ever, and a header line that never ends
is buffered whole. `BoundedHttp` is that protocol with three bounds, the same on every route
and for every request of a kept-alive connection, not only the first:

- a deadline (`server.request_timeout`) from a request's first byte (a new connection's
  first byte: from its opening) until its head and body are in; past it the client gets 408
  and the connection closes;
- a head of at most `MAX_HEAD_BYTES` (the bound of the WebSocket handshake too), else 431;
- a body of at most `server.max_body_bytes`, else 413 (a `Content-Length` over it is
  refused before the body is read).

Between requests uvicorn's keep-alive timeout (`server.keep_alive_timeout`) closes an idle
connection. A refusal ends the connection: the response, then end of stream; what the client
goes on sending is read and dropped for a moment (`LINGER_SECONDS`, `LINGER_BYTES`) before the
connection closes, so that the client reads the refusal rather than a reset.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Final

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from protocol.handshake import MAX_REQUEST_BYTES, refuse

MAX_HEAD_BYTES: Final = MAX_REQUEST_BYTES
"""Request line and headers; the same bound as a WebSocket upgrade's (`protocol.handshake`)."""
LINGER_SECONDS: Final = 2.0
LINGER_BYTES: Final = 1_048_576
"""After a refusal, how long and how much of what the client still sends is read and dropped
before the connection closes. Closing with unread bytes makes the kernel send a reset, which
discards the refusal at the client before the client has read it."""
_LINE_OVERHEAD: Final = 4
"""`: ` and CRLF around each header; the request line's method and version are counted as
one such line more."""


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    request_timeout: float
    """Seconds a request has, from its first byte, to arrive whole (head and body)."""
    max_body_bytes: int


class BoundedHttp(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with Parley's bounds (see the module docstring).

    `deadline` is the loop time by which the first request must be in, when the connection
    was accepted by someone else first (`server.edge.entrance.FrontDoor`)."""

    def __init__(
        self, limits: EdgeLimits, deadline: float | None = None, **uvicorn_args: Any
    ) -> None:
        super().__init__(**uvicorn_args)
        self._limits = limits
        self._first_deadline = deadline
        self._timer: asyncio.TimerHandle | None = None
        self._between = True
        """No request in progress: the next byte starts one."""
        self._in_head = False
        self._head_bytes = 0
        self._body_bytes = 0
        self._refused = False
        self._dropped = 0

    # ------------------------------------------------------------------ transport events

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self._first_deadline)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Count the bytes of a head in progress; a head still incomplete past the bound is
        refused before more is buffered. A read in which one request ends and the next
        begins counts only from the next read on (bounded by one read)."""
        if self._refused:
            self._drop(data)
            return
        if self._between:
            if self._timer is None:
                self._arm()
            self._head_bytes += len(data)
        elif self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > MAX_HEAD_BYTES and not self._refused:
            self._refuse(431, "request header fields too large")

    def handle_websocket_upgrade(self) -> None:
        """The connection becomes a socket, with its own handshake deadline."""
        self._disarm()
        super().handle_websocket_upgrade()

    # ------------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        if self._refused:
            return
        self._between = False
        self._in_head = True
        self._body_bytes = 0
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_head = False
        self._head_bytes = 0
        if self._head_size() > MAX_HEAD_BYTES:
            self._refuse(431, "request header fields too large")
            return
        if self._declared_length() > self._limits.max_body_bytes:
            self._refuse(413, self._body_refusal())
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        self._body_bytes += len(body)
        if self._body_bytes > self._limits.max_body_bytes:
            self._refuse(413, self._body_refusal())
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._between = True
        self._disarm()
        super().on_message_complete()

    # ------------------------------------------------------------------ bounds

    def _head_size(self) -> int:
        """The head's size as parsed: target, header names and values, and the framing."""
        size = len(self.url) + _LINE_OVERHEAD * (len(self.headers) + 1)
        for name, value in self.headers:
            size += len(name) + len(value)
        return size

    def _declared_length(self) -> int:
        for name, value in self.headers:
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return 0  # httptools has refused it already
        return 0

    def _body_refusal(self) -> str:
        return f"request body larger than {self._limits.max_body_bytes} bytes"

    def _arm(self, when: float | None = None) -> None:
        loop = self.loop
        if when is None:
            when = loop.time() + self._limits.request_timeout
        self._timer = loop.call_at(when, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self._refused or self.transport.is_closing():
            return
        if self._between and not self._head_bytes:  # a connection that never sent a byte
            self._refused = True
            self.transport.close()
            return
        self._refuse(408, "the request did not arrive in time")

    def _refuse(self, status: int, text: str) -> None:
        """Answer `status` unless the app has begun its response, and close. An app still
        waiting for the body is told the client went away."""
        self._refused = True
        self._disarm()
        cycle = self.cycle
        answer = True
        if cycle is not None and not cycle.response_complete:
            answer = not cycle.response_started
            cycle.disconnected = True
            cycle.message_event.set()
        transport = self.transport
        if answer:
            transport.write(refuse(status, text))
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self.flow.resume_reading()  # to drop what comes, not to leave it unread
        self._timer = self.loop.call_later(LINGER_SECONDS, transport.close)

    def _drop(self, data: bytes) -> None:
        self._dropped += len(data)
        if self._dropped > LINGER_BYTES:
            self.transport.close()
