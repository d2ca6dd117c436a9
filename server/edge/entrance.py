"""The way into a web process: which protocol takes a new connection, and whether an upgrade
request may become a socket.

uvicorn accepts connections and asks `Entrance` for a protocol. `FrontDoor` looks at a
connection's first bytes: a request for `/ws` becomes a `Connection` at once, anything else
goes to uvicorn's HTTP layer. An upgrade that reaches uvicorn later on a kept-alive connection
comes back through `Entrance.ws`. `UpgradePolicy` is what decides about an upgrade request:
the path, the Origin, whether the process still takes sockets, and the query-string token.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final, cast
from urllib.parse import parse_qs, urlsplit

from protocol.handshake import Refusal, UpgradeRequest
from server.app.config import Settings
from server.edge.connection import Connection
from server.edge.http import BoundedHttp, EdgeLimits
from server.edge.hub import Hub

PATH: Final = "/ws"
SOCKET_REQUEST: Final = b"GET " + PATH.encode()


class UpgradePolicy:
    """Whether an upgrade request may become a socket; `accepting` turns false when the
    process drains."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.accepting = True

    def check_upgrade(self, request: UpgradeRequest, transport: asyncio.BaseTransport) -> None:
        """Raise `Refusal` (with the HTTP status to answer) unless the upgrade may proceed."""
        if urlsplit(request.target).path != PATH:
            raise Refusal(404, f"no WebSocket endpoint here; use {PATH}")
        if not self.accepting:
            raise Refusal(503, "server restarting; connect again")
        if not self._origin_allowed(request, transport):
            raise Refusal(403, "Origin not allowed")

    def _origin_allowed(self, request: UpgradeRequest, transport: asyncio.BaseTransport) -> bool:
        """No Origin (not a browser), a listed one, or the page's own: same host and port,
        and the same scheme as the browser used to reach this server."""
        origin = request.header(b"origin")
        if origin is None or origin in self.settings.server.allowed_origins:
            return True
        parts = urlsplit(origin)
        host = request.header(b"host") or ""
        return parts.netloc.lower() == host.lower() and parts.scheme == self._scheme(
            request, transport
        )

    def _scheme(self, request: UpgradeRequest, transport: asyncio.BaseTransport) -> str:
        """The connection's own scheme or, behind a TLS-terminating proxy trusted by
        `server.trust_forwarded_proto`, the first value of its X-Forwarded-Proto (the
        connection Parley sees is plain HTTP while the browser's page is https)."""
        if self.settings.server.trust_forwarded_proto:
            forwarded = request.header(b"x-forwarded-proto")
            if forwarded:
                return forwarded.split(",")[0].strip().lower()
        return "https" if transport.get_extra_info("sslcontext") is not None else "http"

    def query_token(self, request: UpgradeRequest) -> str | None:
        if not self.settings.auth.allow_query_token:
            return None
        values = parse_qs(urlsplit(request.target).query).get("token")
        return values[0] if values else None


class Entrance:
    """uvicorn's two protocol classes in a web process. `http` takes every accepted
    connection (see `FrontDoor`); `ws` takes an upgrade request that reached uvicorn's HTTP
    layer, one that came after other requests on a kept-alive connection. The hub exists
    once the app's lifespan has started, before uvicorn takes connections."""

    def __init__(self, hub: Callable[[], Hub | None], limits: EdgeLimits) -> None:
        self.hub = hub
        self.limits = limits

    def http(self, **uvicorn_args: Any) -> FrontDoor:
        return FrontDoor(self.hub, self.limits, uvicorn_args)

    def ws(self, **_: Any) -> Connection:
        hub = self.hub()
        if hub is None:
            raise RuntimeError("a socket arrived before the web process started")
        return Connection(hub, handshake_timeout=self.limits.request_timeout)


class FrontDoor(asyncio.Protocol):
    """A new connection, until its first bytes say what it is: a request for `/ws` makes it
    a socket at once, with no HTTP layer before the WebSocket one (uvicorn's request parsing
    and its hand-over cost a seventh of a connection's set-up); anything else goes to
    uvicorn's httptools protocol, bounded (`server.edge.http.BoundedHttp`), as if it had had
    the connection from the start: the request's deadline counts from the connection's
    opening."""

    __slots__ = ("_head", "_hub", "_limits", "_timer", "_transport", "_uvicorn_args")

    def __init__(
        self, hub: Callable[[], Hub | None], limits: EdgeLimits, uvicorn_args: dict[str, Any]
    ) -> None:
        self._hub = hub
        self._limits = limits
        self._uvicorn_args = uvicorn_args
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._limits.request_timeout, self._transport.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def data_received(self, data: bytes) -> None:
        head = self._head + data
        if len(head) < len(SOCKET_REQUEST) + 1 and (SOCKET_REQUEST + b" ").startswith(head):
            self._head = head
            return
        hub = self._hub()
        protocol: asyncio.Protocol
        after = head[len(SOCKET_REQUEST) : len(SOCKET_REQUEST) + 1]
        timer = self._timer
        assert timer is not None
        timer.cancel()
        if hub is not None and head.startswith(SOCKET_REQUEST) and after in (b" ", b"?"):
            protocol = Connection(hub, handshake_timeout=self._limits.request_timeout)
        else:
            protocol = BoundedHttp(self._limits, timer.when(), **self._uvicorn_args)
        transport = self._transport
        assert transport is not None
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(head)
