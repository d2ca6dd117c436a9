"""A socket's bounded send buffer.

Frames wait here while the socket's transport is paused (the client reads slower than
events arrive). Once more than `merge_after` bytes wait (the client lags), a `token` or
`part_delta` frame that continues the last queued one (same message and part, next seq) is
merged into it instead of queued: nothing is dropped and the backlog grows by the text
alone. The merged frame is encoded once, when the socket takes it. The bound is on bytes: a
client that still falls `limit` behind must be closed with 1013 (it can rejoin with `after`
and lose nothing), so one slow reader can neither grow memory without bound nor hold up
the fan-out to everybody else.

Frames are whole WebSocket frames (`protocol.wsframe`), the bytes the socket writes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Final

import msgspec

from protocol import wsframe
from protocol.frames import PartDelta, Token, encode, splice_seq

TOKEN_MARK: Final = b'"type":"token"'
DELTA_MARK: Final = b'"type":"part_delta"'
_MARK_WITHIN: Final = 48
"""Frame header (≤ 4 bytes here), `{"seq":N,` and the tag, which msgspec writes first."""
_piece_decoder: Final = msgspec.json.Decoder(Token | PartDelta)

Piece = Token | PartDelta


def _is_piece(frame: bytes) -> bool:
    head = frame[:_MARK_WITHIN]
    return TOKEN_MARK in head or DELTA_MARK in head


def _piece(frame: bytes) -> Piece:
    return _piece_decoder.decode(wsframe.payload_of(frame))


def _continues(piece: Piece, merged: Piece) -> bool:
    """Whether `piece` is more of the same message's same part."""
    if piece.message_id != merged.message_id or type(piece) is not type(merged):
        return False
    return not isinstance(piece, PartDelta) or piece.index == getattr(merged, "index", -1)


@dataclass(slots=True)
class _Merged:
    """Consecutive pieces of one message's part, standing in for the last queued frame."""

    first: Piece
    seq: int
    texts: list[str] = field(default_factory=list)

    def frame(self) -> bytes:
        merged = msgspec.structs.replace(
            self.first, text="".join(self.texts), first_seq=self.first.seq, seq=0
        )
        return wsframe.text(splice_seq(encode(merged), self.seq))


class Outbox:
    __slots__ = ("_frames", "_merging", "limit", "merge_after", "merged", "size")

    def __init__(self, limit: int, merge_after: int = 65_536) -> None:
        self.limit = limit
        self.merge_after = merge_after
        self.size = 0
        self.merged = 0
        self._frames: deque[bytes] | None = None  # made on first use: most sockets never queue
        self._merging: _Merged | None = None

    def push(self, frame: bytes) -> bool:
        """Queue a frame; False when the bound is passed and the socket must be closed."""
        if self.size >= self.merge_after and _is_piece(frame):
            self._merge(frame)
        else:
            self._append(frame)
        return self.size <= self.limit

    def _append(self, frame: bytes) -> None:
        self._settle()
        if self._frames is None:
            self._frames = deque()
        self._frames.append(frame)
        self.size += len(frame)

    def _merge(self, frame: bytes) -> None:
        piece = _piece(frame)
        merging = self._merging
        if merging is None or not _continues(piece, merging.first):
            merging = self._start_merge()
        if merging is None or not _continues(piece, merging.first) or piece.seq != merging.seq + 1:
            self._append(frame)
            return
        merging.texts.append(piece.text)
        merging.seq = piece.seq
        self.size += len(piece.text)
        self.merged += 1

    def _start_merge(self) -> _Merged | None:
        """Take the last queued frame as the start of a merge, if it is a piece."""
        self._settle()
        if not self._frames or not _is_piece(self._frames[-1]):
            return None
        last = _piece(self._frames[-1])
        self._merging = _Merged(last, last.seq, [last.text])
        return self._merging

    def _settle(self) -> None:
        if self._merging is not None and self._frames and len(self._merging.texts) > 1:
            self._frames[-1] = self._merging.frame()
        self._merging = None

    def drain(self) -> list[bytes]:
        self._settle()
        frames = list(self._frames or ())
        self._frames = None
        self.size = 0
        return frames

    def __bool__(self) -> bool:
        return bool(self._frames)
