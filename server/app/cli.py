"""`parley serve | web | worker | migrate | token | model | load | deadletter`."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import shutil
import socket
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import uvicorn
from redis.exceptions import RedisError

from protocol.session import CloseCode
from server.app import logs, metrics
from server.app.config import ConfigError, RedisSettings, Settings, load
from server.app.runtime import Runtime
from server.app.web import create_app
from server.dev import embedded
from server.dev.simulator import SimulatorStats
from server.edge import issuers
from server.edge.auth import Verifier, load_secret
from server.edge.entrance import Entrance
from server.edge.http import BoundedHttp, EdgeLimits
from server.redis.deadletter import DeadLetter, DeadLetters, encode_letter

log = logging.getLogger("parley")


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = load(args.config)
        issuers.resolve(settings)  # an identity provider missing a value stops start-up here
    except ConfigError as exc:
        sys.exit(f"parley: configuration error: {exc}")
    if getattr(args, "port", None) is not None:
        settings = _with(settings, "server", port=args.port)
    if getattr(args, "host", None) is not None:
        settings = _with(settings, "server", host=args.host)
    if getattr(args, "metrics_port", None) is not None:
        settings = _with(settings, "worker", metrics_port=args.metrics_port)
    logs.configure(settings.server.log_level, settings.server.log_format)
    try:
        args.run(settings, args)
    except embedded.EmbeddedError as exc:
        sys.exit(f"parley: {exc}")
    except KeyboardInterrupt:
        pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parley", description=__doc__)
    parser.add_argument("--config", help="TOML file (default: $PARLEY_CONFIG or ./config.toml)")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, run: Any, help: str, listen: bool = False) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(run=run)
        if listen:
            sub.add_argument("--host", help="address to listen on (server.host)")
            sub.add_argument("--port", type=int, help="port to listen on (server.port, $PORT)")
        return sub

    command("serve", serve, "everything in one process, with embedded Redis/PostgreSQL", True)
    command("web", web, "a WebSocket/HTTP process (needs REDIS_URL and DATABASE_URL)", True)
    worker_cmd = command("worker", worker, "a generation + persistence process (needs URLs too)")
    worker_cmd.add_argument(
        "--metrics-port", type=int, help="serve GET /metrics here (worker.metrics_port; 0: off)"
    )
    command("migrate", migrate, "apply the database migrations")
    token = command("token", token_command, "print a token for a user")
    token.add_argument("--user", required=True)
    token.add_argument("--ttl", type=int, default=3600, help="seconds until it expires")
    command("model", model, "run the simulated model on its own", True)
    command("asyncapi", asyncapi, "print the protocol's AsyncAPI 3 document")
    command("protocol-js", protocol_js, "print the UI's protocol constants (static/protocol.js)")
    load_cmd = command("load", load_command, "drive a load test against a running Parley")
    load_cmd.add_argument("rest", nargs=argparse.REMAINDER)
    dead = command("deadletter", deadletter, "list, retry or drop queue entries that failed")
    actions = dead.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="the oldest dead letters")
    listing.add_argument("--count", type=int, default=100)
    listing.add_argument("--json", action="store_true", help="one JSON object a line")
    for action, help in (("retry", "put one back on its queue"), ("drop", "discard one")):
        actions.add_parser(action, help=help).add_argument("id", help="its dead-letter id")
    return parser


def _with(settings: Settings, section: str, **changes: Any) -> Settings:
    part = msgspec.structs.replace(getattr(settings, section), **changes)
    return msgspec.structs.replace(settings, **{section: part})


# --------------------------------------------------------------------------- commands


def serve(settings: Settings, args: argparse.Namespace) -> None:
    with embedded_services(settings) as settings:
        s = settings.server
        model_url = f"http://{_loopback(s.host)}:{s.port}/v1"
        runtime = Runtime(settings=settings, runs_web=True, runs_worker=True, model_url=model_url)
        app = create_app(runtime, SimulatorStats() if settings.simulated else None)
        _banner(settings)
        _run_uvicorn(app, settings, runtime)


def web(settings: Settings, args: argparse.Namespace) -> None:
    _require_urls(settings, "web")
    runtime = Runtime(settings=settings, runs_web=True, runs_worker=False)
    _run_uvicorn(create_app(runtime), settings, runtime)


def worker(settings: Settings, args: argparse.Namespace) -> None:
    """A worker serves nothing but, when no model is configured, its own simulated model
    on an ephemeral loopback port."""
    _require_urls(settings, "worker")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    runtime = Runtime(
        settings=settings, runs_web=False, runs_worker=True, model_url=f"http://127.0.0.1:{port}/v1"
    )
    if settings.worker.metrics_port:
        metrics.serve(settings.server.host, settings.worker.metrics_port)
    app = create_app(runtime, SimulatorStats() if settings.simulated else None)
    _run_uvicorn(app, settings, runtime, sock=sock)


def migrate(settings: Settings, args: argparse.Namespace) -> None:
    from storage.db import create_pool
    from storage.db import migrate as apply

    async def run(url: str) -> list[str]:
        pool = await create_pool(url, 1)
        try:
            return await apply(pool)
        finally:
            await pool.close()

    with embedded_services(settings, redis=False) as settings:
        applied = asyncio.run(run(settings.database.url))
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))


def token_command(settings: Settings, args: argparse.Namespace) -> None:
    verifier = Verifier(settings.auth, load_secret(settings.auth, settings.data_path))
    print(verifier.mint(args.user, args.ttl))


def model(settings: Settings, args: argparse.Namespace) -> None:
    from server.dev.simulator import simulator_app

    app = simulator_app(settings.simulator, model=settings.llm.model)
    print(f"simulated model on http://{settings.server.host}:{settings.server.port}/v1")
    uvicorn.run(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_level="warning",
        **_protocols(None, settings),
    )


def asyncapi(settings: Settings, args: argparse.Namespace) -> None:
    from protocol.asyncapi import render

    print(render(), end="")


def protocol_js(settings: Settings, args: argparse.Namespace) -> None:
    from protocol.reference import javascript

    print(javascript(), end="")


def load_command(settings: Settings, args: argparse.Namespace) -> None:
    from server.load import main as load_main

    load_main(args.rest, settings)


def deadletter(settings: Settings, args: argparse.Namespace) -> None:
    """Show and mend what the queues set aside (server/redis/deadletter.py), in the Redis of
    REDIS_URL (`parley serve` logs the URL of its embedded one)."""
    if not settings.redis.url:
        sys.exit("parley deadletter: set REDIS_URL (or [redis] url) to the Redis Parley uses")
    try:
        sys.exit(asyncio.run(_deadletter(settings.redis, args)))
    except (RedisError, OSError) as exc:
        sys.exit(f"parley deadletter: {exc}")


async def _deadletter(settings: RedisSettings, args: argparse.Namespace) -> int:
    from server.redis import client

    redis = await client.opened(settings)
    letters = DeadLetters(redis)
    try:
        if args.action == "list":
            for letter in await letters.list(args.count):
                print(encode_letter(letter).decode() if args.json else _letter_lines(letter))
            return 0
        if args.action == "retry":
            new_id = await letters.retry(args.id)
            if new_id is None:
                print(f"no dead letter {args.id}", file=sys.stderr)
                return 1
            print(f"{args.id} put back as {new_id}")
            return 0
        if not await letters.drop(args.id):
            print(f"no dead letter {args.id}", file=sys.stderr)
            return 1
        print(f"{args.id} dropped")
        return 0
    finally:
        await redis.aclose()


def _letter_lines(letter: DeadLetter) -> str:
    at = datetime.fromtimestamp(letter.at, UTC).isoformat(timespec="seconds")
    lines = [
        f"{letter.id}  from {letter.source} (entry {letter.entry}), "
        f"{letter.attempts} attempts, {at}",
        f"  error: {letter.error}",
    ]
    for name, value in letter.fields.items():
        lines.append(f"  {name}: {value[:300].decode(errors='replace')!r}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- helpers


@contextmanager
def embedded_services(settings: Settings, *, redis: bool = True) -> Iterator[Settings]:
    """Start real Redis/PostgreSQL under the data directory for the URLs not configured."""
    services: list[embedded.Service] = []
    data = settings.data_path.resolve()
    try:
        if redis and not settings.redis.url:
            service = embedded.start_redis(data, persist=True)
            services.append(service)
            settings = _with(settings, "redis", url=service.url)
            log.info("embedded Redis at %s (pid %d)", service.url, service.pid)
        if not settings.database.url:
            service = embedded.start_postgres(data)
            services.append(service)
            settings = _with(settings, "database", url=service.url)
            log.info("embedded PostgreSQL at %s (pid %d)", service.url, service.pid)
        if services and settings.auth.dev_login is None:
            settings = _with(settings, "auth", dev_login=True)
        yield settings
    finally:
        for service in reversed(services):
            service.stop()


def _require_urls(settings: Settings, role: str) -> None:
    if not (settings.redis.url and settings.database.url):
        sys.exit(
            f"parley {role}: set REDIS_URL and DATABASE_URL (shared by every process); "
            "for one process with embedded services use `parley serve`"
        )


class _Server(uvicorn.Server):
    """uvicorn, with a drain before the exit: on the first SIGTERM/SIGINT `/readyz` turns 503
    and workers stop claiming turns; `server.drain_delay` later the sockets are closed with
    1012 (clients reconnect elsewhere and rejoin with `after`); then uvicorn stops. A second
    signal exits at once."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime | None, drain_delay: float):
        super().__init__(config)
        self.runtime = runtime
        self.drain_delay = drain_delay
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.runtime is None or self.runtime.draining or self._loop is None:
            super().handle_exit(sig, frame)
            return
        self.runtime.begin_drain()
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        assert self.runtime is not None
        if self.runtime.hub is not None:
            await asyncio.sleep(self.drain_delay)
            await self.runtime.hub.close_all(CloseCode.RESTART, "server restarting")
        self.should_exit = True


