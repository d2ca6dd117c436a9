"""Token budget windows: which bucket a turn's tokens count in, which buckets a window
covers, and when the budget resets. Pure: the caller passes the time (tests inject it).

A user's spending is kept in buckets named by their start (Unix seconds, UTC). A fixed
window (`day`, `week` from Monday, `month`) is one bucket; `rolling24h` is 24 hourly buckets,
the current hour's and the 23 before it, so the budget frees up an hour at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

Window = Literal["day", "week", "month", "rolling24h"]

HOUR = 3600
ROLLING_BUCKETS = 24


def _hour(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _day(now: datetime) -> datetime:
    return _hour(now).replace(hour=0)


def _fixed_start(now: datetime, window: Window) -> datetime:
    day = _day(now)
    if window == "week":
        return day - timedelta(days=day.weekday())
    if window == "month":
        return day.replace(day=1)
    return day


def _fixed_end(start: datetime, window: Window) -> datetime:
    if window == "week":
        return start + timedelta(days=7)
    if window == "month":
        return (start + timedelta(days=32)).replace(day=1)
    return start + timedelta(days=1)


def bucket(now: datetime, window: Window) -> int:
    """The bucket the tokens of a turn accepted at `now` count in."""
    if window == "rolling24h":
        return int(_hour(now).timestamp())
    return int(_fixed_start(now, window).timestamp())


def oldest(now: datetime, window: Window) -> int:
    """The first bucket the window at `now` covers (older ones no longer count)."""
    if window == "rolling24h":
        return bucket(now, window) - (ROLLING_BUCKETS - 1) * HOUR
    return bucket(now, window)


def span(now: datetime, window: Window) -> tuple[datetime, datetime]:
    """The window at `now` as [from, to): what the ledger is summed over to rebuild it."""
    start = datetime.fromtimestamp(oldest(now, window), UTC)
    if window == "rolling24h":
        return start, _hour(now) + timedelta(hours=1)
    return start, _fixed_end(start, window)


def resets_at(now: datetime, window: Window, spent_buckets: list[int]) -> datetime:
    """When spending next goes down: a fixed window's end; for `rolling24h`, the hour the
    oldest bucket with spending in it drops out (the next hour if none has)."""
    if window != "rolling24h":
        return span(now, window)[1]
    first = oldest(now, window)
    live = [b for b in spent_buckets if b >= first]
    drops = (min(live) if live else bucket(now, window)) + ROLLING_BUCKETS * HOUR
    return datetime.fromtimestamp(drops, UTC)


def ttl(window: Window) -> int:
    """How long a user's cached budget outlives its last change in Redis (seconds)."""
    return {"day": 2, "week": 8, "month": 32, "rolling24h": 2}[window] * 24 * HOUR


@dataclass(frozen=True, slots=True)
class State:
    """A user's budget now: `limit` 0 is unlimited."""

    limit: int
    used: int
    resets_at: datetime

    @property
    def remaining(self) -> int | None:
        return None if self.limit <= 0 else max(self.limit - self.used, 0)
