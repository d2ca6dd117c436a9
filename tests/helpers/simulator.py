"""The simulated model served by uvicorn in the test's own event loop, on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn

from server.app.config import SimulatorSettings
from server.dev.simulator import SimulatorStats, simulator_app


@asynccontextmanager
async def served(settings: SimulatorSettings, stats: SimulatorStats) -> AsyncIterator[str]:
    """The simulator's base URL (`http://127.0.0.1:PORT/v1`) while it runs."""
    config = uvicorn.Config(
        simulator_app(settings, stats), host="127.0.0.1", port=0, log_level="critical",
        lifespan="on",
    )  # fmt: skip
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 5
    while not server.started:
        assert time.monotonic() < deadline, "the simulator did not start"
        await asyncio.sleep(0.005)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 5)
