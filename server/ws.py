"""The socket pump: one WebSocket connection from handshake to close.

The reader loop feeds what arrives to the sans-I/O `Session` and carries out its actions in
order; a writer task drains the socket's bounded `Outbox`. Live conversation frames come from
the process's one pub/sub connection (`Bus`) through a `Watch` per joined conversation, whose
`Cursor` puts them in seq order with what is read from the event log, so every socket gets
each event exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import msgspec
from redis.exceptions import RedisError

from protocol import frames as f
from protocol import keys
from protocol.outbox import Outbox
from protocol.resume import Cursor, Outcome, Verdict
from protocol.session import (
    Close,
    CloseCode,
    Command,
    Reply,
    Session,
    SessionLimits,
    State,
    Verify,
)
from server.auth import AuthError, Principal, Verifier
from server.bus import Bus, BusUnavailable
from server.chat import Chat, Refused
from server.config import Settings
from server.presence import Presence

log = logging.getLogger("parley.ws")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

CATCH_UP_ATTEMPTS = 5
CLOSE_FLUSH_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class _Admitted:
    token: str | None


class Hub:
    """What every socket of this process shares, and the list of open sockets."""

    def __init__(
        self, settings: Settings, chat: Chat, bus: Bus, verifier: Verifier, presence: Presence
    ) -> None:
        self.settings = settings
        self.chat = chat
        self.bus = bus
        self.verifier = verifier
        self.presence = presence
        self.connections: set[Connection] = set()
        self.accepting = True
        self.limits = SessionLimits(
            max_text_chars=settings.limits.max_text_chars,
            frames_per_second=settings.limits.frames_per_second,
            frame_burst=settings.limits.frame_burst,
            bad_frames_before_close=settings.limits.bad_frames_before_close,
            auth_timeout=settings.auth.auth_timeout,
        )
        self.wire_limits = settings.limits.wire()

    async def close_all(self, code: CloseCode, reason: str) -> None:
        self.accepting = False
        for conn in tuple(self.connections):
            conn.close(code, reason)
        deadline = time.monotonic() + self.settings.server.shutdown_grace
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    # ------------------------------------------------------------------ handshake

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        event = await receive()
        if event["type"] != "websocket.connect":
            return
        admitted = await self._handshake(scope, send)
        if admitted is None:
            return
        conn = Connection(self, send)
        self.connections.add(conn)
        try:
            await conn.run(receive, admitted.token)
        finally:
            self.connections.discard(conn)

    async def _handshake(self, scope: Scope, send: Send) -> _Admitted | None:
        """Accept or refuse the upgrade; a separate frame so that nothing of the request
        (headers and all) stays referenced for the socket's lifetime."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if not self.accepting:
            await send({"type": "websocket.close", "code": CloseCode.RESTART})
            return None
        if not self._origin_allowed(headers):
            await _deny(send, 403, b"Origin not allowed")
            return None
        offered = [p.strip() for p in scope.get("subprotocols", [])]
        token = self._header_token(offered) or self._query_token(scope)
        subprotocol = f.SUBPROTOCOL if f.SUBPROTOCOL in offered else None
        await send({"type": "websocket.accept", "subprotocol": subprotocol})
        return _Admitted(token)

    def _origin_allowed(self, headers: dict[str, str]) -> bool:
        origin = headers.get("origin")
        if origin is None or origin in self.settings.server.allowed_origins:
            return True
        return urlsplit(origin).netloc == headers.get("host")

    @staticmethod
    def _header_token(offered: list[str]) -> str | None:
        for proto in offered:
            if proto.startswith(f.BEARER_PREFIX):
                return proto[len(f.BEARER_PREFIX) :]
        return None

    def _query_token(self, scope: Scope) -> str | None:
        if not self.settings.auth.allow_query_token:
            return None
        values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
        return values[0] if values else None


def can_send_now(send: Send) -> bool:
    """True for uvicorn's sans-I/O WebSocket protocol, whose `send` has one suspension point,
    waiting for the transport to be writable, and nothing before it."""
    owner = getattr(send, "__self__", None)
    return type(owner).__name__ == "WebSocketsSansIOProtocol"


def send_now(send: Send, message: MutableMapping[str, Any]) -> bool:
    """Run `send` to completion without the event loop when it does not need to wait.

    Returns False, having sent nothing, when the transport is not writable: the caller then
    queues the frame for its writer task. Saves a task switch per frame per socket, which is
    most of the fan-out cost when one token goes to many sockets.
    """
    coro = cast(Coroutine[Any, Any, None], send(message))
    try:
        coro.send(None)
    except StopIteration:
        return True
    coro.close()
    return False


