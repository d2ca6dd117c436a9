"""Append events straight into conversations' Redis logs, as the generation worker does.

The `publish` workload uses this to offer the web process a known frame rate with a publish
time stamped into every frame, so what it measures is the fan-out (Redis pub/sub -> web
process -> tab), not the model or the worker. It speaks RESP over a bare asyncio stream and
pipelines `EVALSHA` of the same append script Parley's worker runs (`server.redis.eventlog`): the
seq is taken, the frame appended to the log and PUBLISHed in one atomic step.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from urllib.parse import urlsplit

from server.redis.client import bulk
from server.redis.eventlog import APPEND, event_keys


def command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(map(bulk, args))


class Publisher:
    def __init__(self, url: str, max_events: int, ttl: int) -> None:
        if not url:
            raise ValueError("the publish workload needs --redis-url (or REDIS_URL)")
        parts = urlsplit(url)
        if parts.scheme not in ("redis", ""):
            raise ValueError(f"only redis:// URLs are supported, not {url!r}")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.db = int(parts.path.strip("/") or 0)
        self.password = parts.password
        self.max_events = max_events
        self.ttl = ttl
        self._commands: dict[str, tuple[bytes, bytes]] = {}
        self._sha = b""
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: collections.deque[str] = collections.deque()
        self._buffer: list[bytes] = []
        self._task: asyncio.Task[None] | None = None
        self.heads: dict[str, int] = {}
        self.sent = 0
        self.errors = 0
        self.last_error = ""

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        if self.password:
            await self._call(b"AUTH", self.password.encode())
        if self.db:
            await self._call(b"SELECT", str(self.db).encode())
        self._sha = await self._call(b"SCRIPT", b"LOAD", APPEND.source.encode())
        self._task = asyncio.create_task(self._read_replies())

    async def _call(self, *args: bytes) -> bytes:
        assert self._reader is not None and self._writer is not None
        self._writer.write(command(*args))
        line = await self._reader.readline()
        if line.startswith(b"-"):
            raise ConnectionError(line.decode(errors="replace").strip())
        if line.startswith(b"$"):
            size = int(line[1:])
            data = await self._reader.readexactly(size + 2)
            return data[:-2]
        return line[1:].strip()

    def append(self, conversation: str, frame: bytes) -> None:
        """Queue one append; `write()` sends what is queued in one go."""
        before, after = self._commands.get(conversation) or self._command(conversation)
        self._buffer.append(before + bulk(frame) + after)
        self._pending.append(conversation)
        self.sent += 1

    def _command(self, conversation: str) -> tuple[bytes, bytes]:
        """The conversation's EVALSHA command before and after the frame."""
        script_keys, args = APPEND.positional(
            {
                **event_keys(conversation),
                "frame": "$FRAME$",
                "maxlen": self.max_events,
                "ttl": self.ttl,
            }
        )
        parts = [b"EVALSHA", self._sha, str(len(script_keys)).encode()]
        parts += [str(value).encode() for value in (*script_keys, *args)]
        before, _, after = command(*parts).partition(bulk(b"$FRAME$"))
        self._commands[conversation] = (before, after)
        return before, after

    def write(self) -> None:
        if self._buffer and self._writer is not None:
            self._writer.write(b"".join(self._buffer))
            self._buffer.clear()

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until every queued append has been answered."""
        self.write()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self._pending and self._task is not None and not self._task.done():
                    await asyncio.sleep(0.01)

    async def _read_replies(self) -> None:
        reader = self._reader
        assert reader is not None
        pending = self._pending
        heads = self.heads
        while True:
            line = await reader.readline()
            if not line:
                return
            conversation = pending.popleft() if pending else ""
            if line.startswith(b":"):
                seq = int(line[1:])
                if seq < 0:
                    self.errors += 1
                    self.last_error = "conversation not loaded in Redis"
                elif seq > heads.get(conversation, 0):
                    heads[conversation] = seq
            else:
                self.errors += 1
                self.last_error = line.decode(errors="replace").strip()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
