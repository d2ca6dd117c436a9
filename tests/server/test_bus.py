"""The per-process pub/sub fan-out against a real Redis."""

from __future__ import annotations

import asyncio

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
