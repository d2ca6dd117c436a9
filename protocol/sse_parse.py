"""The `data` of server-sent events, cut from the blocks of bytes a response body arrives in.

Read as the `openai` client's SSE decoder reads a stream (lines end in LF, CRLF or CR; an
event's `data:` lines are joined by LF; other fields and comments are skipped; `[DONE]` ends
it), with no line or event longer than a limit. Pure: the caller reads the blocks. A block
that is exactly one whole one-line `data: ` event, as a model streams them, is taken without
splitting it into lines (0.93 against 1.12 µs a block, docs/benchmarks.md); any other goes
through the line reader.
"""

from __future__ import annotations

from typing import Final

_ENDINGS: Final = (b"\n", b"\r")
_CR: Final = 13


class Oversized(ValueError):
    """A line or an event longer than the limit: a broken or hostile server."""


class Events:
    """Feed it the body's blocks in order; each `feed` returns the `data` of the events the
    block completed. After `[DONE]` (`done`), the rest of the body is not read."""

    __slots__ = ("_after_cr", "_data", "_pending", "_size", "done", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.done = False
        self._pending = b""
        """The start of a line whose end has not arrived."""
        self._data: list[bytes] = []
        """The `data:` lines of the event being read."""
        self._size = 0
        self._after_cr = False
        """The last block ended in CR: an LF opening the next ends the same line."""

    def feed(self, block: bytes) -> list[bytes]:
        if self.done:
            return []
        if (  # the rule, as a model streams: a block that is one whole one-line event
            block.startswith(b"data: ")
            and block.find(b"\n") == len(block) - 2
            and block.endswith(b"\n\n")
            and not (self._pending or self._data or self._after_cr)
            and _CR not in block  # (a byte's value: 30 ns; the bytes b"\r", 200)
        ):
            value = block[6:-2]
            if value.startswith(b"[DONE]"):
                self.done = True
                return []
            if len(value) <= self.limit:
                return [value]
        if self._after_cr:
            self._after_cr = False
            if block.startswith(b"\n"):
                block = block[1:]
        if self._pending:
            block = self._pending + block
            self._pending = b""
        lines = block.splitlines()
        self._after_cr = block.endswith(b"\r")
        if lines and not block.endswith(_ENDINGS):
            self._pending = lines.pop()
            if len(self._pending) > self.limit:
                raise Oversized("the model sent a line longer than the limit")
        out: list[bytes] = []
        for line in lines:
            if not line:
                if self._data:
                    data, self._data, self._size = self._data, [], 0
                    out.append(data[0] if len(data) == 1 else b"\n".join(data))
            elif line.startswith(b"data:"):
                value = line[6:] if line.startswith(b"data: ") else line[5:]
                if not self._data and value.startswith(b"[DONE]"):
                    self.done = True
                    break
                self._size += len(value)
                if self._size > self.limit:
                    raise Oversized("the model sent an event longer than the limit")
                self._data.append(value)
        return out

    def end(self) -> bytes | None:
        """The body ended: the `data` of an event it left without its blank line, if any."""
        if self.done or not self._data:
            return None
        data, self._data = self._data, []
        return data[0] if len(data) == 1 else b"\n".join(data)
