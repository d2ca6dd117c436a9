"""The fair queue's decisions: which waiting users get the free generation slots, and where
each waiting turn stands.

Users take turns round-robin in the order of the ring (the user who was served longest ago
first): each pass gives every waiting user below their cap on running generations one slot,
so a user with fifty turns waiting cannot starve one with a single turn. Pure: Redis holds
the ring, the queues and the counts (server/redis/queue.py), these functions only decide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Waiting:
    """A user in the ring: how many of their turns wait, how many of theirs run."""

    user: str
    queued: int
    running: int


def pick(ring: Sequence[Waiting], free: int, per_user: int) -> list[str]:
    """The users to start a turn for, in order, one per free slot at most: round-robin over
    `ring`, skipping a user with nothing queued or at `per_user` running (0: no cap)."""
    queued = [w.queued for w in ring]
    running = [w.running for w in ring]
    chosen: list[str] = []
    while len(chosen) < free:
        progressed = False
        for i, waiting in enumerate(ring):
            if len(chosen) >= free:
                break
            if queued[i] <= 0 or (per_user and running[i] >= per_user):
                continue
            chosen.append(waiting.user)
            queued[i] -= 1
            running[i] += 1
            progressed = True
        if not progressed:
            break
    return chosen


def positions(ring: Sequence[Waiting]) -> dict[str, list[int]]:
    """Each user's waiting turns' places in the round-robin order (0: the next to start),
    oldest turn first. The k-th turn of a user comes after every user's first k turns and
    after the k-th turn of each user ahead in the ring who has that many."""
    places: dict[str, list[int]] = {}
    for index, waiting in enumerate(ring):
        places[waiting.user] = [
            sum(min(other.queued, k) for other in ring)
            + sum(1 for other in ring[:index] if other.queued > k)
            for k in range(waiting.queued)
        ]
    return places


TOLD_EVERY_MS: Final = 1000
"""A waiting turn's tabs hear a new position at most this often, except position 0."""


@dataclass(frozen=True, slots=True)
class Told:
    """The position a waiting turn's tabs last heard (-1: none yet) and when (ms)."""

    position: int
    at_ms: int


def told(value: str | None) -> Told | None:
    """A `told` entry as the fair queue keeps it (`position:ms`); None for no entry (the turn
    no longer waits) or one that does not read as such."""
    position, _, at_ms = (value or "").partition(":")
    try:
        return Told(int(position), int(at_ms))
    except ValueError:
        return None


def due(last: Told | None, position: int, now_ms: int) -> bool:
    """Whether a waiting turn's tabs are to hear `position` now: not once the turn stopped
    waiting (`last` None), never the same position twice in a row, and at most once every
    `TOLD_EVERY_MS`, except position 0 (next to start), told at once so that the tabs of a
    turn that starts within the second saw it (server/redis/scripts/announce.lua applies the
    same rule atomically)."""
    if last is None or last.position == position:
        return False
    return position == 0 or now_ms - last.at_ms >= TOLD_EVERY_MS
