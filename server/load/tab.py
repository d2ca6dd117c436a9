"""One tab (a socket joined to one conversation) and one conversation, as the load generator
sees them: every conversation event's `seq` is checked on arrival, latencies are recorded, and a
tab that drops rejoins with `after`."""

from __future__ import annotations

import asyncio
import errno
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import msgspec

from protocol import frames as f
from server.load.wsclient import HandshakeError, WSClient, connect

if TYPE_CHECKING:
    from server.load.workload import Driver

REJOIN_DELAY: Final = 0.05
STAMP: Final = "@"
"""Tokens written by the `publish` workload carry `@<CLOCK_MONOTONIC ns>` as their text."""


# --------------------------------------------------------------------------- frames in


class _Meta(msgspec.Struct):
    last_seq: int = 0


class Incoming(msgspec.Struct):
    """The fields of a server frame the load generator looks at; the rest are skipped."""

    type: str
    seq: int = -1
    ref: str | None = None
    text: str = ""
    message_id: str = ""
    conversation: str = ""
    last_seq: int = -1
    reset: bool = False
    meta: _Meta | None = None
    code: str = ""
    retry_after: float | None = None


_decode = msgspec.json.Decoder(Incoming).decode
_encode = msgspec.json.encode


class RequestFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- one tab


class LoadTab:
    """One socket joined to one conversation, with its seq checks and timings."""

    __slots__ = (
        "_refs",
        "conv",
        "driver",
        "dropping",
        "index",
        "last_seq",
        "last_token_at",
        "lost_here",
        "message_id",
        "rejoin_lost",
        "rejoin_target",
        "rejoining",
        "replay_until",
        "ttft_turn",
        "waiting",
        "ws",
    )

    def __init__(self, driver: Driver, conv: Conv, index: int) -> None:
        self.driver = driver
        self.conv = conv
        self.index = index
        self.ws: WSClient | None = None
        self.waiting: dict[str, asyncio.Future[Incoming]] = {}
        self._refs = 0
        self.last_seq: int | None = None
        self.replay_until = 0
        self.message_id = ""
        self.last_token_at = 0.0
        self.ttft_turn = 0
        self.dropping = False
        self.lost_here = 0
        self.rejoin_target: int | None = None
        self.rejoin_lost = 0
        self.rejoining = False

    @property
    def alive(self) -> bool:
        return self.ws is not None and not self.ws.closed and not self.dropping

    # ------------------------------------------------------------------ connect and request

    async def open(self, again: bool = False) -> bool:
        """Connect and wait for `ready`; count the outcome. True when the tab is usable.
        `again`: a rejoin's reconnection, counted apart from the initial ramp."""
        d = self.driver
        started = time.monotonic()
        token = d.plan.tokens[self.conv.index % len(d.plan.tokens)]
        protocols = [f.SUBPROTOCOL, f"{f.BEARER_PREFIX}{token}"]
        self.waiting["ready"] = asyncio.get_running_loop().create_future()
        try:
            self.ws = await connect(
                d.endpoint(self.conv, self.index),
                protocols,
                self.on_text,
                self.on_closed,
                d.plan.connect_timeout,
            )
            async with asyncio.timeout(d.plan.connect_timeout):
                await self.waiting["ready"]
        except HandshakeError as exc:
            return self._open_failed(exc.reason)
        except TimeoutError:
            return self._open_failed("timeout")
        except RequestFailed as exc:
            return self._open_failed(exc.reason)
        except OSError as exc:
            return self._open_failed(_os_reason(exc))
        finally:
            self.waiting.pop("ready", None)
        now = time.monotonic()
        d.stats.record("connect", now - started, now)
        d.stats.counters["connections.reopened" if again else "connections.ok"] += 1
        d.opened += 1
        return True

    def _open_failed(self, reason: str) -> bool:
        self.driver.stats.counters[f"connections.failed.{reason}"] += 1
        self.driver.failed += 1
        if self.ws is not None:
            self.ws.abort()
        self.ws = None
        return False

    async def request(self, frame: dict[str, Any]) -> Incoming:
        """Send a frame with a fresh `ref`; return the reply that carries it."""
        ws = self.ws
        if ws is None or ws.closed:
            raise RequestFailed("not_connected")
        self._refs += 1
        ref = f"r{self._refs}"
        frame["ref"] = ref
        future = self.waiting[ref] = asyncio.get_running_loop().create_future()
        try:
            ws.send_text(_encode(frame))
            async with asyncio.timeout(self.driver.plan.request_timeout):
                reply = await future
        except TimeoutError:
            raise RequestFailed("timeout") from None
        finally:
            self.waiting.pop(ref, None)
        if reply.type == "error":
            raise RequestFailed(reply.code or "error")
        result: Incoming = reply
        return result

    async def join(self, after: int | None) -> None:
        frame: dict[str, Any] = {"type": "join", "conversation": self.conv.id}
        if after is not None:
            frame["after"] = after
        await self.request(frame)

    def close(self) -> None:
        """The run is over: close cleanly."""
        if self.ws is not None:
            self.ws.close(1000, "load test over")

    def drop(self) -> None:
        """Lose the connection without a close frame, as a flaky network would."""
        self.dropping = True
        if self.ws is not None:
            self.ws.abort()

    async def rejoin(self) -> None:
        """Reconnect and join with `after` = the last seq held; the events missed while away
        must arrive, each exactly once."""
        d = self.driver
        counters = d.stats.counters
        counters["rejoins"] += 1
        after = self.last_seq
        self.rejoining = True
        try:
            await asyncio.sleep(REJOIN_DELAY)
            self.dropping = False
            self.ws = None
            if not await self.open(again=True):
                counters["rejoins.failed"] += 1
                return
            self.rejoin_target = -1  # set from `joined`
            self.rejoin_lost = self.lost_here
            self.ttft_turn = self.conv.turn  # this turn's first token is not measured here
            try:
                await self.join(after)
            except RequestFailed as exc:
                counters[f"rejoins.failed.{exc.reason}"] += 1
                self.rejoin_target = None
        finally:
            self.rejoining = False

    # ------------------------------------------------------------------ frames

    def on_text(self, payload: bytes) -> None:
        d = self.driver
        now = time.monotonic()
        try:
            fr = _decode(payload)
        except msgspec.DecodeError:
            d.stats.counters["frames.undecodable"] += 1
            return
        d.frames += 1
        if fr.seq >= 0:
            self._event(fr, now)
            return
        kind = fr.type
        if kind == "joined":
            self._joined(fr)
        elif kind == "ready":
            future = self.waiting.get("ready")
            if future is not None and not future.done():
                future.set_result(fr)
            return
        elif kind == "error":
            d.stats.counters[f"errors.{fr.code}"] += 1
        elif kind not in ("ack", "created", "pong", "conversation_changed"):
            d.stats.counters[f"frames.other.{kind}"] += 1
        if fr.ref is not None:
            future = self.waiting.get(fr.ref)
            if future is not None and not future.done():
                future.set_result(fr)

    def _joined(self, fr: Incoming) -> None:
        self.last_seq = fr.last_seq
        head = fr.meta.last_seq if fr.meta is not None else fr.last_seq
        self.replay_until = head
        self.message_id = ""
        if head > self.conv.head:
            self.conv.head = head
        if fr.reset:
            self.driver.stats.counters["rejoins.reset"] += 1
        if self.rejoin_target is not None:
            self.rejoin_target = head
            self._check_rejoin()

    def _event(self, fr: Incoming, now: float) -> None:
        d = self.driver
        last = self.last_seq
        seq = fr.seq
        if last is None:
            d.stats.counters["events.before_joined"] += 1
            return
        if seq != last + 1:
            if seq <= last:
                d.duplicated += 1
                return
            d.lost += seq - last - 1
            self.lost_here += seq - last - 1
        self.last_seq = seq
        conv = self.conv
        if seq > conv.head:
            conv.head = seq
        live = seq > self.replay_until
        kind = fr.type
        if kind == "token":
            d.tokens += 1
            if live:
                if fr.message_id == self.message_id and not d.publishing:
                    d.stats.record("gap", now - self.last_token_at, now)
                elif conv.said_at and self.ttft_turn != conv.turn:
                    self.ttft_turn = conv.turn
                    d.stats.record("ttft", now - conv.said_at, now)
                if fr.text[:1] == STAMP:
                    sent = int(fr.text[1:])
                    d.stats.record("latency", (time.monotonic_ns() - sent) / 1e9, now)
            self.message_id = fr.message_id
            self.last_token_at = now
        elif kind == "start":
            self.message_id = ""
        elif kind == "done":
            conv.finished(seq)
        if self.rejoin_target is not None:
            self._check_rejoin()

    def _check_rejoin(self) -> None:
        target = self.rejoin_target
        if target is None or target < 0 or self.last_seq is None or self.last_seq < target:
            return
        self.rejoin_target = None
        filled = self.lost_here == self.rejoin_lost
        self.driver.stats.counters["rejoins.filled" if filled else "rejoins.unfilled"] += 1

    def on_closed(self, code: int | None, reason: str) -> None:
        d = self.driver
        if not self.dropping and not d.closing:
            d.stats.counters[f"closed.{code if code is not None else 'no_close_frame'}"] += 1
            d.unexpected_closes += 1
        for future in self.waiting.values():
            if not future.done():
                label = f"closed_{code}" if code is not None else "closed"
                future.set_exception(RequestFailed(label))


def _os_reason(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0)
    return name.lower() if name else type(exc).__name__


# --------------------------------------------------------------------------- one conversation


@dataclass(eq=False)
class Conv:
    index: int
    id: str = ""
    tabs: list[LoadTab] = field(default_factory=list)
    head: int = 0
    """Highest seq any of its tabs has seen (or, for `publish`, that was published)."""
    said_at: float = 0.0
    turn: int = 0
    done_seq: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    message_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def finished(self, seq: int) -> None:
        if seq > self.done_seq:
            self.done_seq = seq
            self.done.set()

    def speaker(self) -> LoadTab | None:
        for tab in self.tabs:
            if tab.alive and tab.last_seq is not None:
                return tab
        return None
