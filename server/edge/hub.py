"""What every socket of a web process shares: settings, the conversation service, the bus, the token
verifier and the per-user connection count; the upgrade policy (`server.edge.entrance`); the
open sockets, and each user's; the end-of-iteration write of every socket with frames; and
one keepalive sweep for all sockets instead of a timer each.

The hub sees a socket only through `Socket`, the few calls it makes on one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Final, Protocol

import msgspec

from protocol import frames as f
from protocol import wsframe
from protocol.session import CloseCode, SessionLimits
from server.app.config import Settings
from server.edge.auth import Principal, Verifier
from server.edge.watch import Sink
from server.redis import keys

if TYPE_CHECKING:
    from server.app.hooks import Hooks
    from server.edge.commands import Places, Service, Subscriptions
    from server.edge.entrance import UpgradePolicy
    from server.redis.rooms import Rooms

log = logging.getLogger("parley.hub")

MIN_SWEEP: Final = 0.25


class Socket(Sink, Protocol):
    """What the hub calls on a socket (`server.edge.connection.Connection`)."""

    last_seen: float
    """When the socket last received anything (monotonic seconds): the keepalive's clock."""

    @property
    def closing(self) -> bool:
        """A close has begun: the socket is left to its close timer."""
        ...

    def flush(self) -> None: ...

    def ping(self) -> None: ...

    def drop(self) -> None: ...


class Hub:
    def __init__(
        self,
        settings: Settings,
        conversations: Service,
        bus: Subscriptions,
        verifier: Verifier,
        presence: Places,
        upgrades: UpgradePolicy,
    ) -> None:
        self.settings = settings
        self.conversations = conversations
        self.bus = bus
        self.verifier = verifier
        self.presence = presence
        self.upgrades = upgrades
        self.rooms: Rooms | None = None
        """Who joined which conversation, for the server API's presence."""
        self.hooks: Hooks | None = None
        """The host application's hooks (set by the runtime when any is configured)."""
        self.connections: set[Socket] = set()
        self.users: dict[str, set[Sink]] = {}
        self.streams: set[Sink] = set()
        """SSE responses (`server.edge.sse`): ended with the sockets at shutdown."""
        self.limits = SessionLimits(
            max_text_chars=settings.limits.max_text_chars,
            frames_per_second=settings.limits.frames_per_second,
            frame_burst=settings.limits.frame_burst,
            bad_frames_before_close=settings.limits.bad_frames_before_close,
            auth_timeout=settings.auth.auth_timeout,
            refresh_hint=settings.auth.refresh_hint,
            refresh_grace=settings.auth.refresh_grace,
        )
        self.wire_limits = settings.limits.wire()
        self._tasks: set[asyncio.Task[None]] = set()
        self._dirty: list[Socket] = []
        self._flush_scheduled = False
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.bus.subscribe(keys.USERS, self, raw=True)
        if self.settings.server.ws_ping_interval > 0:
            self._sweeper = asyncio.get_running_loop().create_task(self._keep_alive())

    # ------------------------------------------------------------------ users' sockets

    def watch_user(self, user: str, conn: Sink) -> None:
        self.users.setdefault(user, set()).add(conn)

    def unwatch_user(self, user: str, conn: Sink) -> None:
        conns = self.users.get(user)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self.users[user]

    def on_event(self, seq: int, frame: bytes) -> None:
        """A `conversation_changed` for one user: to each of the user's sockets here."""
        try:
            user, payload = keys.split_user_message(frame)
        except (ValueError, msgspec.DecodeError):
            log.warning("ignored a malformed message on %s", keys.USERS)
            return
        conns = self.users.get(user)
        if conns:
            framed = wsframe.text(payload)
            for conn in tuple(conns):
                conn.push(framed)

    def resync(self) -> None:
        """conversation_changed frames are advisory; a client re-lists when it reconnects."""

    async def close_all(self, code: CloseCode, reason: str) -> None:
        """Refuse new sockets, close the open ones and wait (up to `shutdown_grace`) for
        them to be gone."""
        self.upgrades.accepting = False
        for conn in (*self.connections, *self.streams):
            conn.close(code, reason)
        deadline = time.monotonic() + self.settings.server.shutdown_grace
        while (self.connections or self._tasks) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in tuple(self.connections):  # their clients did not answer the close
            conn.drop()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    def mark_dirty(self, conn: Socket) -> None:
        """`conn` has frames to write: once this loop iteration's callbacks are done (the
        bus has dispatched everything one read brought), every such socket writes once."""
        self._dirty.append(conn)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        if self._flush_scheduled:  # not flushed meanwhile
            self.flush()

    def flush(self) -> bool:
        """Write every socket's queued frames now, each socket in one write; whether any
        socket had frames queued."""
        dirty, self._dirty = self._dirty, []
        self._flush_scheduled = False
        for conn in dirty:
            try:
                conn.flush()
            except Exception:
                log.exception("writing to a socket failed; dropping it")
                conn.drop()
        return bool(dirty)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a socket's clean-up; kept referenced until it ends, and waited for at close."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def ready_frame(
        self, principal: Principal, session: str, ref: str | None, budget: f.Budget | None = None
    ) -> f.Ready:
        settings = self.settings
        return f.Ready(
            user=principal.user,
            session=session,
            limits=self.wire_limits,
            model=settings.llm.model,
            simulated=settings.simulated,
            expires_at=None if principal.expires_at is None else int(principal.expires_at),
            ref=ref,
            budget=budget,
        )

    # ------------------------------------------------------------------ keepalive

    async def _keep_alive(self) -> None:
        """Ping sockets silent for `ws_ping_interval`; drop those silent for another
        `ws_ping_timeout` (a pong counts: it is data received). One sweep for all sockets.
        A socket that is closing is left to its close timer: it may be reading the frames
        queued before the close frame, and cutting it would lose that frame (1006)."""
        interval = self.settings.server.ws_ping_interval
        timeout = self.settings.server.ws_ping_timeout
        while True:
            await asyncio.sleep(max(min(interval, timeout) / 2, MIN_SWEEP))
            now = time.monotonic()
            for conn in tuple(self.connections):
                if conn.closing:
                    continue
                silent = now - conn.last_seen
                if silent >= interval + timeout:
                    conn.drop()
                elif silent >= interval:
                    conn.ping()
