"""A broken link on demand: a TCP proxy on 127.0.0.1 that can pause, cut and refuse.

It runs its own event loop in a background thread, so it keeps forwarding while a test blocks
(waiting for a process to exit, say) and its faults do not depend on the test's loop:

    with Proxy.to_url(services.redis_url) as proxy:
        env = {"REDIS_URL": proxy.url(services.redis_url)}
        ...
        proxy.pause()   # the peer is unreachable: nothing moves, connections stay open
        proxy.resume()
        proxy.cut()     # every current connection is reset
        proxy.hold_replies()  # requests reach the peer, its answers wait (resume ends it)
        proxy.refuse()  # down: current connections reset, new ones closed at once (resume ends it)

`Proxy(host, port, refuse_upgrades=True)` is the corporate proxy that breaks WebSocket: a
connection whose first request asks to upgrade is answered 403 (counted in `upgrades_refused`);
every other connection is forwarded. Browsers open every WebSocket on a connection of its own,
so looking at a connection's first request is enough.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

CHUNK = 65536
CONNECT_TIMEOUT = 5.0
REFUSED_UPGRADE = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class Proxy:
    def __init__(
        self, host: str, port: int, *, refuse_upgrades: bool = False, listen: str = "127.0.0.1"
    ) -> None:
        self.target = (host, port)
        self.listen = listen
        self.port = 0
        self.accepted = 0
        self.refuse_upgrades = refuse_upgrades
        self.upgrades_refused = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="proxy")
        self._flowing: asyncio.Event | None = None
        self._replying: asyncio.Event | None = None
        self._refusing = False
        self._sockets: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None

    @classmethod
    def to_url(cls, url: str, *, refuse_upgrades: bool = False) -> Proxy:
        parts = urlsplit(url)
        assert parts.hostname == "127.0.0.1" and parts.port, url
        return cls(parts.hostname, parts.port, refuse_upgrades=refuse_upgrades).start()

    def url(self, url: str) -> str:
        """`url` with its host:port replaced by the proxy's (user, path and query kept)."""
        parts = urlsplit(url)
        user = f"{parts.username}@" if parts.username else ""
        return urlunsplit(parts._replace(netloc=f"{user}{self.listen}:{self.port}"))

    def redis_url(self, url: str, database: int) -> str:
        """`url` through the proxy, on Redis database `database` (a test's own)."""
        return f"{self.url(url).rsplit('/', 1)[0]}/{database}"

    # ------------------------------------------------------------------ control (any thread)

    def start(self) -> Proxy:
        self._thread.start()
        self._call(self._listen)
        return self

    def pause(self) -> None:
        self._call(self._set_flowing, False)

    def resume(self) -> None:
        self._call(self._set_flowing, True)

    def cut(self) -> None:
        self._call(self._abort_all)

    def hold_replies(self) -> None:
        """What the clients send goes on; what the peer answers waits, so that a `cut`
        then loses a reply to a request the peer has carried out."""
        self._call(self._set_replying, False)

    def refuse(self) -> None:
        self._call(self._abort_all, True)

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._shutdown)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _call(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        asyncio.run_coroutine_threadsafe(fn(*args), self._loop).result(10)

    # ------------------------------------------------------------------ in the proxy's loop

    async def _listen(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._replying = asyncio.Event()
        self._replying.set()
        self._server = await asyncio.start_server(self._handle, self.listen, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _set_flowing(self, flowing: bool) -> None:
        assert self._flowing is not None
        if flowing:
            self._refusing = False
            self._flowing.set()
            await self._set_replying(True)
        else:
            self._flowing.clear()

    async def _set_replying(self, replying: bool) -> None:
        assert self._replying is not None
        if replying:
            self._replying.set()
        else:
            self._replying.clear()

    async def _abort_all(self, refuse: bool = False) -> None:
        self._refusing = self._refusing or refuse
        for writer in tuple(self._sockets):
            writer.transport.abort()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._abort_all()
        if self._flowing is not None:
            self._flowing.set()  # let held connections run into their aborted sockets
        if self._replying is not None:
            self._replying.set()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        self.accepted += 1
        self._sockets.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        upstream: asyncio.StreamWriter | None = None
        try:
            if self._refusing:
                return
            await self._flowing.wait()  # paused: a new connection hangs like an unreachable host
            head = await self._first_head(reader) if self.refuse_upgrades else b""
            if _asks_upgrade(head):
                self.upgrades_refused += 1
                writer.write(REFUSED_UPGRADE)
                await writer.drain()
                return
            up_reader, upstream = await asyncio.wait_for(
                asyncio.open_connection(*self.target), CONNECT_TIMEOUT
            )
            upstream.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets.add(upstream)
            upstream.write(head)
            replies = self._pipe(up_reader, writer, self._replying)
            await asyncio.gather(self._pipe(reader, upstream), replies, return_exceptions=True)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            for end in (writer, upstream):
                if end is not None:
                    self._sockets.discard(end)
                    end.transport.abort()

    @staticmethod
    async def _first_head(reader: asyncio.StreamReader) -> bytes:
        """The connection's first request line and headers (what is forwarded first)."""
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CONNECT_TIMEOUT)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        held: asyncio.Event | None = None,
    ) -> None:
        """Forward one direction; `held` (the peer's answers) also waits while cleared."""
        assert self._flowing is not None
        try:
            while True:
                await self._flowing.wait()
                data = await reader.read(CHUNK)
                if not data:
                    break
                await self._flowing.wait()  # a chunk read just before a pause waits too
                if held is not None:
                    await held.wait()
                writer.write(data)
                await writer.drain()
        finally:
            with contextlib.suppress(Exception):
                writer.transport.abort()


def _asks_upgrade(head: bytes) -> bool:
    return any(
        line.lower().replace(b" ", b"") == b"upgrade:websocket" for line in head.split(b"\r\n")
    )
