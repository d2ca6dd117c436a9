"""Per-process fan-out: ONE Redis pub/sub connection, supervised, channel -> local listeners.

A channel is subscribed while at least one local listener wants it and unsubscribed when the
last one leaves. `subscribe` returns only once Redis has confirmed the subscription, so a
caller that reads the event log afterwards cannot miss an event published in between.

The connection is opened at start-up (never lazily under a connect storm), pinged while idle,
and reopened with back-off when it breaks or stalls; every channel is then subscribed again
and every listener told to `resync`, because whatever was published meanwhile is lost.

With `sharded`, the channels are Redis Cluster shard channels (`SSUBSCRIBE`) of the one node
this bus is connected to; server/edge/shardbus.py holds one such bus per primary and moves
channels between them when their slot changes hands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError

from server.app import metrics

log = logging.getLogger("parley.bus")

SEQ_PREFIX: Final = b'{"seq":'
PING_EVERY: Final = 5.0
PING_TIMEOUT: Final = 5.0
SUBSCRIBE_TIMEOUT: Final = 5.0
BACKOFF: Final = (0.1, 0.2, 0.5, 1.0, 2.0)


class Listener(Protocol):
    def on_event(self, seq: int, frame: bytes) -> None:
        """A published message as the bus's `wrap` made it; `seq` is 0 for frames that
        carry none."""

    def resync(self) -> None:
        """Frames may have been lost (the pub/sub connection was re-established)."""


class BusUnavailable(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _Verbs:
    subscribe: bytes
    unsubscribe: bytes
    message: bytes


_PLAIN: Final = _Verbs(b"SUBSCRIBE", b"UNSUBSCRIBE", b"message")
_SHARDED: Final = _Verbs(b"SSUBSCRIBE", b"SUNSUBSCRIBE", b"smessage")


def _unchanged(data: bytes) -> bytes:
    return data


class Bus:
    """`wrap` turns each published message into what listeners get, once per message however
    many listen: the web process's bus frames it for the sockets (`protocol.wsframe.text`)."""

    def __init__(
        self,
        url: str,
        wrap: Callable[[bytes], bytes] = _unchanged,
        *,
        sharded: bool = False,
        on_lost: Callable[[], None] | None = None,
        on_dropped: Callable[[bytes], None] | None = None,
        after: Callable[[], None] | None = None,
    ) -> None:
        """`on_lost` is called each time the connection breaks or cannot be opened;
        `on_dropped` when Redis ends a subscription itself (its slot moved to another node);
        `after` once each message's listeners had it (the web process flushes a first token
        there, not after the rest of the read: `Observer.dispatched`)."""
        self._wrap = wrap
        self._after = after
        self._verbs = _SHARDED if sharded else _PLAIN
        self._on_lost = on_lost
        self._on_dropped = on_dropped
        self._pool = ConnectionPool.from_url(url, protocol=2)
        self._conn: AbstractConnection | None = None
        self._listeners: dict[bytes, set[Listener]] = {}
        self._raw: set[bytes] = set()
        self._confirmed: set[bytes] = set()
        self._waiters: dict[bytes, asyncio.Future[None]] = {}
        self._expected: dict[bytes, int] = {}
        self._outgoing: deque[tuple[bytes, bytes]] = deque()
        self._outgoing_ready = asyncio.Event()
        self._connected = asyncio.Event()
        self._pong = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._opened = False
        self._resync_pending = False
        self.reconnects = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name="parley-bus")
        try:
            await asyncio.wait_for(self._connected.wait(), SUBSCRIBE_TIMEOUT * 2)
        except TimeoutError:
            raise BusUnavailable("cannot open the Redis pub/sub connection") from None

    async def stop(self) -> None:
        self._stopping = True
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._pool.disconnect()

    @property
    def healthy(self) -> bool:
        return self._connected.is_set()

    @property
    def channels(self) -> int:
        return len(self._listeners)

    # ------------------------------------------------------------------ subscriptions

    async def subscribe(self, channel: str, listener: Listener, raw: bool = False) -> None:
        """Add a listener; `raw` channels' messages reach their listeners unwrapped."""
        name = channel.encode()
        if raw:
            self._raw.add(name)
        listeners = self._listeners.setdefault(name, set())
        listeners.add(listener)
        if name in self._confirmed:
            return
        waiter = self._waiters.get(name)
        if waiter is None:
            waiter = self._waiters[name] = asyncio.get_running_loop().create_future()
            self._command(self._verbs.subscribe, name)
        try:
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                await asyncio.shield(waiter)
        except TimeoutError:
            self.unsubscribe(channel, listener)
            raise BusUnavailable("Redis did not confirm the subscription") from None

    def unsubscribe(self, channel: str, listener: Listener) -> None:
        name = channel.encode()
        listeners = self._listeners.get(name)
        if listeners is None:
            return
        listeners.discard(listener)
        if listeners:
            return
        del self._listeners[name]
        self._raw.discard(name)
        self._confirmed.discard(name)
        waiter = self._waiters.pop(name, None)
        if waiter and not waiter.done():
            waiter.cancel()
        self._command(self._verbs.unsubscribe, name)

    def take(self, channel: bytes) -> tuple[set[Listener], bool]:
        """Remove a channel and hand back its listeners (and whether it is raw) without a
        word to Redis: its slot is served by another node now."""
        listeners = self._listeners.pop(channel, set())
        raw = channel in self._raw
        self._raw.discard(channel)
        self._confirmed.discard(channel)
        waiter = self._waiters.pop(channel, None)
        if waiter and not waiter.done():
            waiter.cancel()
        return listeners, raw

    def holds(self) -> list[bytes]:
        """The channels this bus has listeners for."""
        return list(self._listeners)

    def dropped(self, channel: bytes) -> bool:
        """Whether Redis ended `channel`'s subscription itself (`sunsubscribe`) and it has
        not been subscribed again since."""
        return (
            channel in self._listeners
            and channel not in self._confirmed
            and channel not in self._waiters
            and self._connected.is_set()
        )

    # ------------------------------------------------------------------ connection

    def _command(self, verb: bytes, name: bytes) -> None:
        """Queue a (UN)SUBSCRIBE; one sender keeps them in call order, so a quick leave and
        join of the same channel cannot reach Redis as join, then leave."""
        if verb == self._verbs.subscribe:
            self._expected[name] = self._expected.get(name, 0) + 1
        self._outgoing.append((verb, name))
        self._outgoing_ready.set()

    async def _send_commands(self, conn: AbstractConnection) -> None:
        """Write queued commands on `conn` while it is open. Once it is closed (a stall, a
        stop) nothing more is written: redis-py would open it again on the next command,
        behind the reader's back; the reader reconnects and subscribes what is wanted then."""
        try:
            while True:
                await self._outgoing_ready.wait()
                self._outgoing_ready.clear()
                while self._outgoing:
                    if not conn.is_connected:
                        return
                    verb, name = self._outgoing.popleft()
                    await conn.send_command(verb, name, check_health=False)
        except (RedisError, OSError) as exc:
            log.warning("pub/sub command failed (%s); the reader will reconnect", exc)

    async def _supervise(self) -> None:
        attempt = 0
        while not self._stopping:
            try:
                await self._connect()
                attempt = 0
                await self._serve()
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("Redis pub/sub connection lost (%s); reconnecting", exc)
                if self._on_lost is not None:
                    self._on_lost()
            finally:
                self._connected.clear()
                self._confirmed.clear()
                if self._conn is not None:
                    with contextlib.suppress(Exception):
                        await self._conn.disconnect()
                    self._conn = None
            if self._stopping:
                break
            await asyncio.sleep(BACKOFF[min(attempt, len(BACKOFF) - 1)])
            attempt += 1

    async def _connect(self) -> None:
        conn: AbstractConnection = self._pool.make_connection()  # type: ignore[no-untyped-call]
        await conn.connect()  # type: ignore[no-untyped-call]
        self._conn = conn
        self._outgoing.clear()
        self._expected.clear()
        channels = list(self._listeners)
        for name in channels:
            self._expected[name] = 1
        if channels and self._verbs is _PLAIN:
            await conn.send_command("SUBSCRIBE", *channels, check_health=False)
        for name in channels if self._verbs is _SHARDED else ():  # one slot per command
            await conn.send_command("SSUBSCRIBE", name, check_health=False)
        if self._opened:
            log.info("Redis pub/sub connection re-established; %d channels", len(channels))
            self.reconnects += 1
            metrics.BUS_RECONNECTS.inc()
            self._resync_pending = bool(channels)
        self._opened = True
        self._connected.set()

    async def _serve(self) -> None:
        conn = self._conn
        assert conn is not None
        pinger = asyncio.create_task(self._ping(conn), name="parley-bus-pinger")
        sender = asyncio.create_task(self._send_commands(conn), name="parley-bus-sender")
        try:
            while True:
                reply = await conn.read_response(disable_decoding=True, timeout=math.inf)
                if not isinstance(reply, list):
                    if reply == b"PONG":  # PING answered outside subscribed mode (no channels)
                        self._pong.set()
                    continue
                kind = reply[0]
                if kind == self._verbs.message:
                    self._dispatch(reply[1], reply[2])
                elif kind == b"sunsubscribe":
                    self._dropped(reply[1])
                elif kind in (b"subscribe", b"ssubscribe"):
                    self._confirm(reply[1])
                    if self._resync_pending:
                        self._resync_pending = False
                        self._resync_all()
                elif kind == b"pong":
                    self._pong.set()
        finally:
            await _ended(pinger, sender)

    async def _ping(self, conn: AbstractConnection) -> None:
        """Notice a connection that stalled silently (a paused link never raises)."""
        while conn.is_connected:
            await asyncio.sleep(PING_EVERY)
            if not conn.is_connected:
                return
            self._pong.clear()
            await conn.send_command("PING", check_health=False)
            try:
                await asyncio.wait_for(self._pong.wait(), PING_TIMEOUT)
            except TimeoutError:
                log.warning("Redis pub/sub connection stalled; reconnecting")
                await conn.disconnect()
                return

    def _confirm(self, name: bytes) -> None:
        """A subscribe reply; the channel counts as subscribed once the last SUBSCRIBE sent
        for it is answered (an earlier one may have been followed by an UNSUBSCRIBE)."""
        expected = self._expected.get(name, 0) - 1
        if expected > 0:
            self._expected[name] = expected
            return
        self._expected.pop(name, None)
        if name not in self._listeners:
            return
        self._confirmed.add(name)
        waiter = self._waiters.pop(name, None)
        if waiter and not waiter.done():
            waiter.set_result(None)

    def _dropped(self, name: bytes) -> None:
        """An SUNSUBSCRIBE reply: ours (the channel has no listener left), or Redis ending
        the subscription because the channel's slot moved (it still has listeners)."""
        if name in self._listeners and name not in self._waiters and self._on_dropped:
            self._confirmed.discard(name)
            self._on_dropped(name)

    def _dispatch(self, channel: bytes, data: bytes) -> None:
        listeners = self._listeners.get(channel)
        if not listeners:
            return
        seq = int(data[7 : data.index(b",", 7)]) if data.startswith(SEQ_PREFIX) else 0
        frame = data if channel in self._raw else self._wrap(data)
        for listener in tuple(listeners):
            try:
                listener.on_event(seq, frame)
            except Exception:  # one listener's failure must not end the bus for all
                log.exception("a listener of %r failed", channel)
        if self._after is not None:
            try:
                self._after()
            except Exception:  # as a listener's: the bus goes on
                log.exception("the bus's after-message step failed")

    def _resync_all(self) -> None:
        for listeners in tuple(self._listeners.values()):
            metrics.BUS_RESYNCS.inc(len(listeners))
            for listener in tuple(listeners):
                listener.resync()


async def _ended(*tasks: asyncio.Task[None]) -> None:
    """Cancel a connection's helper tasks and wait for them, so that none can end with an
    exception nobody retrieves; one that failed is logged."""
    for task in tasks:
        task.cancel()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    for task, outcome in zip(tasks, outcomes, strict=True):
        if isinstance(outcome, Exception):
            log.warning("pub/sub %s failed: %r", task.get_name(), outcome)
