"""One tab over Server-Sent Events (`parley load --transport sse`): the same checks as a socket
tab (`LoadTab`: every event's seq, latencies, rejoin with `after`), fed by
`GET /api/conversations/{id}/events` instead of a socket, with the requests a socket sends as
frames made over REST (`POST /api/conversations`, `POST …/messages`). Authentication is the
bearer token on every request, or with `--sse-tickets` a single-use stream ticket per stream
(what a browser's `EventSource` does). A stream the server ends (its maximum lifetime, or a
reader that fell too far behind) is opened again at once with `after` = the last seq held, as
`EventSource` does, and counted (`sse.reopened`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlencode, urlsplit

import httpx

from server.load.tab import Conv, Incoming, LoadTab, RequestFailed

if TYPE_CHECKING:
    from server.load.workload import Driver

CODE_BY_STATUS: Final = {
    400: "invalid",
    401: "unauthorized",
    404: "not_found",
    409: "busy",
    413: "too_large",
    429: "rate_limited",
    503: "unavailable",
}


def http_base(ws_url: str) -> str:
    """ws://host:port/ws → http://host:port."""
    scheme, _, rest = ws_url.partition("://")
    return f"{'https' if scheme == 'wss' else 'http'}://{rest.split('/', 1)[0]}"


def client_for(plan_url: str, timeout: float) -> httpx.AsyncClient:
    """One HTTP client per generator process for the REST requests (streams: `EventStream`)."""
    return httpx.AsyncClient(
        base_url=http_base(plan_url),
        limits=httpx.Limits(max_connections=256, max_keepalive_connections=256),
        timeout=timeout,
    )


