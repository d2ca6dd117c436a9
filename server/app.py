"""The Litestar application: routes, the WebSocket endpoint, the UI, the simulated model and
the lifespan that opens and closes the process's resources. No business logic here."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from litestar import Litestar
from litestar.enums import ScopeType
from litestar.static_files import create_static_files_router
from litestar.types import Receive, Scope, Send

from server.api import ROUTES
from server.runtime import Runtime
from server.simulator import SimulatorSettings, SimulatorStats, simulator_router

STATIC = Path(__file__).parent / "static"


class Entrypoint:
    """The ASGI application: `/ws` goes straight to the socket hub, everything else (HTTP and
    the lifespan) to Litestar. Sockets skip the HTTP middleware stack, which would otherwise
    wrap every frame a socket sends."""

    def __init__(self, app: Litestar, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hub = self.runtime.hub
        if scope["type"] == ScopeType.WEBSOCKET and scope["path"] == "/ws" and hub is not None:
            await hub(scope, receive, send)  # type: ignore[arg-type]
            return
        await self.app(scope, receive, send)


def create_app(runtime: Runtime, simulator: SimulatorStats | None = None) -> Entrypoint:
    """A web app (`runtime.web`) and/or the simulated model (`simulator` given)."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    handlers: list[Any] = list(ROUTES) if runtime.web else []
    if simulator is not None:
        s = runtime.settings.simulator
        settings = SimulatorSettings(
            first_token_delay=s.first_token_delay,
            tokens_per_second=s.tokens_per_second,
            max_tokens=s.max_tokens,
            model=runtime.settings.llm.model,
        )
        handlers.append(simulator_router(settings, simulator))
    if runtime.web and STATIC.is_dir():
        handlers.append(create_static_files_router(path="/", directories=[STATIC], html_mode=True))
    app = Litestar(
        route_handlers=handlers,
        lifespan=[lifespan],
        openapi_config=None,
        logging_config=None,
    )
    app.state.runtime = runtime
    return Entrypoint(app, runtime)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
