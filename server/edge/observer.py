"""The web process's bus `wrap`: frames each published event once for the sockets
(`protocol.wsframe.text`) and, on the way, measures what only the fan-out can see.

- Tab-observed time to first token: a `start` event carries `accepted_at`, when the web
  process that took the `say` accepted it (any web process: it travels with the job); the
  first `token` of that message reaching this process's sockets ends the interval. Each web
  process with a socket watching the conversation observes it once per generation.
- The `write` stage of Parley's time to first token (`parley_first_token_stage_seconds`):
  from that first token's arrival here to the sockets' write — what the web process itself
  adds before the tab's socket. A first token is flushed as soon as the bus has handed it to
  its sockets (`dispatched`), not after everything else the same read brought: the one
  write per socket per read is kept for the other events. No sample when no socket had
  anything to write (the token's only listeners were SSE streams).
- Delivery lag: a `message` event carries its `created_at`, stamped just before the say
  script appends and publishes it; its arrival here ends the interval. Token events carry no
  stamp (it would cost bytes on every token to every tab), so the lag is sampled per turn.

Wall clocks of different machines differ: keep them in sync (NTP) or read these as upper
bounds. Per event the cost is one bounded `bytes.find` and an integer addition; the JSON is
decoded only for `start` and `message` events, once per turn.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

import msgspec

from protocol import frames as f
from protocol import wsframe
from server.app import metrics

_WITHIN: Final = 48
"""`{"seq":N,` and the tag, which msgspec writes first."""
_TOKEN: Final = b'"type":"token"'
_START: Final = b'"type":"start"'
_MESSAGE: Final = b'"type":"message"'
_DONE: Final = b'"type":"done"'
_MESSAGE_ID: Final = b'"message_id":"'
_UUID_CHARS: Final = 36
MAX_WAITING: Final = 10_000
"""Generations awaiting their first token here; beyond it the oldest are forgotten."""

_start_decoder: Final = msgspec.json.Decoder(f.Start)
_message_decoder: Final = msgspec.json.Decoder(f.MessageEvent)


class Observer:
    __slots__ = ("_arrived", "_waiting", "flush")

    def __init__(self) -> None:
        self.flush: Callable[[], bool] | None = None
        """Write every socket's queued frames now (the hub's flush); whether any had some."""
        self._waiting: dict[bytes, tuple[float, str]] = {}
        """message id → (accepted_at, model label), until its first token."""
        self._arrived: float | None = None
        """When the frame being dispatched, a generation's first token here, arrived."""

    def dispatched(self) -> None:
        """The bus handed the frame to its listeners: a first token is written at once, and
        the time from its arrival to that write is the `write` stage."""
        arrived, self._arrived = self._arrived, None
        if arrived is not None and self.flush is not None and self.flush():
            metrics.FIRST_TOKEN_STAGE.labels("write").observe(time.monotonic() - arrived)

    def frame(self, data: bytes) -> bytes:
        metrics.TALLY.events_received += 1
        if data.find(_TOKEN, 0, _WITHIN) >= 0:
            if self._waiting:
                self._first_token(data)
        elif data.find(_START, 0, _WITHIN) >= 0:
            self._start(data)
        elif data.find(_MESSAGE, 0, _WITHIN) >= 0:
            self._message(data)
        elif self._waiting and data.find(_DONE, 0, _WITHIN) >= 0:
            self._waiting.pop(_message_id(data), None)  # ended before any token
        return wsframe.text(data)

    def _start(self, data: bytes) -> None:
        try:
            start = _start_decoder.decode(data)
        except msgspec.DecodeError:
            return
        if start.accepted_at is None:
            return
        if len(self._waiting) >= MAX_WAITING:
            del self._waiting[next(iter(self._waiting))]
        label = metrics.MODELS.label(start.model)
        self._waiting[str(start.message_id).encode()] = (start.accepted_at, label)

    def _first_token(self, data: bytes) -> None:
        waiting = self._waiting.pop(_message_id(data), None)
        if waiting is not None:
            accepted_at, model = waiting
            metrics.TTFT.labels(model).observe(max(time.time() - accepted_at, 0.0))
            self._arrived = time.monotonic()

    @staticmethod
    def _message(data: bytes) -> None:
        try:
            event = _message_decoder.decode(data)
        except msgspec.DecodeError:
            return
        lag = time.time() - event.message.created_at.timestamp()
        metrics.BUS_LAG.observe(max(lag, 0.0))


def _message_id(data: bytes) -> bytes:
    at = data.find(_MESSAGE_ID)
    if at < 0:
        return b""
    at += len(_MESSAGE_ID)
    return data[at : at + _UUID_CHARS]
