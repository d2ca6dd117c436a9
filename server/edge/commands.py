"""What a socket's client asks for, carried out: the application side of a `Connection`.

The connection hands `Commands` each message; the sans-I/O `Session` turns them into actions
(`protocol.session`), which run in order. Replies go out at once; a token check or a command
(create, join, leave, say, cancel, regenerate) waits on Redis or PostgreSQL on a task made for
the purpose, which ends when the queue is empty. Here too: the auth window and the token's
expiry, the user's place in the per-user count (`Presence`), and the conversations the
socket watches (`Watch`).

The connection is the transport: it tells `Commands` when it closes (`closing`) and when the
TCP connection is gone (`connection_lost`), and `Commands` tells it to stop reading while too
many commands wait (`hold_reading`) and when what the socket held is given back (`release`).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import secrets
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING, Final, Protocol

from redis.exceptions import RedisError

from protocol import frames as f
from protocol.approvals import Decision
from protocol.session import Action, Close, CloseCode, Command, Reply, Session, State, Verify
from server.app import logs, metrics
from server.edge.auth import AuthError, Principal
from server.edge.bus import Listener
from server.edge.failures import Refused, refusal
from server.edge.watch import Transcripts, Watch
from server.redis import keys
from server.redis.turns import HookData

if TYPE_CHECKING:
    from server.edge.connection import Connection
    from server.edge.hub import Hub

log = logging.getLogger("parley.ws")

RECHECK: Final = 0.02
"""How soon an auth window that a timer found not quite over is checked again."""
MAX_QUEUED: Final = 32
"""Actions waiting behind a running command before the socket stops reading."""
CLEANUP_TIMEOUT: Final = 5.0
"""How long a command still running when the TCP connection went may take before the socket
gives back what it holds anyway."""


_TIMERS: Final = contextvars.Context()
"""The context the sockets' expiry timers run in, one for all: a timer set in the runner
task would otherwise keep that task's context (its session and last conversation ids,
≈ 0.3 KiB) for the token's life. Nothing `_tick` runs sets a context variable; the tasks it
starts copy this empty one and set their own (`_run`)."""


class Service(Transcripts, Protocol):
    """What commands ask of the conversation service (`server.edge.conversations.Conversations`)."""

    async def create(
        self,
        user: str,
        title: str | None,
        system: str | None,
        model: str | None,
        group: str = "",
        tools: list[str] | None = None,
    ) -> f.Conversation: ...

    async def say(
        self,
        user: str,
        conversation: uuid.UUID,
        text: str,
        message_id: uuid.UUID | None,
        hook_data: HookData = None,
        group: str = "",
    ) -> tuple[uuid.UUID, bool]: ...

    async def regenerate(
        self, user: str, conversation: uuid.UUID, hook_data: HookData = None, group: str = ""
    ) -> uuid.UUID: ...

    async def update(
        self,
        user: str,
        conversation: uuid.UUID,
        *,
        title: str | None = None,
        system: str | None = None,
        model: str | None = None,
        group: str = "",
        tools: list[str] | None = None,
    ) -> f.Conversation: ...

    async def budget(self, user: str, group: str) -> f.Budget | None: ...

    async def cancel(self, user: str, conversation: uuid.UUID) -> None: ...

    async def answer(
        self,
        user: str,
        conversation: uuid.UUID,
        call_id: str,
        decision: Decision,
        reason: str | None = None,
    ) -> f.Answer: ...


class Subscriptions(Protocol):
    """The process's pub/sub connection (`server.edge.bus.Bus`)."""

    async def subscribe(self, channel: str, listener: Listener, raw: bool = False) -> None: ...

    def unsubscribe(self, channel: str, listener: Listener) -> None: ...


class Places(Protocol):
    """The per-user socket count across processes (`server.redis.presence.Presence`)."""

    async def admit(self, user: str) -> bool: ...

    def leave(self, user: str) -> None: ...


