"""The Litestar application: REST routes, the UI, the simulated model and the lifespan that
opens and closes the process's resources. No business logic here. The WebSocket endpoint is
not a Litestar route: uvicorn hands upgrade requests straight to `server.edge.entrance`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from litestar import Litestar, Response, get
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.static_files import create_static_files_router

from server.app import metrics
from server.app.runtime import Runtime
from server.dev.simulator import SimulatorStats, simulator_router
from server.edge import server_api, streams, usage
from server.edge.rest import ROUTES

STATIC = Path(__file__).parent.parent / "static"
OPENAPI = OpenAPIConfig(
    title="Parley REST API",
    version="1",
    path="/schema",
    render_plugins=[JsonRenderPlugin()],
    description=(
        "Conversations over REST with the WebSocket's JWT as `Authorization: Bearer`; the "
        "server API (`/api/server/`, tag `server`) with a `server_api.keys` key instead."
    ),
)
"""The REST API's OpenAPI document, served at `GET /schema/openapi.json`."""


def create_app(runtime: Runtime, simulator: SimulatorStats | None = None) -> Litestar:
    """A web app (`runtime.runs_web`) and/or the simulated model (`simulator` given)."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    handlers: list[Any] = (
        [*ROUTES, *server_api.ROUTES, *streams.ROUTES, *usage.ROUTES, metrics_endpoint]
        if runtime.runs_web
        else []
    )
    if simulator is not None:
        settings = runtime.settings
        handlers.append(simulator_router(settings.simulator, simulator, model=settings.llm.model))
    if runtime.runs_web and STATIC.is_dir():
        handlers.append(create_static_files_router(path="/", directories=[STATIC], html_mode=True))
    app = Litestar(
        route_handlers=handlers,
        lifespan=[lifespan],
        openapi_config=OPENAPI if runtime.runs_web else None,
        logging_config=None,
    )
    app.state.runtime = runtime
    return app


@get("/metrics", media_type=metrics.CONTENT_TYPE, include_in_schema=False, sync_to_thread=False)
def metrics_endpoint() -> Response[bytes]:
    """This process's metrics in the Prometheus text format."""
    return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)
