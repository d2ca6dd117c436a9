"""A socket's bounded send buffer.

Frames wait here while the socket's writer is busy. Once more than `merge_after` bytes wait
(the client lags), a `token` frame that continues the last queued one (same message, next seq)
is merged into it, text joined, instead of queued: nothing is dropped and the backlog grows by
the text alone. The bound is on bytes: a client that still falls `limit` behind must be closed
with 1013 (it can rejoin with `after` and lose nothing), so one slow reader can neither grow
memory without bound nor hold up the fan-out to everybody else.
"""

from __future__ import annotations

from collections import deque
from typing import Final

import msgspec

from protocol.frames import Token, encode, splice_seq

TOKEN_MARK: Final = '"type":"token"'
_token_decoder: Final = msgspec.json.Decoder(Token)


class Outbox:
    __slots__ = ("_frames", "_last_token", "limit", "merge_after", "merged", "size")

    def __init__(self, limit: int, merge_after: int = 65_536) -> None:
        self.limit = limit
        self.merge_after = merge_after
        self.size = 0
        self.merged = 0
        self._frames: deque[str] | None = None  # made on first use: most sockets never queue
        self._last_token: Token | None = None

    def push(self, frame: str) -> bool:
        """Queue a frame; False when the bound is passed and the socket must be closed."""
        if self.size >= self.merge_after and TOKEN_MARK in frame[:40] and self._merge(frame):
            return self.size <= self.limit
        if self._frames is None:
            self._frames = deque()
        self._frames.append(frame)
        self.size += len(frame)
        self._last_token = None
        return self.size <= self.limit

    def _merge(self, frame: str) -> bool:
        last = self._last_token or self._decode_last()
        if last is None or not self._frames:
            return False
        token = _token_decoder.decode(frame)
        if token.message_id != last.message_id or token.seq != last.seq + 1:
            return False
        merged = Token(
            conversation=last.conversation,
            message_id=last.message_id,
            text=last.text + token.text,
            first_seq=last.first_seq or last.seq,
        )
        encoded = splice_seq(encode(merged), token.seq).decode()
        self.size += len(encoded) - len(self._frames[-1])
        self._frames[-1] = encoded
        self._last_token = msgspec.structs.replace(merged, seq=token.seq)
        self.merged += 1
        return True

    def _decode_last(self) -> Token | None:
        if not self._frames or TOKEN_MARK not in self._frames[-1][:40]:
            return None
        return _token_decoder.decode(self._frames[-1])

    def drain(self) -> list[str]:
        frames = list(self._frames or ())
        self._frames = None
        self.size = 0
        self._last_token = None
        return frames

    def __len__(self) -> int:
        return len(self._frames or ())

    def __bool__(self) -> bool:
        return bool(self._frames)
