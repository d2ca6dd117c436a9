"""The socket: one WebSocket connection, from the upgrade request to the close.

uvicorn parses HTTP; a request that asks for an upgrade is handed, transport and all, to a
`Connection` (an asyncio Protocol made by `Entrance`). It answers the opening handshake
(`protocol.handshake`), then parses frames with `websockets`' sans-I/O `ServerProtocol`,
which also answers pings and the closing handshake. Nothing waits on an idle socket: no task,
no queue. What a client sends goes through the sans-I/O `Session`, whose actions are carried
out in order; those that need Redis or PostgreSQL run on a task made for the purpose, which
ends when they are done.

Frames to the client go to the transport at the end of the loop iteration that produced
them (`Hub.mark_dirty`), all of a socket's in one write. A published event arrives already
framed (`protocol.wsframe`, once per process however many tabs watch), so a socket costs an
append of a shared bytes object per event and a write per batch. When the client reads slower
than events arrive, the transport pauses the protocol and frames wait in the socket's bounded
`Outbox` until it resumes; past the bound the socket is closed with 1013.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any, Final, cast

from redis.exceptions import RedisError
from websockets.frames import Frame, Opcode
from websockets.protocol import State as WsState
from websockets.server import ServerProtocol

from protocol import frames as f
from protocol import keys, wsframe
from protocol.handshake import Refusal, RequestParser, UpgradeRequest, accept, refuse
from protocol.outbox import Outbox
from protocol.session import Action, Close, CloseCode, Command, Reply, Session, State, Verify
from server.auth import AuthError, Principal
from server.bus import BusUnavailable
from server.chat import Refused
from server.edge import BoundedHttp, EdgeLimits
from server.hub import PATH, Hub
from server.watch import Watch

log = logging.getLogger("parley.ws")

CLOSE_TIMEOUT: Final = 5.0
"""After sending a close frame, how long the client has to answer before the TCP connection
is cut (it may have stopped reading)."""
SOCKET_REQUEST: Final = b"GET " + PATH.encode()
RECHECK: Final = 0.02
"""How soon an auth window that a timer found not quite over is checked again."""
MAX_QUEUED: Final = 32
"""Actions waiting behind a running command before the socket stops reading."""


class Entrance:
    """uvicorn's two protocol classes in a web process. `http` takes every accepted
    connection (see `FrontDoor`); `ws` takes an upgrade request that reached uvicorn's HTTP
    layer, one that came after other requests on a kept-alive connection. The hub exists
    once the app's lifespan has started, before uvicorn takes connections."""

    def __init__(self, hub: Callable[[], Hub | None], limits: EdgeLimits) -> None:
        self.hub = hub
        self.limits = limits

    def http(self, **uvicorn_args: Any) -> FrontDoor:
        return FrontDoor(self.hub, self.limits, uvicorn_args)

    def ws(self, **_: Any) -> Connection:
        hub = self.hub()
        if hub is None:
            raise RuntimeError("a socket arrived before the web process started")
        return Connection(hub)


class FrontDoor(asyncio.Protocol):
    """A new connection, until its first bytes say what it is: a request for `/ws` makes it
    a socket at once, with no HTTP layer before the WebSocket one (uvicorn's request parsing
    and its hand-over cost a seventh of a connection's set-up); anything else goes to
    uvicorn's httptools protocol, bounded (`server.edge.BoundedHttp`), as if it had had the
    connection from the start: the request's deadline counts from the connection's opening."""

    __slots__ = ("_head", "_hub", "_limits", "_timer", "_transport", "_uvicorn_args")

    def __init__(
        self, hub: Callable[[], Hub | None], limits: EdgeLimits, uvicorn_args: dict[str, Any]
    ) -> None:
        self._hub = hub
        self._limits = limits
        self._uvicorn_args = uvicorn_args
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._limits.request_timeout, self._transport.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def data_received(self, data: bytes) -> None:
        head = self._head + data
        if len(head) < len(SOCKET_REQUEST) + 1 and (SOCKET_REQUEST + b" ").startswith(head):
            self._head = head
            return
        hub = self._hub()
        protocol: asyncio.Protocol
        after = head[len(SOCKET_REQUEST) : len(SOCKET_REQUEST) + 1]
        timer = self._timer
        assert timer is not None
        timer.cancel()
        if hub is not None and head.startswith(SOCKET_REQUEST) and after in (b" ", b"?"):
            protocol = Connection(hub)
        else:
            protocol = BoundedHttp(self._limits, timer.when(), **self._uvicorn_args)
        transport = self._transport
        assert transport is not None
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(head)


