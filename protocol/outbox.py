"""A socket's bounded send buffer.

Frames wait here while the socket's writer is busy. Once more than `merge_after` bytes wait
(the client lags), a `token` frame that continues the last queued one (same message, next seq)
is merged into it instead of queued: nothing is dropped and the backlog grows by the text
alone. The merged frame is encoded once, when the writer takes it. The bound is on bytes: a
client that still falls `limit` behind must be closed with 1013 (it can rejoin with `after`
and lose nothing), so one slow reader can neither grow memory without bound nor hold up the
fan-out to everybody else.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Final

import msgspec

from protocol.frames import Token, encode, splice_seq

TOKEN_MARK: Final = '"type":"token"'
_token_decoder: Final = msgspec.json.Decoder(Token)


@dataclass(slots=True)
class _Merged:
    """Consecutive pieces of one message, standing in for the last queued frame."""

    first: Token
    seq: int
    texts: list[str] = field(default_factory=list)

    def frame(self) -> str:
        merged = msgspec.structs.replace(
            self.first, text="".join(self.texts), first_seq=self.first.seq, seq=0
        )
        return splice_seq(encode(merged), self.seq).decode()


class Outbox:
    __slots__ = ("_frames", "_merging", "limit", "merge_after", "merged", "size")

    def __init__(self, limit: int, merge_after: int = 65_536) -> None:
        self.limit = limit
        self.merge_after = merge_after
        self.size = 0
        self.merged = 0
        self._frames: deque[str] | None = None  # made on first use: most sockets never queue
        self._merging: _Merged | None = None

    def push(self, frame: str) -> bool:
        """Queue a frame; False when the bound is passed and the socket must be closed."""
        if self.size >= self.merge_after and TOKEN_MARK in frame[:40]:
            self._merge(frame)
        else:
            self._append(frame)
        return self.size <= self.limit

    def _append(self, frame: str) -> None:
        self._settle()
        if self._frames is None:
            self._frames = deque()
        self._frames.append(frame)
        self.size += len(frame)

    def _merge(self, frame: str) -> None:
        token = _token_decoder.decode(frame)
        merging = self._merging
        if merging is None or merging.first.message_id != token.message_id:
            merging = self._start_merge()
        if (
            merging is None
            or merging.first.message_id != token.message_id
            or token.seq != merging.seq + 1
        ):
            self._append(frame)
            return
        merging.texts.append(token.text)
        merging.seq = token.seq
        self.size += len(token.text)
        self.merged += 1

    def _start_merge(self) -> _Merged | None:
        """Take the last queued frame as the start of a merge, if it is a token."""
        self._settle()
        if not self._frames or TOKEN_MARK not in self._frames[-1][:40]:
            return None
        last = _token_decoder.decode(self._frames[-1])
        self._merging = _Merged(last, last.seq, [last.text])
        return self._merging

    def _settle(self) -> None:
        if self._merging is not None and self._frames and len(self._merging.texts) > 1:
            self._frames[-1] = self._merging.frame()
        self._merging = None

    def drain(self) -> list[str]:
        self._settle()
        frames = list(self._frames or ())
        self._frames = None
        self.size = 0
        return frames

    def __len__(self) -> int:
        return len(self._frames or ())

    def __bool__(self) -> bool:
        return bool(self._frames)
