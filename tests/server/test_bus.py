"""The per-process pub/sub fan-out against a real Redis."""

from __future__ import annotations

import asyncio
import gc

import pytest
from redis.asyncio import Redis

from server.edge import bus as bus_module
from server.edge.bus import Bus
from tests.helpers.processes import Services


class Recorder:
    def __init__(self) -> None:
        self.frames: list[tuple[int, bytes]] = []
        self.resyncs = 0

    def on_event(self, seq: int, frame: bytes) -> None:
        self.frames.append((seq, frame))

    def resync(self) -> None:
        self.resyncs += 1


async def test_idle_bus_answers_pings_without_reconnecting(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bus_module, "PING_EVERY", 0.2)
    monkeypatch.setattr(bus_module, "PING_TIMEOUT", 0.5)
    bus = Bus(services.redis_url)
    await bus.start()
    try:
        await asyncio.sleep(1.5)
        assert bus.reconnects == 0 and bus.healthy
    finally:
        await bus.stop()


async def test_leave_and_join_in_one_breath_stays_subscribed(services: Services) -> None:
    bus = Bus(services.redis_url)
    redis = Redis.from_url(services.redis_url)
    await bus.start()
    try:
        first, second = Recorder(), Recorder()
        await bus.subscribe("parley:test:chan", first)
        bus.unsubscribe("parley:test:chan", first)
        await bus.subscribe("parley:test:chan", second)
        await asyncio.sleep(0.1)
        await redis.publish("parley:test:chan", b'{"seq":7,"type":"token"}')
        for _ in range(100):
            if second.frames:
                break
            await asyncio.sleep(0.02)
        assert second.frames == [(7, b'{"seq":7,"type":"token"}')] and not first.frames
    finally:
        await bus.stop()
        await redis.aclose()


class TaskErrors:
    """Exceptions the event loop reports, such as a task that died and was never awaited."""

    def __init__(self) -> None:
        self.reports: list[str] = []
        self._loop = asyncio.get_running_loop()
        self._previous = self._loop.get_exception_handler()
        self._loop.set_exception_handler(self._record)

    def _record(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        self.reports.append(f"{context.get('message')}: {context.get('exception')!r}")

    def collected(self) -> list[str]:
        gc.collect()  # a task that died unawaited is reported when it is collected
        self._loop.set_exception_handler(self._previous)
        return self.reports


async def subscribed_bus(url: str, channels: list[str], listener: Recorder) -> Bus:
    bus = Bus(url)
    await bus.start()
    await asyncio.gather(*(bus.subscribe(name, listener) for name in channels))
    return bus


async def test_connection_killed_with_unsubscribes_queued_recovers_cleanly(
    services: Services,
) -> None:
    """Redis drops the pub/sub connection while thousands of UNSUBSCRIBEs wait to go out:
    no task dies, and the bus reconnects and serves the channels still wanted."""
    errors = TaskErrors()
    redis = Redis.from_url(services.redis_url)
    listener, kept = Recorder(), Recorder()
    channels = [f"parley:test:gone{i}" for i in range(5000)]
    bus = await subscribed_bus(services.redis_url, channels, listener)
    try:
        await bus.subscribe("parley:test:kept", kept)
        for name in channels:
            bus.unsubscribe(name, listener)
        await redis.client_kill_filter(_type="pubsub")
        for _ in range(200):
            if bus.reconnects and bus.healthy:
                break
            await asyncio.sleep(0.02)
        assert bus.reconnects >= 1 and bus.healthy
        await asyncio.sleep(0.2)  # the channel is subscribed again once the reply is in
        await redis.publish("parley:test:kept", b'{"seq":1,"type":"token"}')
        for _ in range(100):
            if kept.frames:
                break
            await asyncio.sleep(0.02)
        assert kept.frames == [(1, b'{"seq":1,"type":"token"}')]
    finally:
        await bus.stop()
        await redis.aclose()
    assert errors.collected() == []


async def test_stop_with_unsubscribes_queued_leaves_no_failed_task(services: Services) -> None:
    """A web process stopping with 10,000 sockets: their UNSUBSCRIBEs are queued when the
    pub/sub connection closes."""
    errors = TaskErrors()
    listener = Recorder()
    channels = [f"parley:test:stop{i}" for i in range(10_000)]
    bus = await subscribed_bus(services.redis_url, channels, listener)
    for name in channels:
        bus.unsubscribe(name, listener)
    await asyncio.sleep(0)  # the sender starts writing
    await bus.stop()
    assert errors.collected() == []


async def test_after_runs_once_each_message_reached_its_listeners(services: Services) -> None:
    """`after` follows each message's dispatch, before the next message of the same read is
    dispatched (the web process writes a first token there, not after the whole read)."""
    seen: list[str] = []

    class Listener:
        def on_event(self, seq: int, frame: bytes) -> None:
            seen.append(f"event {seq}")

        def resync(self) -> None:
            seen.append("resync")

    bus = Bus(services.redis_url, after=lambda: seen.append("after"))
    redis = Redis.from_url(services.redis_url)
    await bus.start()
    try:
        await bus.subscribe("parley:test:after", Listener())
        async with redis.pipeline(transaction=False) as pipe:  # one read brings all three
            for seq in (1, 2, 3):
                pipe.publish("parley:test:after", f'{{"seq":{seq},"type":"token"}}')
            await pipe.execute()
        for _ in range(100):
            if len(seen) >= 6:
                break
            await asyncio.sleep(0.02)
        assert seen == ["event 1", "after", "event 2", "after", "event 3", "after"]
    finally:
        await bus.stop()
        await redis.aclose()