class Connection(asyncio.Protocol):
    __slots__ = (
        "_closer",
        "_expiry",
        "_fragments",
        "_handshake",
        "_pending",
        "_queue",
        "_queue_full",
        "_runner",
        "closing",
        "hub",
        "id",
        "last_seen",
        "outbox",
        "paused",
        "reading_paused",
        "registered",
        "released",
        "session",
        "transport",
        "watches",
        "ws",
    )

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._handshake: RequestParser | None = RequestParser()
        self.ws: ServerProtocol | None = None
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.id = ""
        self.watches: dict[uuid.UUID, Watch] = {}
        self.outbox: Outbox | None = None
        self.closing = False
        self.registered = False
        self.released = False
        self.paused = False
        self.reading_paused = False
        self.last_seen = 0.0
        self._fragments: tuple[Opcode, list[bytes]] | None = None
        self._pending: list[bytes] | None = None
        self._queue: deque[Action] | None = None
        self._queue_full = False
        self._runner: asyncio.Task[None] | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._closer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        loop = asyncio.get_running_loop()
        timeout = self.hub.settings.server.request_timeout  # the whole upgrade request
        self._expiry = loop.call_later(timeout, self._handshake_expired)

    def data_received(self, data: bytes) -> None:
        try:
            if self.ws is None:
                self._handshake_received(data)
            else:
                self._frames_received(data)
        except Exception:
            log.exception("a socket failed; closing it")
            self.close(CloseCode.INTERNAL, "internal error")

    def _frames_received(self, data: bytes) -> None:
        ws = self.ws
        assert ws is not None
        ws.receive_data(data)
        self.last_seen = time.monotonic()
        for event in ws.events_received():
            if isinstance(event, Frame):
                self._frame(event)
        self._act()  # before a close the client sent takes effect: what came first counts
        self._flush_ws()

    def eof_received(self) -> bool | None:
        if self.ws is not None:
            self.ws.receive_eof()
            self._flush_ws()
        return None

    def pause_writing(self) -> None:
        self.paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.outbox and self.transport is not None and not self.closing:
            self.transport.writelines(self.outbox.drain())
        self._update_reading()

    def _update_reading(self) -> None:
        """Read nothing while the client does not read (pongs would pile up in the
        transport) or while too many of its frames wait for a command; read again to get
        the client's answer to a close."""
        transport = self.transport
        if transport is None:
            return
        stop = (self.paused or self._queue_full) and not self.closing
        if stop != self.reading_paused:
            self.reading_paused = stop
            if stop:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.transport = None
        for timer in (self._expiry, self._closer):
            if timer is not None:
                timer.cancel()
        self._leave_all()
        if self.session is None:
            return
        if self._runner is not None:
            self.hub.spawn(self._cleanup())
        else:
            self._release()

    # ------------------------------------------------------------------ handshake

    def _handshake_received(self, data: bytes) -> None:
        parser = self._handshake
        if parser is None or self.transport is None:
            return
        try:
            request = parser.feed(data)
            if request is None:
                return
            self._handshake = None
            self._upgrade(request)
        except Refusal as refusal:
            self._handshake = None
            self.transport.write(refuse(refusal.status, refusal.text))
            self._shut()
            return
        if parser.rest:
            self._frames_received(parser.rest)

    def _handshake_expired(self) -> None:
        self._expiry = None
        if self.session is None and self.transport is not None:
            self.drop()

    def _upgrade(self, request: UpgradeRequest) -> None:
        hub = self.hub
        assert self.transport is not None
        hub.check_upgrade(request, self.transport)
        offered = request.subprotocols
        subprotocol = f.SUBPROTOCOL if f.SUBPROTOCOL in offered else None
        self.transport.write(accept(request, subprotocol))
        self.ws = ServerProtocol(state=WsState.OPEN, max_size=hub.settings.limits.max_frame_bytes)
        now = time.monotonic()
        self.id = secrets.token_hex(8)
        self.session = Session(hub.limits, now)
        self.last_seen = now
        hub.connections.add(self)
        loop = asyncio.get_running_loop()
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry = loop.call_later(hub.settings.auth.auth_timeout, self._tick)
        token = _bearer_token(offered) or hub.query_token(request)
        if token is not None:
            self.session.verifying = True
            self._enqueue(Verify(token, None))

    # ------------------------------------------------------------------ frames in

    def _frame(self, frame: Frame) -> None:
        """Reassemble fragmented messages (browsers never fragment; `max_size` bounds the
        whole message)."""
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                self._message(opcode, frame.data)
            else:
                self._fragments = (opcode, [bytes(frame.data)])
        elif opcode is Opcode.CONT and self._fragments is not None:
            self._fragments[1].append(bytes(frame.data))
            if frame.fin:
                (first, parts), self._fragments = self._fragments, None
                self._message(first, b"".join(parts))

    def _message(self, opcode: Opcode, data: bytes | bytearray | memoryview) -> None:
        session = self.session
        assert session is not None
        now = time.monotonic()
        if opcode is Opcode.TEXT:
            session.receive_text(bytes(data), now)
        else:
            session.receive_binary(now)

    # ------------------------------------------------------------------ actions

    def _act(self) -> None:
        """Carry out the session's actions in order. Replies happen now unless a command
        is running; a command or a token check (and whatever follows it) goes to the runner
        task. A close happens at once: the commands waiting are dropped, the replies sent."""
        session = self.session
        if session is None:
            return
        for action in session.actions():
            if isinstance(action, Close):
                for waiting in self._queue or ():
                    if isinstance(waiting, Reply):
                        self.push_frame(waiting.frame)
                self.close(action.code, action.reason)
                return
            if self._queue is None and isinstance(action, Reply):
                self.push_frame(action.frame)
            else:
                self._enqueue(action)

    def _enqueue(self, action: Action) -> None:
        if self._queue is None:
            self._queue = deque((action,))
            self._runner = asyncio.get_running_loop().create_task(self._run())
        else:
            self._queue.append(action)
        if len(self._queue) > MAX_QUEUED and not self._queue_full:
            self._queue_full = True
            self._update_reading()

    async def _run(self) -> None:
        """Commands the client sent before a close of its own (or before its connection
        dropped) still run; a close of the server's empties the queue."""
        queue = self._queue
        assert queue is not None
        try:
            while queue and not self.released:
                await self._carry_out(queue.popleft())
                self._act()
                if self._queue_full and len(queue) <= MAX_QUEUED // 2:
                    self._queue_full = False
                    self._update_reading()
        finally:
            self._queue = None
            self._runner = None
            if self._queue_full:
                self._queue_full = False
                self._update_reading()

    async def _carry_out(self, action: Action) -> None:
        if isinstance(action, Reply):
            self.push_frame(action.frame)
        elif isinstance(action, Close):
            self.close(action.code, action.reason)
        elif isinstance(action, Verify):
            await self._verify(action.token, action.ref)
        elif isinstance(action, Command):
            await self._command(action.frame)

    async def _verify(self, token: str, ref: str | None) -> None:
        session = self.session
        assert session is not None
        try:
            principal = self.hub.verifier.verify(token)
        except AuthError as exc:
            session.auth_failed(str(exc))
            return
        if session.authenticated(principal.user, principal.expires_at, ref):
            await self._ready(principal, ref)
        self._schedule_expiry()

    async def _ready(self, principal: Principal, ref: str | None) -> None:
        hub = self.hub
        session = self.session
        assert session is not None
        user = principal.user
        try:
            admitted = await hub.presence.admit(user)
        except (RedisError, OSError) as exc:
            log.warning("cannot admit a socket: %s", exc)
            session.close(CloseCode.TRY_AGAIN_LATER, "Redis is unavailable")
            return
        if self.released:  # the socket went while Redis answered: give the place back
            if admitted:
                hub.presence.leave(user)
            return
        if not admitted:
            session.close(CloseCode.TOO_MANY, "too many connections for this user")
            return
        self.registered = True
        hub.watch_user(user, self)
        self.push_frame(hub.ready_frame(principal, self.id, ref))

    def _schedule_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        session = self.session
        if session is None or self.closing:
            return
        if session.expires_at is not None and session.state is State.READY:
            delay = max(session.expires_at - time.time(), 0.0) + 0.01
            self._expiry = asyncio.get_running_loop().call_later(delay, self._tick)

    def _tick(self) -> None:
        """The auth window or the token may have run out. Timers can fire a little early
        (uvloop's clock counts milliseconds), so a window not yet over is checked again."""
        self._expiry = None
        session = self.session
        if session is None:
            return
        session.tick(time.monotonic(), time.time())
        self._act()
        if self.closing or self._expiry is not None:
            return
        if session.state is State.AWAITING_AUTH:
            self._expiry = asyncio.get_running_loop().call_later(RECHECK, self._tick)
        elif session.state is State.READY:
            self._schedule_expiry()

    # ------------------------------------------------------------------ commands

    async def _command(self, frame: f.ClientFrame) -> None:
        user = self.session.user if self.session else None
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
        hub = self.hub
        meta = await hub.chat.owned(user, conversation)
        if conversation not in self.watches and len(self.watches) >= hub.wire_limits.max_joined:
            raise Refused(
                "invalid",
                f"a socket may join at most {hub.wire_limits.max_joined} conversations",
            )
        old = self.watches.pop(conversation, None)
        watch = Watch(self, conversation)
        self.watches[conversation] = watch
        try:
            await hub.bus.subscribe(keys.channel(conversation), watch)
        finally:
            if old is not None:  # unsubscribed only now, so the channel never lacks a listener
                old.active = False
                hub.bus.unsubscribe(keys.channel(conversation), old)
        try:
            await watch.join(meta, frame.after, frame.ref)
        except BaseException:
            self._leave(conversation)
            raise
        if self.released:  # the socket went meanwhile; nothing else will unsubscribe it
            self._leave(conversation)

    def _leave(self, conversation: uuid.UUID) -> None:
        watch = self.watches.pop(conversation, None)
        if watch is not None:
            watch.active = False
            self.hub.bus.unsubscribe(keys.channel(conversation), watch)

    def _leave_all(self) -> None:
        for conversation in tuple(self.watches):
            self._leave(conversation)

    # ------------------------------------------------------------------ frames out

    def push_frame(self, frame: f.ServerFrame) -> None:
        self.push(wsframe.text(f.encode(frame)))

    def push(self, frame: bytes) -> None:
        """Queue a framed event for this loop iteration's write, or for the outbox while the
        transport is paused. Everything the bus delivers in one read reaches a socket in one
        write: under load that is several events per system call instead of one each."""
        if self.closing:
            return
        if self.paused:
            self._hold_pending()
            self._hold(frame)
            return
        if self._pending is None:
            self._pending = [frame]
            self.hub.mark_dirty(self)
        else:
            self._pending.append(frame)

    def flush(self) -> None:
        pending, self._pending = self._pending, None
        if not pending or self.closing or self.transport is None:
            return
        if self.paused:
            for frame in pending:
                self._hold(frame)
        elif len(pending) == 1:
            self.transport.write(pending[0])
        else:
            self.transport.writelines(pending)

    def _hold_pending(self) -> None:
        pending, self._pending = self._pending, None
        for frame in pending or ():
            self._hold(frame)

    def _hold(self, frame: bytes) -> None:
        if self.closing:
            return
        if self.outbox is None:
            limit = self.hub.settings.limits.outbox_bytes
            self.outbox = Outbox(limit, merge_after=min(65_536, limit // 4))
        if not self.outbox.push(frame):
            self.close(CloseCode.TRY_AGAIN_LATER, "client reads too slowly")

    def ping(self) -> None:
        if not self.closing and self.ws is not None and self.ws.state is WsState.OPEN:
            self.ws.send_ping(b"")
            self._flush_ws()

    def drop(self) -> None:
        """Cut the TCP connection of a peer that stopped answering: a close frame would only
        wait in a buffer it no longer reads."""
        if self.transport is not None:
            self.closing = True
            self._leave_all()
            self.transport.abort()

    def close(self, code: CloseCode, reason: str) -> None:
        """Stop taking frames and close. What waits in the outbox is still sent first (an
        error frame explaining the close, say) unless the client reads too slowly."""
        if self.closing:
            return
        self.closing = True
        if self._queue:
            self._queue.clear()
        self._leave_all()
        transport = self.transport
        if transport is None:
            return
        self._update_reading()
        frames = [*(self.outbox.drain() if self.outbox else ()), *(self._pending or ())]
        self._pending = None
        if frames and code != CloseCode.TRY_AGAIN_LATER:
            transport.writelines(frames)
        if self.ws is not None and self.ws.state is WsState.OPEN:
            self.ws.send_close(int(code), reason)
            self._flush_ws()
        if self._closer is None:
            self._closer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, transport.abort)

    def _flush_ws(self) -> None:
        """Write what the sans-I/O protocol produced (handshake response, pongs, close); its
        end-of-stream marker means the server closes the TCP connection now."""
        transport = self.transport
        if transport is None or self.ws is None:
            return
        for data in self.ws.data_to_send():
            if data:
                transport.write(data)
            else:
                self._shut()
                return

    def _shut(self) -> None:
        """Close the TCP connection once what is buffered is written, and cut it if the
        client does not read that in time."""
        self.closing = True
        self._leave_all()
        transport = self.transport
        if transport is None:
            return
        transport.close()
        if self._closer is None:
            self._closer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, transport.abort)

    async def _cleanup(self) -> None:
        """Let a command still in flight when the TCP connection went finish first."""
        try:
            if self._runner is not None:
                await asyncio.wait([self._runner], timeout=CLOSE_TIMEOUT)
        finally:
            self._leave_all()
            self._release()

    def _release(self) -> None:
        """Give back the socket's user subscription and its place in the user's count."""
        hub = self.hub
        self.released = True
        user = self.session.user if self.session else None
        if user is not None and self.registered:
            self.registered = False
            hub.unwatch_user(user, self)
            hub.presence.leave(user)
        hub.connections.discard(self)


def _bearer_token(offered: list[str]) -> str | None:
    for proto in offered:
        if proto.startswith(f.BEARER_PREFIX):
            return proto[len(f.BEARER_PREFIX) :]
    return None
