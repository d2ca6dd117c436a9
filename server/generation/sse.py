"""The `data` of server-sent events, cut from the blocks of bytes a response body arrives in.

Read as the `openai` client's SSE decoder reads a stream (lines end in LF, CRLF or CR; an
event's `data:` lines are joined by LF; other fields and comments are skipped; `[DONE]` ends
it), with no line or event longer than a limit. Pure: the caller reads the blocks.

A model's stream is almost all single-line events (`data: {...}` then a blank line), one or a
few to a block: those are cut with two `find`s and one slice each, without splitting the
block into lines; anything else (another field, a comment, several `data:` lines, CR line
ends, a line cut between two blocks) goes the general way, line by line.
"""

from __future__ import annotations

from typing import Final

_DATA: Final = b"data: "
_ENDINGS: Final = (b"\n", b"\r")


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
        if self._after_cr:
            self._after_cr = False
            if block.startswith(b"\n"):
                block = block[1:]
        if self._pending:
            block = self._pending + block
            self._pending = b""
        out: list[bytes] = []
        start = 0
        if not self._data:
            start = self._single_lines(block, out)
            if self.done or start == len(block):
                return out
        self._lines(block[start:] if start else block, out)
        return out

    def end(self) -> bytes | None:
        """The body ended: the `data` of an event it left without its blank line, if any."""
        if self.done or not self._data:
            return None
        data, self._data = self._data, []
        return data[0] if len(data) == 1 else b"\n".join(data)

    def _single_lines(self, block: bytes, out: list[bytes]) -> int:
        """Cut the whole single-line events (`data: ` payload LF LF) at the start of `block`
        into `out`; where the rest begins."""
        start = 0
        while block.startswith(_DATA, start):
            end = block.find(b"\n", start)
            if end < 0 or block.find(b"\r", start, end) >= 0 or end + 1 == len(block):
                break  # not a whole LF line, or not known yet whether the event ends here
            if block[end + 1] != 10:  # another line follows: the general way
                break
            value = block[start + 6 : end]
            if value.startswith(b"[DONE]"):
                self.done = True
                return len(block)
            if len(value) > self.limit:
                raise Oversized("the model sent an event longer than the limit")
            out.append(value)
            start = end + 2
        return start

    def _lines(self, block: bytes, out: list[bytes]) -> None:
        lines = block.splitlines()
        self._after_cr = block.endswith(b"\r")
        if lines and not block.endswith(_ENDINGS):
            self._pending = lines.pop()
            if len(self._pending) > self.limit:
                raise Oversized("the model sent a line longer than the limit")
        for line in lines:
            if not line:
                if self._data:
                    data, self._data, self._size = self._data, [], 0
                    out.append(data[0] if len(data) == 1 else b"\n".join(data))
            elif line.startswith(b"data:"):
                value = line[6:] if line.startswith(_DATA) else line[5:]
                if not self._data and value.startswith(b"[DONE]"):
                    self.done = True
                    return
                self._size += len(value)
                if self._size > self.limit:
                    raise Oversized("the model sent an event longer than the limit")
                self._data.append(value)
