"""A socket's bounded send buffer.

Frames wait here while the socket's writer is busy. The bound is on bytes, not frames: a
client that reads too slowly fills it and must be closed with 1013 (it can rejoin with
`after` and lose nothing), so one slow reader can neither grow memory without bound nor hold
up the fan-out to everybody else.
"""

from __future__ import annotations

from collections import deque


class Outbox:
    __slots__ = ("_frames", "limit", "size")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._frames: deque[str] = deque()

    def push(self, frame: str) -> bool:
        """Queue a frame; False when the bound is passed and the socket must be closed."""
        self._frames.append(frame)
        self.size += len(frame)
        return self.size <= self.limit

    def drain(self) -> list[str]:
        frames = list(self._frames)
        self._frames.clear()
        self.size = 0
        return frames

    def __len__(self) -> int:
        return len(self._frames)

    def __bool__(self) -> bool:
        return bool(self._frames)