async def _deny(send: Send, status: int, body: bytes) -> None:
    """Refuse the upgrade with a plain HTTP response (ASGI websocket denial response)."""
    await send(
        {
            "type": "websocket.http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    await send({"type": "websocket.http.response.body", "body": body})


class Connection:
    __slots__ = (
        "_closer",
        "_direct",
        "_expiry_timer",
        "_send",
        "_writer",
        "closing",
        "hub",
        "id",
        "outbox",
        "registered",
        "session",
        "watches",
    )

    def __init__(self, hub: Hub, send: Send) -> None:
        self.hub = hub
        self.id = secrets.token_hex(8)
        self._send = send
        self.session = Session(hub.limits, time.monotonic())
        limit = hub.settings.limits.outbox_bytes
        self.outbox = Outbox(limit, merge_after=min(65_536, limit // 4))
        self.watches: dict[uuid.UUID, Watch] = {}
        self.closing = False
        self.registered = False
        self._direct = can_send_now(send)
        self._writer: asyncio.Task[None] | None = None
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._closer: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ main loop

    async def run(self, receive: Receive, header_token: str | None) -> None:
        loop = asyncio.get_running_loop()
        self._expiry_timer = loop.call_later(self.hub.settings.auth.auth_timeout, self._tick)
        try:
            if header_token is not None:
                self.session.verifying = True
                await self._verify(header_token, None)
            while not self.closing:
                event = await receive()
                kind = event["type"]
                if kind == "websocket.disconnect":
                    break
                if kind != "websocket.receive":
                    continue
                now = time.monotonic()
                text = event.get("text")
                if text is not None:
                    self.session.receive_text(text, now)
                else:
                    self.session.receive_binary(now)
                await self._act()
        finally:
            await self._cleanup()

    async def _act(self) -> None:
        for action in self.session.actions():
            if isinstance(action, Reply):
                self.push(f.encode(action.frame).decode())
            elif isinstance(action, Command):
                await self._command(action.frame)
            elif isinstance(action, Verify):
                await self._verify(action.token, action.ref)
            elif isinstance(action, Close):
                self.close(action.code, action.reason)

    async def _verify(self, token: str, ref: str | None) -> None:
        try:
            principal = self.hub.verifier.verify(token)
        except AuthError as exc:
            self.session.auth_failed(str(exc))
            await self._act()
            return
        if self.session.authenticated(principal.user, principal.expires_at, ref):
            await self._ready(principal, ref)
        self._schedule_expiry()
        await self._act()

    async def _ready(self, principal: Principal, ref: str | None) -> None:
        user = principal.user
        try:
            admitted = await self.hub.presence.admit(
                user, self.hub.settings.limits.max_connections_per_user
            )
        except (RedisError, OSError) as exc:
            log.warning("cannot admit a socket: %s", exc)
            self.session.close(CloseCode.TRY_AGAIN_LATER, "Redis is unavailable")
            return
        if not admitted:
            self.session.close(CloseCode.TOO_MANY, "too many connections for this user")
            return
        self.registered = True
        with contextlib.suppress(BusUnavailable):
            await self.hub.bus.subscribe(keys.user_channel(user), self)
        settings = self.hub.settings
        self.push_frame(
            f.Ready(
                user=user,
                session=self.id,
                limits=self.hub.wire_limits,
                model=settings.llm.model,
                simulated=settings.simulated,
                expires_at=None if principal.expires_at is None else int(principal.expires_at),
                ref=ref,
            )
        )

    def _schedule_expiry(self) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        expires_at = self.session.expires_at
        if expires_at is not None and self.session.state is State.READY:
            delay = max(expires_at - time.time(), 0.0)
            self._expiry_timer = asyncio.get_running_loop().call_later(delay + 0.01, self._tick)

    def _tick(self) -> None:
        self.session.tick(time.monotonic(), time.time())
        for action in self.session.actions():
            if isinstance(action, Close):
                self.close(action.code, action.reason)

    # ------------------------------------------------------------------ commands

    async def _command(self, frame: f.ClientFrame) -> None:
        user = self.session.user
        assert user is not None
        try:
            reply = await self._execute(user, frame)
        except Refused as exc:
            reply = f.Error(
                code=exc.code, message=exc.message, retry_after=exc.retry_after, ref=frame.ref
            )
        except (RedisError, OSError, BusUnavailable):
            log.warning("backing service unavailable for %s", type(frame).__name__)
            reply = f.Error(
                code="unavailable",
                message="a backing service is unavailable; try again",
                ref=frame.ref,
            )
        except Exception:
            log.exception("internal error handling %s", type(frame).__name__)
            reply = f.Error(code="internal", message="internal error", ref=frame.ref)
        if reply is not None:
            self.push_frame(reply)

    async def _execute(self, user: str, frame: f.ClientFrame) -> f.ServerFrame | None:
        chat = self.hub.chat
        if isinstance(frame, f.Join):
            await self._join(user, frame)
            return None
        if isinstance(frame, f.Say):
            message_id, duplicate = await chat.say(user, frame.conversation, frame.text, frame.id)
            return f.Ack(message_id=message_id, duplicate=duplicate, ref=frame.ref)
        if isinstance(frame, f.Leave):
            self._leave(frame.conversation)
            return f.Ack(ref=frame.ref)
        if isinstance(frame, f.Cancel):
            await chat.cancel(user, frame.conversation)
            return f.Ack(ref=frame.ref)
        if isinstance(frame, f.Regenerate):
            message_id = await chat.regenerate(user, frame.conversation)
            return f.Ack(message_id=message_id, ref=frame.ref)
        if isinstance(frame, f.Create):
            meta = await chat.create(user, frame.title, frame.system, frame.model)
            return f.Created(conversation=meta.id, meta=meta, ref=frame.ref)
        raise Refused("bad_frame", "unsupported frame")

    async def _join(self, user: str, frame: f.Join) -> None:
        conversation = frame.conversation
        meta = await self.hub.chat.owned(user, conversation)
        if (
            conversation not in self.watches
            and len(self.watches) >= self.hub.wire_limits.max_joined
        ):
            raise Refused(
                "invalid",
                f"a socket may join at most {self.hub.wire_limits.max_joined} conversations",
            )
        old = self.watches.pop(conversation, None)
        watch = Watch(self, conversation)
        self.watches[conversation] = watch
        try:
            await self.hub.bus.subscribe(keys.channel(conversation), watch)
        finally:
            if old is not None:  # unsubscribed only now, so the channel never lacks a listener
                old.active = False
                self.hub.bus.unsubscribe(keys.channel(conversation), old)
        try:
            await watch.join(meta, frame.after, frame.ref)
        except BaseException:
            self._leave(conversation)
            raise

    def _leave(self, conversation: uuid.UUID) -> None:
        watch = self.watches.pop(conversation, None)
        if watch is not None:
            watch.active = False
            self.hub.bus.unsubscribe(keys.channel(conversation), watch)

    # ------------------------------------------------------------------ user channel listener

    def on_event(self, seq: int, frame: str) -> None:
        self.push(frame)

    def resync(self) -> None:
        """conversation_changed frames are advisory; a client re-lists on reconnect."""

    # ------------------------------------------------------------------ output

    def push_frame(self, frame: f.ServerFrame) -> None:
        self.push(f.encode(frame).decode())

    def push(self, frame: str) -> None:
        """Send now if the socket can take it, else queue it for the writer task."""
        if self.closing:
            return
        if not self.outbox and self._writer is None and self._direct:
            try:
                if send_now(self._send, {"type": "websocket.send", "text": frame}):
                    return
            except Exception:
                self.closing = True
                return
        if not self.outbox.push(frame):
            self.close(CloseCode.TRY_AGAIN_LATER, "client reads too slowly")
            return
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write())

    def close(self, code: CloseCode, reason: str) -> None:
        """Stop taking frames and close. What is queued is still sent first (an error frame
        explaining the close, say) unless the socket is being closed for reading too slowly."""
        if self.closing:
            return
        self.closing = True
        if code == CloseCode.TRY_AGAIN_LATER:
            self.outbox.drain()
        for conversation in tuple(self.watches):
            self._leave(conversation)
        self._closer = asyncio.get_running_loop().create_task(self._send_close(code, reason))

    async def _send_close(self, code: CloseCode, reason: str) -> None:
        writer = self._writer
        if writer is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(writer), CLOSE_FLUSH_TIMEOUT)
            writer.cancel()
        with contextlib.suppress(Exception):
            await self._send({"type": "websocket.close", "code": int(code), "reason": reason})

    async def _write(self) -> None:
        """Drain the backlog, then end: an idle socket has no writer task."""
        send = self._send
        try:
            while self.outbox:
                for frame in self.outbox.drain():
                    await send({"type": "websocket.send", "text": frame})
        except asyncio.CancelledError:
            raise
        except Exception:
            self.closing = True
        finally:
            self._writer = None

    async def _cleanup(self) -> None:
        self.closing = True
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        for conversation in tuple(self.watches):
            self._leave(conversation)
        user = self.session.user
        if user is not None and self.registered:
            self.hub.bus.unsubscribe(keys.user_channel(user), self)
            with contextlib.suppress(RedisError, OSError):
                await self.hub.presence.leave(user)
        if self._closer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._closer, CLOSE_FLUSH_TIMEOUT + 1)
        if self._writer is not None:
            self._writer.cancel()


class Watch:
    """One socket watching one conversation: a bus listener with a seq cursor."""

    __slots__ = ("active", "catching_up", "conn", "conversation", "cursor")

    def __init__(self, conn: Connection, conversation: uuid.UUID) -> None:
        self.conn = conn
        self.conversation = conversation
        self.cursor = Cursor()
        self.active = True
        self.catching_up = False

    def on_event(self, seq: int, frame: str) -> None:
        verdict = self.cursor.live(seq, frame)
        if verdict is Verdict.SEND:
            self.conn.push(frame)
        elif verdict is Verdict.GAP:
            self._start_catch_up()

    def resync(self) -> None:
        self.cursor.catching_up = True
        self._start_catch_up()

    def _start_catch_up(self) -> None:
        if not self.catching_up:
            self.catching_up = True
            asyncio.get_running_loop().create_task(self._catch_up_task())

    async def _catch_up_task(self) -> None:
        try:
            await self.catch_up()
        except (RedisError, OSError, Refused) as exc:
            log.warning("catch-up failed for %s: %s", self.conversation, exc)
            self.conn.close(CloseCode.TRY_AGAIN_LATER, "lost track of the conversation; rejoin")
        finally:
            self.catching_up = False

    async def join(self, meta: f.Conversation, after: int | None, ref: str | None) -> None:
        """Send `joined` and the events after `after`, or the full history when `after` is
        absent or its events are no longer retained (then with `reset`)."""
        if after is None:
            await self._send_history(meta, ref, reset=False)
            return
        self.cursor.start_at(after)
        head, logged = await self.conn.hub.chat.read_events(self.conversation, after)
        result = self.cursor.catch_up(logged, head)
        if result.outcome is Outcome.RESET:
            await self._send_history(meta, ref, reset=True)
            return
        self._send_joined(meta, head, after, None, False, ref, result.frames)
        if result.outcome is Outcome.AGAIN:
            self._start_catch_up()

    async def catch_up(self) -> None:
        """Fill a gap from the log; when the log no longer has it, send the full history."""
        chat = self.conn.hub.chat
        for _ in range(CATCH_UP_ATTEMPTS):
            if not self.active:
                return
            head, logged = await chat.read_events(self.conversation, self.cursor.last_seq)
            result = self.cursor.catch_up(logged, head)
            for frame in result.frames:
                self.conn.push(frame)
            if result.outcome is Outcome.LIVE:
                return
            if result.outcome is Outcome.RESET:
                meta = await chat.owned(self.conn.session.user or "", self.conversation)
                await self._send_history(meta, None, reset=True)
                return
            await asyncio.sleep(0.05)
        raise Refused("unavailable", "could not catch up with the conversation")

    async def _send_history(self, meta: f.Conversation, ref: str | None, reset: bool) -> None:
        chat = self.conn.hub.chat
        start, history = await chat.history(self.conversation)
        self.cursor.reset()
        self.cursor.start_at(start)
        head, logged = await chat.read_events(self.conversation, start)
        result = self.cursor.catch_up(logged, head)
        self._send_joined(meta, head, start, history, reset, ref, result.frames)

    def _send_joined(
        self,
        meta: f.Conversation,
        head: int,
        start: int,
        history: list[f.Message] | None,
        reset: bool,
        ref: str | None,
        frames: list[str],
    ) -> None:
        meta = msgspec.structs.replace(meta, last_seq=max(head, 0))
        self.conn.push_frame(
            f.Joined(
                conversation=self.conversation,
                meta=meta,
                last_seq=start,
                history=history,
                reset=reset,
                ref=ref,
            )
        )
        for frame in frames:
            self.conn.push(frame)