class Commands:
    """One socket's session and the commands it runs.

    `registered` is not part of the connection's lifecycle: it says the user was admitted
    (holds a place in the per-user count and the hub's list of the user's sockets), which is
    what `_release` gives back."""

    __slots__ = (
        "_cleanup_timeout",
        "_expiry",
        "_max_queued",
        "_queue",
        "_queue_full",
        "_runner",
        "conn",
        "hook_data",
        "hub",
        "id",
        "principal",
        "registered",
        "session",
        "watches",
    )

    def __init__(
        self,
        conn: Connection,
        hub: Hub,
        *,
        auth_timeout: float | None = None,
        max_queued: int = MAX_QUEUED,
        cleanup_timeout: float = CLEANUP_TIMEOUT,
    ) -> None:
        """`auth_timeout` defaults to the setting `auth.auth_timeout`."""
        self.conn = conn
        self.hub = hub
        limits = hub.limits
        if auth_timeout is not None and auth_timeout != limits.auth_timeout:
            limits = dataclasses.replace(limits, auth_timeout=auth_timeout)
        self.session = Session(limits, time.monotonic())
        self.id = secrets.token_hex(8)
        self.principal: Principal | None = None
        """The latest token's, once one was accepted (a server API disconnect revokes it)."""
        self.watches: dict[uuid.UUID, Watch] = {}
        self.registered = False
        self.hook_data: HookData = None
        self._max_queued = max_queued
        self._cleanup_timeout = cleanup_timeout
        self._queue: deque[Action] | None = None
        self._queue_full = False
        self._runner: asyncio.Task[None] | None = None
        self._expiry: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            limits.auth_timeout, self._tick, context=_TIMERS
        )

    def start(self, token: str | None) -> None:
        """Check the token the upgrade request carried, if any."""
        if token is not None:
            self.session.verifying = True
            self._enqueue(Verify(token, None))

    # ------------------------------------------------------------------ from the connection

    def receive_text(self, data: bytes, now: float) -> None:
        self.session.receive_text(data, now)

    def receive_binary(self, now: float) -> None:
        self.session.receive_binary(now)

    def closing(self, drop_waiting: bool) -> None:
        """The socket is closing: it watches nothing any more, and on a close of the
        server's (`drop_waiting`) the commands still waiting are dropped."""
        if drop_waiting and self._queue:
            self._queue.clear()
        self._leave_all()

    def connection_lost(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        self._leave_all()
        if self._runner is not None:
            self.hub.spawn(self._cleanup())
        else:
            self._release()

    # ------------------------------------------------------------------ actions

    def act(self) -> None:
        """Carry out the session's actions in order. Replies happen now unless a command
        is running; a command or a token check (and whatever follows it) goes to the runner
        task. A close happens at once: the commands waiting are dropped, the replies sent."""
        for action in self.session.actions():
            if isinstance(action, Close):
                for waiting in self._queue or ():
                    if isinstance(waiting, Reply):
                        self.conn.push_frame(waiting.frame)
                self.conn.close(action.code, action.reason)
                return
            if self._queue is None and isinstance(action, Reply):
                self.conn.push_frame(action.frame)
            else:
                self._enqueue(action)

    def _enqueue(self, action: Action) -> None:
        if self._queue is None:
            self._queue = deque((action,))
            self._runner = asyncio.get_running_loop().create_task(self._run())
        else:
            self._queue.append(action)
        if len(self._queue) > self._max_queued and not self._queue_full:
            self._queue_full = True
            self.conn.hold_reading(True)

    async def _run(self) -> None:
        """Commands the client sent before a close of its own (or before its connection
        dropped) still run; a close of the server's empties the queue."""
        queue = self._queue
        assert queue is not None
        conn = self.conn
        logs.SESSION.set(self.id)
        try:
            while queue and not conn.released:
                await self._carry_out(queue.popleft())
                self.act()
                if self._queue_full and len(queue) <= self._max_queued // 2:
                    self._queue_full = False
                    conn.hold_reading(False)
        finally:
            self._queue = None
            self._runner = None
            if self._queue_full:
                self._queue_full = False
                conn.hold_reading(False)

    async def _carry_out(self, action: Action) -> None:
        if isinstance(action, Reply):
            self.conn.push_frame(action.frame)
        elif isinstance(action, Close):
            self.conn.close(action.code, action.reason)
        elif isinstance(action, Verify):
            await self._verify(action.token, action.ref)
        elif isinstance(action, Command):
            await self._command(action.frame)

    # ------------------------------------------------------------------ authentication

    async def _verify(self, token: str, ref: str | None) -> None:
        session = self.session
        try:
            principal = await self.hub.verifier.verify(token)
        except AuthError as exc:
            metrics.AUTH_FAILURES.labels("expired" if "expired" in str(exc) else "invalid").inc()
            session.auth_failed(str(exc))
            return
        self.principal = principal
        if session.authenticated(principal.user, principal.expires_at, ref):
            await self._ready(principal, ref)
        self._schedule_expiry()

    async def _ready(self, principal: Principal, ref: str | None) -> None:
        hub = self.hub
        session = self.session
        user = principal.user
        if not await self._connect_hook(principal):
            return
        try:
            admitted = await hub.presence.admit(user)
        except (RedisError, OSError) as exc:
            log.warning("cannot admit a socket: %s", exc)
            session.close(CloseCode.TRY_AGAIN_LATER, "Redis is unavailable")
            return
        if self.conn.released:  # the socket went while Redis answered: give the place back
            if admitted:
                hub.presence.leave(user)
            return
        if not admitted:
            session.close(CloseCode.TOO_MANY, "too many connections for this user")
            return
        self.registered = True
        hub.watch_user(user, self.conn)
        budget = await hub.conversations.budget(user, principal.group)
        self.conn.push_frame(hub.ready_frame(principal, self.id, ref, budget))

    async def _connect_hook(self, principal: Principal) -> bool:
        """Ask the host application's connect hook, if any, whether the socket may stay;
        what it attaches goes with the socket's turns (docs/hooks.md)."""
        url = self.hub.settings.hooks.connect_url
        if not url or self.hub.hooks is None:
            return True
        payload = {
            "type": "connect",
            "user": principal.user,
            "expires_at": principal.expires_at,
            "socket": self.id,
            "claims": principal.claims or {},
        }
        reply = await self.hub.hooks.decide(url, payload)
        if not reply.allow:
            reason = (reply.message or "refused by the application").encode()[:100]
            self.session.close(CloseCode.REFUSED, reason.decode(errors="ignore"))
            return False
        self.hook_data = reply.data
        return True

    def _schedule_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self.conn.closing:
            return
        deadline = self.session.token_deadline()
        if deadline is not None:
            delay = max(deadline - time.time(), 0.0) + 0.01
            self._expiry = asyncio.get_running_loop().call_later(delay, self._tick, context=_TIMERS)

    def _tick(self) -> None:
        """The auth window may have run out, or the token be due a `refresh` hint or have
        run out past its grace (the session decides which). Timers can fire a little early
        (uvloop's clock counts milliseconds), so a window not yet over is checked again."""
        self._expiry = None
        session = self.session
        session.tick(time.monotonic(), time.time())
        self.act()
        if self.conn.closing or self._expiry is not None:
            return
        if session.state is State.AWAITING_AUTH:
            self._expiry = asyncio.get_running_loop().call_later(
                RECHECK, self._tick, context=_TIMERS
            )
        elif session.state is State.READY:
            self._schedule_expiry()

    # ------------------------------------------------------------------ commands

    async def _command(self, frame: f.ClientFrame) -> None:
        user = self.session.user if self.session else None
        assert user is not None
        conversation = getattr(frame, "conversation", None)
        logs.CONVERSATION.set(None if conversation is None else str(conversation))
        try:
            reply = await self._execute(user, frame)
        except Exception as exc:  # a request's own fault, an outage or a bug: see failures
            refused = refusal(exc, f"`{type(frame).__struct_config__.tag}` frame")
            if isinstance(exc, RedisError):
                metrics.REDIS_ERRORS.labels("socket").inc()
            reply = f.Error(
                code=refused.code,
                message=refused.message,
                retry_after=refused.retry_after,
                ref=frame.ref,
                resets_at=refused.resets_at,
                remaining=refused.remaining,
            )
        if reply is not None:
            self.conn.push_frame(reply)

    @property
    def _group(self) -> str:
        """The user's budget group, from the token in force."""
        return "" if self.principal is None else self.principal.group

    async def _execute(self, user: str, frame: f.ClientFrame) -> f.ServerFrame | None:
        conversations = self.hub.conversations
        if isinstance(frame, f.Join):
            await self._join(user, frame)
            return None
        if isinstance(frame, f.Say):
            message_id, duplicate = await conversations.say(
                user, frame.conversation, frame.text, frame.id, self.hook_data, self._group
            )
            return f.Ack(message_id=message_id, duplicate=duplicate, ref=frame.ref)
        if isinstance(frame, f.Leave):
            self._leave(frame.conversation)
            return f.Ack(ref=frame.ref)
        if isinstance(frame, f.Cancel):
            await conversations.cancel(user, frame.conversation)
            return f.Ack(ref=frame.ref)
        if isinstance(frame, f.Regenerate):
            message_id = await conversations.regenerate(
                user, frame.conversation, self.hook_data, self._group
            )
            return f.Ack(message_id=message_id, ref=frame.ref)
        if isinstance(frame, f.Approve | f.Deny):
            decision: Decision = "approve" if isinstance(frame, f.Approve) else "deny"
            answer = await conversations.answer(
                user, frame.conversation, frame.call_id, decision, frame.reason
            )
            return f.Ack(approval=answer, ref=frame.ref)
        if isinstance(frame, f.Create):
            meta = await conversations.create(
                user, frame.title, frame.system, frame.model, self._group, tools=frame.tools
            )
            return f.Created(conversation=meta.id, meta=meta, ref=frame.ref)
        if isinstance(frame, f.Update):
            await conversations.update(
                user,
                frame.conversation,
                title=frame.title,
                system=frame.system,
                model=frame.model,
                group=self._group,
                tools=frame.tools,
            )
            return f.Ack(ref=frame.ref)
        raise Refused("bad_frame", "unsupported frame")

    async def _join(self, user: str, frame: f.Join) -> None:
        """Subscribe, then read what the socket is owed (the ownership checked in the same
        read): live frames arriving meanwhile wait in the watch's cursor, so none is lost
        and none reaches a socket whose join is refused."""
        conversation = frame.conversation
        hub = self.hub
        if conversation not in self.watches and len(self.watches) >= hub.wire_limits.max_joined:
            raise Refused(
                "invalid",
                f"a socket may join at most {hub.wire_limits.max_joined} conversations",
            )
        old = self.watches.pop(conversation, None)
        watch = Watch(self.conn, conversation, hub.conversations, user, hub.spawn)
        self.watches[conversation] = watch
        try:
            try:
                await hub.bus.subscribe(keys.channel(conversation), watch)
            finally:
                if old is not None:  # unsubscribed only now, so the channel never lacks one
                    old.active = False
                    hub.bus.unsubscribe(keys.channel(conversation), old)
            await watch.join(frame.after, frame.ref)
        except BaseException:
            if self.watches.get(conversation) is watch:
                self._leave(conversation, counted=old is not None)
            elif old is None and hub.rooms is not None:  # the socket's end counted it out
                hub.rooms.joined(conversation, user)
            raise
        if old is None and hub.rooms is not None:
            hub.rooms.joined(conversation, user)
        if self.conn.released:  # the socket went meanwhile; nothing else will unsubscribe it
            self._leave(conversation)

    def _leave(self, conversation: uuid.UUID, counted: bool = True) -> None:
        """Stop watching `conversation`; `counted`: its join was counted in `rooms`."""
        watch = self.watches.pop(conversation, None)
        if watch is not None:
            watch.active = False
            if counted and self.hub.rooms is not None:
                self.hub.rooms.left(conversation, watch.user)
            self.hub.bus.unsubscribe(keys.channel(conversation), watch)

    def _leave_all(self) -> None:
        for conversation in tuple(self.watches):
            self._leave(conversation)

    # ------------------------------------------------------------------ release

    async def _cleanup(self) -> None:
        """Let a command still in flight when the TCP connection went finish first."""
        try:
            if self._runner is not None:
                await asyncio.wait([self._runner], timeout=self._cleanup_timeout)
        finally:
            self._leave_all()
            self._release()

    def _release(self) -> None:
        """Give back the socket's user subscription and its place in the user's count."""
        user = self.session.user
        if user is not None and self.registered:
            self.registered = False
            self.hub.unwatch_user(user, self.conn)
            self.hub.presence.leave(user)
        self.conn.release()