class SseTab(LoadTab):
    """A tab whose conversation comes over SSE and whose requests go over REST."""

    __slots__ = ("http", "reader", "stream_open")

    def __init__(self, driver: Driver, conv: Conv, index: int, http: httpx.AsyncClient) -> None:
        super().__init__(driver, conv, index)
        self.http = http
        self.reader: asyncio.Task[None] | None = None
        self.stream_open = False

    @property
    def alive(self) -> bool:
        return not self.dropping and not self.driver.closing

    @property
    def token(self) -> str:
        tokens = self.driver.plan.tokens
        return tokens[self.conv.index % len(tokens)]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def open(self, again: bool = False) -> bool:
        """Nothing to open before a stream (each request carries the token)."""
        d = self.driver
        d.stats.counters["connections.reopened" if again else "connections.ok"] += 1
        d.opened += 1
        return True

    async def request(self, frame: dict[str, Any]) -> Incoming:
        kind = frame["type"]
        if kind == "create":
            meta = await self._post("/api/conversations", {"title": frame.get("title", "")})
            return Incoming(type="created", conversation=str(meta["id"]))
        if kind == "say":
            body = {"text": frame["text"], "id": frame["id"]}
            reply = await self._post(f"/api/conversations/{frame['conversation']}/messages", body)
            return Incoming(type="ack", message_id=str(reply.get("message_id", "")))
        if kind == "join":
            await self.join(frame.get("after"))
            return Incoming(type="joined")
        raise RequestFailed(f"unsupported.{kind}")

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self.driver.plan.request_timeout):
                response = await self.http.post(path, json=body, headers=self.headers)
        except TimeoutError:
            raise RequestFailed("timeout") from None
        except httpx.HTTPError:
            raise RequestFailed("closed") from None
        if response.status_code >= 400:
            raise RequestFailed(CODE_BY_STATUS.get(response.status_code, "error"))
        answer: dict[str, Any] = response.json() if response.content else {}
        return answer

    async def join(self, after: int | None) -> None:
        """Open the stream and wait for its `joined`."""
        self._stop_reading()
        joined = self.waiting["joined"] = asyncio.get_running_loop().create_future()
        self.reader = asyncio.create_task(self._follow(after))
        try:
            async with asyncio.timeout(self.driver.plan.connect_timeout):
                await joined
        except TimeoutError:
            raise RequestFailed("timeout") from None
        finally:
            self.waiting.pop("joined", None)

    def drop(self) -> None:
        self.dropping = True
        self._stop_reading()

    def close(self) -> None:
        self._stop_reading()

    def _stop_reading(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            self.reader = None

    async def _follow(self, after: int | None) -> None:
        """Read the stream; when the server ends it, open it again after the last seq."""
        d = self.driver
        while True:
            started = time.monotonic()
            try:
                ended_cleanly = await self._read(after, started)
            except (httpx.HTTPError, OSError, ValueError, asyncio.IncompleteReadError) as exc:
                self._failed(type(exc).__name__)
                return
            if not ended_cleanly:
                return
            if self.dropping or d.closing:
                return
            d.stats.counters["sse.reopened"] += 1
            after = self.last_seq

    async def _read(self, after: int | None, started: float) -> bool:
        """One response; False when it was refused."""
        d = self.driver
        query = {} if after is None else {"after": str(after)}
        headers = self.headers
        if d.plan.sse_tickets:
            ticket = await self._post("/api/stream-tickets", {})
            query["ticket"] = ticket["ticket"]
            headers = {}
        path = f"/api/conversations/{self.conv.id}/events"
        if query:
            path += "?" + urlencode(query)
        base = urlsplit(str(self.http.base_url))
        stream = await EventStream.open(base.hostname or "", base.port or 80, path, headers)
        try:
            if stream.status != 200:
                self._failed(CODE_BY_STATUS.get(stream.status, str(stream.status)))
                return False
            now = time.monotonic()
            d.stats.record("connect", now - started, now)
            async for data in stream.events():
                self.on_text(data)
                self._joined_now()
        finally:
            stream.close()
        return True

    def _joined_now(self) -> None:
        """A stream's first event is its `joined`."""
        future = self.waiting.get("joined")
        if future is not None and not future.done():
            future.set_result(Incoming(type="joined"))

    def _failed(self, reason: str) -> None:
        d = self.driver
        if self.dropping or d.closing:
            return
        d.stats.counters[f"sse.failed.{reason}"] += 1
        future = self.waiting.get("joined")
        if future is not None and not future.done():
            future.set_exception(RequestFailed(reason))
        else:
            d.unexpected_closes += 1


class EventStream:
    """One SSE response read off a plain socket: the few bytes an idle stream costs the load
    generator are its socket and buffers (an HTTP client library's pool would cost time per
    stream opened)."""

    __slots__ = ("chunked", "reader", "status", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = 0
        self.chunked = False

    @classmethod
    async def open(cls, host: str, port: int, path: str, headers: dict[str, str]) -> EventStream:
        reader, writer = await asyncio.open_connection(host, port)
        stream = cls(reader, writer)
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Accept: text/event-stream"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        stream.status = int(head.split(" ", 2)[1])
        stream.chunked = "transfer-encoding: chunked" in head
        return stream

    async def _body(self) -> AsyncIterator[bytes]:
        """The body's bytes as they come (chunked, or up to the end of the connection)."""
        reader = self.reader
        while True:
            if not self.chunked:
                data = await reader.read(65_536)
                if not data:
                    return
                yield data
                continue
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                return
            yield await reader.readexactly(size)
            await reader.readexactly(2)

    async def events(self) -> AsyncIterator[bytes]:
        """Each event's `data` (its lines joined); comments, `id:`, `retry:` skipped."""
        buffer = b""
        async for data in self._body():
            buffer += data.replace(b"\r\n", b"\n")
            while (end := buffer.find(b"\n\n")) >= 0:
                block, buffer = buffer[:end], buffer[end + 2 :]
                payload = [
                    line[5:].removeprefix(b" ")
                    for line in block.split(b"\n")
                    if line.startswith(b"data:")
                ]
                if payload:
                    yield b"\n".join(payload)

    def close(self) -> None:
        self.writer.transport.abort()


async def close_client(http: httpx.AsyncClient) -> None:
    with contextlib.suppress(Exception):
        await http.aclose()
