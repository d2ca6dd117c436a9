"""Server-Sent Events: a conversation's events (and a user's) where a WebSocket cannot go, on
the same web processes and with the same token.

A stream is a `Watch` (`server.edge.watch`) like a socket's join: the same bus subscription,
the same cursor and catch-up from the event log, the same `joined {reset: true}` with the full
history when the log no longer has what the client misses. The watch pushes to a `Stream`
(the watch's `Sink`), which keeps the frames in a bounded `Outbox` until the response's
generator writes them as SSE; a client reading slower than the bound ends the stream (it
resumes with `Last-Event-ID`). A silent stream gets a comment line every
`server.sse_heartbeat`; every response ends after `server.sse_max_lifetime`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from litestar.exceptions import HTTPException

from protocol import frames as f
from protocol import sse, wsframe
from protocol.outbox import Outbox
from protocol.session import CloseCode
from server.edge.watch import Watch
from server.redis import keys

if TYPE_CHECKING:
    from server.edge.hub import Hub

log = logging.getLogger("parley.sse")

RETRY_MS: Final = 1000
"""How long an `EventSource` waits before reconnecting after the server ended a response."""

Render = Callable[[bytes], list[bytes]]
"""A WebSocket frame (as the watch pushes it) to the bytes the response writes."""


RENDERED_MAX: Final = 4096
RENDERED_BYTES: Final = 4096
_rendered: dict[bytes, bytes] = {}
"""A published event reaches every stream as the same framed bytes object (`Bus`): rendered
once, not once per stream. Keyed by the frame (bytes cache their hash); only frames of up to
`RENDERED_BYTES` (a `joined` with its history is one stream's alone), emptied past
`RENDERED_MAX` entries: at most 32 MiB."""


def as_event(frame: bytes) -> list[bytes]:
    if len(frame) > RENDERED_BYTES:
        return [sse.event(wsframe.payload_of(frame))]
    event = _rendered.get(frame)
    if event is None:
        if len(_rendered) >= RENDERED_MAX:
            _rendered.clear()
        event = _rendered[frame] = sse.event(wsframe.payload_of(frame))
    return [event]


class Stream:
    """One SSE response's end of a watch: what a socket is to the watch (`Sink`)."""

    __slots__ = ("ended", "on_overflow", "outbox", "overflowed", "wake")

    def __init__(self, limit: int) -> None:
        self.outbox = Outbox(limit, merge_after=min(65_536, limit // 4))
        self.wake = asyncio.Event()
        self.ended = False
        self.overflowed = False
        self.on_overflow: Callable[[], None] = lambda: None
        """Gives back what the stream holds at once: its response may stay blocked in a
        write to a client that stopped reading until that client goes."""

    def push(self, frame: bytes) -> None:
        if self.ended:
            return
        if not self.outbox.push(frame):
            self.overflowed = True
            self.outbox.drain()
            self.ended = True
            self.on_overflow()
        self.wake.set()

    def push_frame(self, frame: f.ServerFrame) -> None:
        self.push(wsframe.text(f.encode(frame)))

    def close(self, code: CloseCode, reason: str) -> None:
        """End the response once what waits is written (all of it: the client resumes)."""
        self.ended = True
        self.wake.set()


@dataclass(frozen=True, slots=True)
class Timing:
    heartbeat: float
    lifetime: float


async def write(
    stream: Stream,
    render: Render,
    timing: Timing,
    done: Callable[[], bool] = lambda: False,
) -> AsyncGenerator[bytes, None]:
    """What the stream gets, rendered, until it ends, overflows, reaches its lifetime or
    `done` says the client has all it asked for; heartbeats while silent."""
    deadline = time.monotonic() + timing.lifetime
    yield sse.retry(RETRY_MS)
    while not stream.overflowed:
        out = b"".join(piece for frame in stream.outbox.drain() for piece in render(frame))
        if out:
            yield out
        if stream.ended or done():
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        stream.wake.clear()
        if not stream.outbox:
            try:
                async with asyncio.timeout(min(timing.heartbeat, remaining)):
                    await stream.wake.wait()
            except TimeoutError:
                if deadline - time.monotonic() > 0:
                    yield sse.HEARTBEAT


class Body:
    """A response body that gives back what its stream holds (the watch's subscription, the
    user's place in the per-user count) however the response ends: at its end, when the
    client goes (Litestar cancels the iteration), when closed, and when dropped unread."""

    __slots__ = ("_gen", "_release", "released")

    def __init__(
        self, stream: Stream, gen: AsyncGenerator[bytes, None], release: Callable[[], None]
    ) -> None:
        self._gen = gen
        self._release = release
        self.released = False
        stream.on_overflow = self.release

    def __aiter__(self) -> Body:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._gen.__anext__()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._release()

    async def aclose(self) -> None:
        try:
            await self._gen.aclose()
        finally:
            self.release()

    def __del__(self) -> None:
        """A body Litestar never iterated (its client went first): give back now. Without a
        running loop (the process is ending) there is nothing left to give back to."""
        if not self.released:
            with contextlib.suppress(RuntimeError):
                self.release()


class Opening:
    """Opens watches for streams: admits the user (the per-user count is shared with
    sockets), subscribes and joins, and gives everything back when the response ends."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        settings = hub.settings.server
        self.timing = Timing(settings.sse_heartbeat, settings.sse_max_lifetime)
        self.limit = hub.settings.limits.outbox_bytes

    async def admit(self, user: str) -> Stream:
        stream = Stream(self.limit)
        await self._count(user, stream)
        return stream

    async def _count(self, user: str, stream: Stream) -> None:
        """Count the stream in the user's open sockets and streams (429 past the limit)."""
        if not await self.hub.presence.admit(user):
            raise HTTPException(status_code=429, detail="too many connections for this user")
        self.hub.streams.add(stream)

    def _leave(self, user: str, stream: Stream) -> None:
        self.hub.streams.discard(stream)
        self.hub.presence.leave(user)

    async def conversation(
        self,
        user: str,
        conversation: uuid.UUID,
        after: int | None,
        render: Render = as_event,
        done: Callable[[], bool] = lambda: False,
    ) -> Body:
        """A response body following `conversation` after `after` (or from its history).
        The stream is counted only once its join is answered: the join's one Redis read
        checks the ownership, so a refused stream is never counted, and what the join
        sends waits in the stream meanwhile."""
        hub = self.hub
        stream = Stream(self.limit)
        watch = Watch(stream, conversation, hub.conversations, user, hub.spawn)
        channel = keys.channel(conversation)
        counted = False

        def release() -> None:
            watch.active = False
            hub.bus.unsubscribe(channel, watch)
            if counted:
                self._leave(user, stream)

        try:
            await hub.bus.subscribe(channel, watch)
            await watch.join(after, None)
            await self._count(user, stream)
            counted = True
        except BaseException:
            release()
            raise
        return Body(stream, write(stream, render, self.timing, done), release)

    async def user_events(self, user: str) -> Body:
        """A response body with the user's `conversation_changed` events."""
        hub = self.hub
        stream = await self.admit(user)
        hub.watch_user(user, stream)

        def release() -> None:
            hub.unwatch_user(user, stream)
            self._leave(user, stream)

        return Body(stream, write(stream, as_event, self.timing), release)
