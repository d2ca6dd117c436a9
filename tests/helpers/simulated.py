"""The simulated model served by uvicorn on 127.0.0.1, for tests that talk to it directly."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import uvicorn

from server.app.config import SimulatorSettings
from server.dev.simulator import SimulatorStats, simulator_app

FAST = SimulatorSettings(first_token_delay=0.0, tokens_per_second=0.0)


async def eventually(condition: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


@dataclass(frozen=True)
class Sim:
    base_url: str
    stats: SimulatorStats


@contextlib.asynccontextmanager
async def serving(settings: SimulatorSettings = FAST) -> AsyncIterator[Sim]:
    stats = SimulatorStats()
    config = uvicorn.Config(
        simulator_app(settings, stats),
        host="127.0.0.1",
        port=0,
        log_level="critical",
        lifespan="on",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    await eventually(lambda: server.started, within=5)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Sim(f"http://127.0.0.1:{port}/v1", stats)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 5)
