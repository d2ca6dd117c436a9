"""An aiohttp response's body read a block at a time, for less than `readany` costs.

`StreamReader.readany` ends every read by asking the connection to resume reading, even when
it never paused, and that runs the HTTP parser again on no bytes (`data_received(b"")`): with
its other layers, ≈ 4 µs of the ≈ 5 a read costs, once per chunk of a model's stream
(docs/benchmarks.md), and once per block buffered when the reader is late. `quick_reader`
takes the buffered blocks itself when the connection is not paused, with the stream's
accounting kept as `readany` keeps it, and leaves every other case (a block partly read, a
paused connection, an error, the end) to `readany`. It reads StreamReader's private
fields, so it is used only where they are the ones it knows (`KNOWN`); elsewhere `readany`
is all.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import StreamReader
from aiohttp.base_protocol import BaseProtocol

_READER_FIELDS: Final = (
    "_buffer",
    "_buffer_offset",
    "_cursor",
    "_eof",
    "_exception",
    "_http_chunk_splits",
    "_protocol",
    "_size",
    "_timer",
)

KNOWN: Final = (
    all(name in StreamReader.__slots__ for name in _READER_FIELDS)
    and "_reading_paused" in BaseProtocol.__slots__
    and callable(getattr(StreamReader, "_wait", None))
)
"""StreamReader and its protocol have the fields `quick_reader` reads."""


def quick_reader(content: StreamReader) -> Callable[[], Awaitable[bytes]]:
    """Read the next block of `content` (b"" at its end), as `content.readany` does."""
    if not KNOWN or type(content) is not StreamReader:
        return content.readany
    return _QuickReader(content).read


class _QuickReader:
    __slots__ = ("_content",)

    def __init__(self, content: StreamReader) -> None:
        self._content: Any = content  # its private fields are not typed for use outside

    async def read(self) -> bytes:
        content = self._content
        buffer = content._buffer
        if not buffer and not content._eof and content._exception is None:
            await content._wait("readany")  # woken by data, a chunk's end, the end or an error
        if (
            not buffer
            or content._buffer_offset
            or content._exception is not None
            or content._protocol._reading_paused
        ):
            return await content.readany()  # type: ignore[no-any-return]
        content._timer.assert_timeout()
        if len(buffer) == 1:
            block: bytes = buffer.popleft()
        else:  # a reader late by several blocks takes them at once
            block = b"".join(buffer)
            buffer.clear()
        content._size -= len(block)
        cursor = content._cursor = content._cursor + len(block)
        splits = content._http_chunk_splits
        while splits and splits[0] < cursor:  # the chunk ends read past, as readany drops them
            splits.popleft()
        return block
