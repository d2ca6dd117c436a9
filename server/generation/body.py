"""An aiohttp response's body pushed to a callback as the connection receives it.

While a body is pushed, the blocks the connection parses go to a callback where they arrive
(in the protocol's `data_received`), not into the buffer, so the task reading the body
sleeps until the callback asks for it, or the body ends or fails: no wake-up and no read per
block (`StreamReader.readany` costs ≈ 5 µs a read, docs/benchmarks.md). It swaps the
reader's class for a subclass whose `feed_data`, `feed_eof`, `set_exception` and
`end_http_chunk_receiving` (the methods aiohttp's HTTP parser and protocol call) push
instead, and back when it is done; only where those are the ones it knows (`KNOWN`):
elsewhere the body is read with `readany`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final

from aiohttp import StreamReader
from aiohttp.base_protocol import BaseProtocol

_READER_FIELDS: Final = ("_buffer", "_buffer_offset", "_protocol", "_size", "_waiter")

_FED_BY: Final = ("feed_data", "feed_eof", "set_exception", "end_http_chunk_receiving")
"""The methods through which aiohttp's parser and protocol hand a body to its reader."""


class _PushedReader(StreamReader):
    """A StreamReader whose body goes to its `Pushed` as it arrives, not into its buffer (the
    same fields: its class is swapped in and out on a live reader)."""

    __slots__ = ()

    def feed_data(self, data: bytes, size: int = 0) -> bool:
        push = _PUSHED[id(self)]
        if data and not push.ended:
            try:
                wake = push.feed(data)
            except Exception as exc:
                push.fail(exc)
            else:
                if wake:
                    push.wake()
        return False  # nothing kept to parse further

    def feed_eof(self) -> None:
        StreamReader.feed_eof(self)  # the response's end callbacks (the connection released)
        _PUSHED[id(self)].end()

    def set_exception(self, exc: BaseException, *args: Any, **kwargs: Any) -> None:
        StreamReader.set_exception(self, exc, *args, **kwargs)
        _PUSHED[id(self)].fail(exc)

    def end_http_chunk_receiving(self) -> None:
        """Chunk ends are for `readchunk`, which a pushed body never serves."""


_PUSHED: dict[int, Pushed] = {}
"""The bodies being pushed, by their reader's id (a reader is in it only while its class is
_PushedReader, so an id is never stale)."""


def _swappable() -> bool:
    """Whether a StreamReader's class can be swapped for _PushedReader (same layout)."""
    try:
        reader = StreamReader.__new__(StreamReader)
        reader.__class__ = _PushedReader
    except TypeError:
        return False
    return True


KNOWN: Final = (
    all(name in StreamReader.__slots__ for name in _READER_FIELDS)
    and "_reading_paused" in BaseProtocol.__slots__
    and all(callable(getattr(StreamReader, name, None)) for name in _FED_BY)
    and _swappable()
)
"""StreamReader and its protocol have the fields and methods `pushed` uses."""


def pushed(content: StreamReader, feed: Callable[[bytes], bool]) -> Pushed | None:
    """Push the rest of `content` to `feed` as it arrives (None where that cannot be done:
    read it then). `feed` is called with each block in order, the blocks already buffered
    first, in the connection's callback: it must not block, and what it raises ends the push
    (raised from `Pushed.wait`). It returns True to wake the task waiting in `wait`. Call
    `Pushed.stop` when done (in a `finally`)."""
    if not KNOWN or type(content) is not StreamReader or content._waiter is not None:
        return None
    return Pushed(content, feed)


class Pushed:
    """A body being pushed to a callback (`pushed`)."""

    __slots__ = ("_content", "_error", "_paused", "_waiter", "_woken", "ended", "feed")

    def __init__(self, content: StreamReader, feed: Callable[[bytes], bool]) -> None:
        self._content: Any = content  # its private fields are not typed for use outside
        self.feed = feed
        """Called by the reader (_PushedReader.feed_data) with each block."""
        self._waiter: asyncio.Future[None] | None = None
        self._woken = self._paused = False
        self._error: BaseException | None = None
        self.ended = False
        """The body ended (its end or an error), or its feed raised."""
        _PUSHED[id(content)] = self
        content.__class__ = _PushedReader
        buffered = list(self._content._buffer)  # arrived with the head, or before this
        if self._content._buffer_offset:
            buffered[0] = buffered[0][self._content._buffer_offset :]
        self._content._buffer.clear()
        self._content._buffer_offset = self._content._size = 0
        for block in buffered:
            content.feed_data(block)
        if (error := content.exception()) is not None:
            self.fail(error)
        elif content.is_eof():
            self.end()
        elif self._content._protocol._reading_paused:
            self._content._protocol.resume_reading()  # its buffer is empty now

    def end(self) -> None:
        self.ended = True
        self.wake()

    def fail(self, error: BaseException) -> None:
        if not self.ended:
            self._error = error
        self.end()

    def wake(self) -> None:
        """Wake the task in `wait` (or let its next `wait` return at once)."""
        waiter = self._waiter
        if waiter is None:
            self._woken = True
        elif not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until a feed asks for it, or the body ends; its error (or the feed's) raised."""
        if not self._woken and not self.ended:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self._woken = False
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def pause(self) -> None:
        """Stop reading the connection (its bytes wait in the kernel) until `resume`."""
        if not self._paused and not self.ended:
            self._paused = True
            self._content._protocol.pause_reading()

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            self._content._protocol.resume_reading()

    def stop(self) -> None:
        """The reader back as it was: what arrives from now on is buffered, as by aiohttp."""
        if _PUSHED.pop(id(self._content), None) is self:
            self._content.__class__ = StreamReader
        self.resume()
        self.ended = True