def _run_uvicorn(
    app: Any, settings: Settings, runtime: Runtime | None, sock: socket.socket | None = None
) -> None:
    grace = settings.server.shutdown_grace
    if runtime is not None and runtime.runs_worker:
        grace = max(grace, settings.worker.shutdown_deadline)
    config = uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        **_protocols(runtime, settings),
        loop="auto",  # uvloop where installed
        lifespan="on",
        access_log=False,
        log_level="warning",  # uvicorn logs every socket at info
        timeout_graceful_shutdown=max(int(grace), 1),
    )
    server = _Server(config, runtime, settings.server.drain_delay)
    server.run(sockets=[sock] if sock else None)
    if server.started is False:
        sys.exit("parley: the server did not start (see the log above)")


def _protocols(runtime: Runtime | None, settings: Settings) -> dict[str, Any]:
    """uvicorn's `http` and `ws` settings: HTTP bounded at the edge (`server.edge.http`); in a
    web process, Parley's own sockets (`server.edge.entrance`), so that connections whose first
    request is for `/ws` skip uvicorn's HTTP layer."""
    s = settings.server
    limits = EdgeLimits(request_timeout=s.request_timeout, max_body_bytes=s.max_body_bytes)
    options: dict[str, Any] = {"timeout_keep_alive": s.keep_alive_timeout}
    if runtime is None or not runtime.runs_web:
        return {**options, "http": functools.partial(BoundedHttp, limits), "ws": "none"}
    entrance = Entrance(lambda: runtime.hub, limits)
    return {**options, "http": entrance.http, "ws": entrance.ws}


def _loopback(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _own_command() -> str:
    """How to run `parley` again from here (`.venv/bin/parley` when it is not on PATH)."""
    argv0 = sys.argv[0]
    if Path(argv0).name == "parley" and shutil.which("parley") != str(Path(argv0).resolve()):
        return os.path.relpath(argv0)
    return "parley"


def _banner(settings: Settings) -> None:
    s = settings.server
    url = f"http://{_loopback(s.host)}:{s.port}"
    model = "the simulated model" if settings.simulated else settings.llm.base_url or "OpenAI"
    print(
        f"\nParley on {url}  (open it in a browser)\n"
        f"  model: {model}\n"
        f"  data:  {Path(s.data_dir).resolve()}\n"
        f"  token: {_own_command()} token --user alice\n"
        f"  socket: {url.replace('http', 'ws')}/ws with subprotocols "
        f"'parley.v1', 'bearer.<token>'\n",
        flush=True,
    )


if __name__ == "__main__":
    main()
