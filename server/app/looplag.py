"""How late the event loop runs a callback it was asked to run at a given time.

A `loop.call_at` callback re-arms itself every `interval` and observes, in
`parley_event_loop_lag_seconds`, how far past its due time it ran. A lag above the floor
(the poll's millisecond timeout rounding, up to ~1 ms) means something held the loop: a long
synchronous step in this process (a big batch, a garbage collection), or the process waiting
for a CPU while other processes ran. One timer handle per interval, no task: the cost is a
histogram observation a tenth of a second.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from server.app import metrics


class LoopLag:
    """Samples the running loop's lag every `interval` seconds until `stop`."""

    def __init__(
        self, interval: float, observe: Callable[[float], None] = metrics.LOOP_LAG.observe
    ) -> None:
        self.interval = interval
        self._observe = observe
        self._loop: asyncio.AbstractEventLoop | None = None
        self._due = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Arm the first sample on the running loop (nothing at an interval of 0)."""
        if self.interval <= 0 or self._handle is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._arm(self._loop.time())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, now: float) -> None:
        assert self._loop is not None
        self._due = now + self.interval
        self._handle = self._loop.call_at(self._due, self._sample)

    def _sample(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        self._observe(max(0.0, now - self._due))
        self._arm(now)
