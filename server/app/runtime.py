"""The process's shared resources, opened at start-up and closed at shutdown.

A web process (`parley web`) runs the socket hub; a worker process (`parley worker`) runs
generations and the persister; `parley serve` runs both in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import asyncpg
from redis.asyncio import Redis

from protocol.session import CloseCode
from server.app import collector, metrics, tracing
from server.app.config import Settings
from server.app.hooks import Hooks
from server.app.looplag import LoopLag
from server.edge import issuers
from server.edge.auth import Verifier, load_secret
from server.edge.conversations import Conversations
from server.edge.disconnects import Disconnects
from server.edge.entrance import UpgradePolicy
from server.edge.hub import Hub
from server.edge.observer import Observer
from server.edge.shardbus import Fanout, open_bus
from server.generation.finish_hooks import FinishSender
from server.generation.llm import LLM
from server.generation.persister import Persister
from server.generation.worker import Worker
from server.redis import client, keys
from server.redis.eventlog import EventLog
from server.redis.presence import Presence
from server.redis.queue import FairQueue
from server.redis.revocations import Revocations
from server.redis.rooms import Rooms
from server.redis.turns import Turns
from server.tools.toolbox import Toolbox
from storage.db import create_pool, migrate

log = logging.getLogger("parley")

PERSISTER_STOP_TIMEOUT = 5.0


@dataclass(kw_only=True)
class Runtime:
    settings: Settings
    runs_web: bool = True
    runs_worker: bool = True
    model_url: str = ""
    redis: Redis = field(init=False)
    pool: asyncpg.Pool = field(init=False)
    conversations: Conversations = field(init=False)
    verifier: Verifier = field(init=False)
    hub: Hub | None = field(init=False, default=None)
    revocations: Revocations | None = field(init=False, default=None)
    worker: Worker | None = field(init=False, default=None)
    persister: Persister | None = field(init=False, default=None)
    draining: bool = field(init=False, default=False)
    _tasks: list[asyncio.Task[None]] = field(init=False, default_factory=list)
    _bus: Fanout | None = field(init=False, default=None)
    _presence: Presence | None = field(init=False, default=None)
    _rooms: Rooms | None = field(init=False, default=None)
    _llm: LLM | None = field(init=False, default=None)
    hooks: Hooks = field(init=False)
    finish_sender: FinishSender | None = field(init=False, default=None)
    toolbox: Toolbox | None = field(init=False, default=None)
    loop_lag: LoopLag | None = field(init=False, default=None)

    async def start(self) -> None:
        s = self.settings
        keys.share_slots(s.redis.conversation_slots if s.redis.cluster else 0)
        self.redis = await client.opened(s.redis)
        self.pool = await create_pool(s.database.url, s.database.pool_size)
        await migrate(self.pool)
        events = EventLog(self.redis, s.redis.log_max_events, s.redis.ttl_seconds)
        queue = FairQueue(
            self.redis,
            s.limits.generations_per_user,
            s.redis.log_max_events,
            s.redis.ttl_seconds,
            enabled=s.limits.fair_queue,
            shards=s.redis.shards,
        )
        turns = Turns(
            self.redis,
            s.redis.log_max_events,
            s.redis.ttl_seconds,
            s.worker.lease_seconds,
            s.redis.shards,
            queue,
        )
        self.conversations = Conversations(s, self.redis, self.pool, events, turns)
        self.hooks = Hooks(s.hooks)
        self.verifier = Verifier(s.auth, load_secret(s.auth, s.data_path), issuers.resolve(s))
        self.verifier.group_claim = s.budgets.group_claim
        self.verifier.keep_claims = bool(s.hooks.connect_url)
        metrics.start_process(self.role, [s.llm.model, *s.metrics.models])
        tracing.configure(self.role)
        if self.runs_web:
            await self._start_web()
        if self.runs_worker:
            await self._start_tools()
            self._start_worker(events, turns)
        collector.calm()
        self._sample_loop_lag()

    @property
    def role(self) -> str:
        if self.runs_web and self.runs_worker:
            return "serve"
        return "web" if self.runs_web else "worker"

    def _sample_loop_lag(self) -> None:
        """In a process that serves /metrics: the web's, or a worker's on its own port."""
        if self.runs_web or self.settings.worker.metrics_port:
            self.loop_lag = LoopLag(self.settings.metrics.loop_lag_interval)
            self.loop_lag.start()

    async def _start_web(self) -> None:
        observer = Observer()
        self._bus = open_bus(
            self.redis, self.settings.redis.url, wrap=observer.frame, after=observer.dispatched
        )
        await self._bus.start()
        self._presence = Presence(self.redis, self.settings.limits.max_connections_per_user)
        await self._presence.start()
        self.hub = Hub(
            self.settings,
            self.conversations,
            self._bus,
            self.verifier,
            self._presence,
            UpgradePolicy(self.settings),
        )
        self.hub.hooks = self.hooks
        observer.flush = self.hub.flush
        await self.hub.start()
        hub = self.hub
        metrics.SOCKETS_OPEN.set_function(lambda: len(hub.connections))
        metrics.SSE_STREAMS_OPEN.set_function(lambda: len(hub.streams))
        if self.settings.server_api.keys:
            await self._start_server_api(self.hub, self._presence.process)

    async def _start_server_api(self, hub: Hub, process: str) -> None:
        """Token revocations, who joined which conversation, and the disconnects' channel.
        Without an API key nothing can revoke a token or ask who is present, so none of it
        runs: a new token costs no revocation lookup and a join no presence write."""
        s = self.settings
        self.revocations = Revocations(self.redis, s.server_api.revocation_ttl)
        self.verifier.revocations = self.revocations
        self._rooms = hub.rooms = Rooms(self.redis, process, s.redis.ttl_seconds)
        await Disconnects(hub, self.verifier, self.redis, self.revocations).start()

    async def _start_tools(self) -> None:
        """The tools the model may call, when any are configured (MCP servers listed now;
        one that cannot be reached is tried again later)."""
        tools = self.settings.tools
        if tools.http or tools.mcp:
            self.toolbox = Toolbox(tools, self.settings.hooks.secret)
            await self.toolbox.start()

    def _start_worker(self, events: EventLog, turns: Turns) -> None:
        self._llm = LLM(self.settings.llm, self.settings.llm.base_url or self.model_url)
        self.worker = Worker(
            self.settings,
            self.redis,
            self.conversations,
            events,
            turns,
            self._llm,
            hooks=self.hooks,
            toolbox=self.toolbox,
        )
        self.persister = Persister(
            self.redis,
            self.pool,
            events,
            shards=self.settings.redis.shards,
            wait_ms=self.settings.redis.persist_wait_ms,
        )
        worker = self.worker
        metrics.RUNNING.set_function(lambda: len(worker.running))
        self._tasks.append(asyncio.create_task(self._supervised("worker", self.worker.run)))
        self._tasks.append(asyncio.create_task(self._supervised("persister", self.persister.run)))
        if self.settings.hooks.finish_url:
            self.finish_sender = FinishSender(self.redis, self.hooks, self.settings.hooks)
            run = self.finish_sender.run
            self._tasks.append(asyncio.create_task(self._supervised("finish hooks", run)))

    async def _supervised(self, name: str, run: object) -> None:
        """Restart a background loop that died of an unexpected error."""
        assert callable(run)
        while not self.draining:
            try:
                await run()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s loop died; restarting in 1 s", name)
                await asyncio.sleep(1.0)

    def begin_drain(self) -> None:
        """Readiness turns false and workers stop claiming; sockets stay open for now."""
        self.draining = True
        if self.worker is not None:
            self.worker.begin_drain()

    async def stop(self, code: CloseCode = CloseCode.GOING_AWAY) -> None:
        self.begin_drain()
        if self.loop_lag is not None:
            self.loop_lag.stop()
        if self.hub is not None:
            await self.hub.close_all(code, "server shutting down")
        if self.worker is not None:
            await self.worker.stop()
        if self.persister is not None:
            self.persister.stop()  # finishes the turn in hand, then its loop returns
        if self.finish_sender is not None:
            self.finish_sender.stop()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=PERSISTER_STOP_TIMEOUT)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._rooms is not None:
            await self._rooms.stop()
        if self._presence is not None:
            await self._presence.stop()
        if self._bus is not None:
            await self._bus.stop()
        if self._llm is not None:
            await self._llm.close()
        if self.toolbox is not None:
            await self.toolbox.close()
        await self.hooks.close()
        await self.verifier.close()
        await self.pool.close()
        await self.redis.aclose()
        tracing.shutdown()

    async def ready(self) -> dict[str, bool]:
        """What /readyz reports: Redis and PostgreSQL reachable, and not draining."""
        checks = {"draining": self.draining, "redis": False, "database": False}
        with contextlib.suppress(Exception):
            checks["redis"] = bool(await asyncio.wait_for(self.redis.ping(), 1.0))
        with contextlib.suppress(Exception):
            checks["database"] = await asyncio.wait_for(self.pool.fetchval("SELECT true"), 1.0)
        return checks
