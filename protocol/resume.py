"""Exactly-once, in-order delivery of one conversation's events to one socket.

Live frames from pub/sub are hints; the conversation's event log is the truth. A `Cursor`
holds the last seq the socket was sent. While it is catching up (joining, or filling a gap)
live frames wait in a buffer; the I/O layer reads the log after `last_seq` and hands the
events to `catch_up`, which merges them with the buffer by seq, drops what was already sent,
and says whether the socket is now contiguous. A live frame that skips a seq (a lost publish,
a Redis reconnect) starts another catch-up instead of being sent out of order.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class Verdict(enum.Enum):
    SEND = "send"
    DROP = "drop"
    HOLD = "hold"
    GAP = "gap"


class NextStep(enum.Enum):
    """What the socket does after a catch-up."""

    LIVE = "live"
    """Contiguous up to the log's head: the socket now takes live frames directly."""
    AGAIN = "again"
    """A live frame past the head skipped a seq (a lost publish): read the log again."""
    RESET = "reset"
    """The events after `last_seq` are no longer retained: the client needs the full history."""


@dataclass(frozen=True, slots=True)
class CatchUp:
    frames: list[bytes]
    next_step: NextStep


class Cursor:
    """One socket's position in one conversation. `_held` (live frames waiting for a
    catch-up) is None when empty: a cursor exists per joined socket, and a dict that once
    held a replay keeps its table however many entries it still has."""

    __slots__ = ("_held", "catching_up", "last_seq")

    def __init__(self) -> None:
        self.last_seq = -1
        self.catching_up = True
        self._held: dict[int, bytes] | None = None

    def live(self, seq: int, frame: bytes) -> Verdict:
        if seq <= self.last_seq:
            return Verdict.DROP
        if self.catching_up:
            self._hold(seq, frame)
            return Verdict.HOLD
        if seq == self.last_seq + 1:
            self.last_seq = seq
            return Verdict.SEND
        self.catching_up = True
        self._hold(seq, frame)
        return Verdict.GAP

    def _hold(self, seq: int, frame: bytes) -> None:
        if self._held is None:
            self._held = {}
        self._held[seq] = frame

    def start_at(self, seq: int) -> None:
        """The client holds everything up to `seq` (its `after`, or the history sent)."""
        self.last_seq = seq
        self.catching_up = True

    def catch_up(self, logged: Iterable[tuple[int, bytes]], head: int) -> CatchUp:
        """Merge events read from the log with the held live frames.

        `head` is the last seq assigned when the log was read (read atomically with it).
        """
        if self.last_seq > head:
            return CatchUp([], NextStep.RESET)  # the client is ahead of a log that lost data
        held = self._held or {}
        pending = {s: fr for s, fr in held.items() if s > self.last_seq}
        pending.update((seq, frame) for seq, frame in logged if seq > self.last_seq)
        frames: list[bytes] = []
        seq = self.last_seq + 1
        while seq in pending:
            frames.append(pending.pop(seq))
            seq += 1
        self.last_seq = seq - 1
        self._held = pending or None
        if self.last_seq < head:
            next_step = NextStep.RESET
        elif pending:
            next_step = NextStep.AGAIN
        else:
            next_step = NextStep.LIVE
        self.catching_up = next_step is not NextStep.LIVE
        return CatchUp(frames, next_step)

    def reset(self) -> None:
        self._held = None
        self.last_seq = -1
        self.catching_up = True


def resume_point(logged: Sequence[tuple[int, bytes]], start: int, head: int) -> int:
    """The seq after which a socket sent the persisted history up to `start` follows the
    log (`logged`: the events read after `start`, in order; `head`: the last seq assigned).

    That is `start` while the log holds every event from there to `head`. When it does not,
    Redis lost events that PostgreSQL never got (a restart with an empty database, a
    failover to a replica that lacked them, or the seqs a worker's acknowledged floor skipped:
    server/redis/scripts/lib_seq_floor.lua); nothing can give them again, and the worker
    publishes its running turn again past them. The socket then follows from just before the
    events the log still holds without a gap up to `head` (`head` itself when it holds none),
    rather than wait for seqs that will never come."""
    seq = head
    for logged_seq, _ in reversed(logged):
        if logged_seq != seq:
            break
        seq -= 1
    return max(start, seq)
