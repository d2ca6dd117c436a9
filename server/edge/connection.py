"""The socket: one WebSocket connection, from the upgrade request to the close — the transport
and the WebSocket protocol, not what the client asks for (`server.edge.commands`).

Parley's front door (`server.edge.entrance`) reads a new connection's first bytes: a request
for `/ws` makes it a `Connection` at once; anything else goes to uvicorn's HTTP layer, which
hands an upgrade request arriving later on a kept-alive connection, transport and all, to a
`Connection` too. A `Connection` (an asyncio Protocol) answers the opening handshake
(`protocol.handshake`) as the hub's `UpgradePolicy` decides, then parses frames with
`websockets`' sans-I/O `ServerProtocol`, which also answers pings and the closing handshake,
reassembles fragmented messages and hands each message to its `Handler` (`Commands`). Nothing
waits on an idle socket: no task, no queue, and no `ServerProtocol` either — it is dropped
whenever a read leaves it between frames with nothing pending (`_park`, ≈ 1.4 KiB a socket)
and made again for the next frame in or out — except a read that is one whole small text
message, which a parked socket takes without one (`_text_alone`).

Frames to the client go to the transport at the end of the loop iteration that produced
them (`Hub.mark_dirty`), all of a socket's in one write. A published event arrives already
framed (`protocol.wsframe`, once per process however many tabs watch), so a socket costs an
append of a shared bytes object per event and a write per batch. When the client reads slower
than events arrive, the transport pauses the protocol and frames wait in the socket's bounded
`Outbox` until it resumes; past the bound the socket is closed with 1013.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol, cast

from websockets.frames import Frame, Opcode
from websockets.protocol import Protocol as WsProtocol
from websockets.protocol import State as WsState
from websockets.server import ServerProtocol
from websockets.streams import StreamReader

from protocol import frames as f
from protocol import wsframe
from protocol.handshake import Refusal, RequestParser, UpgradeRequest, accept, refuse
from protocol.outbox import Outbox
from protocol.session import CloseCode
from server.app import metrics
from server.app.metrics import TALLY
from server.edge.commands import Commands

if TYPE_CHECKING:
    from server.edge.hub import Hub

log = logging.getLogger("parley.ws")

CLOSE_TIMEOUT: Final = 5.0
"""After sending a close frame, how long the client has to answer before the TCP connection
is cut (it may have stopped reading)."""
HANDSHAKE_TIMEOUT: Final = 10.0
"""How long a new connection has to send its whole upgrade request."""

_UPGRADED: Final = metrics.HANDSHAKES.labels("101")
_PARSE: Final = WsProtocol.parse.__code__
_AT_EOF: Final = StreamReader.at_eof.__code__


class Phase(enum.IntEnum):
    """Where a connection is in its life; it only moves forward."""

    HANDSHAKE = 0
    """Reading the upgrade request."""
    OPEN = 1
    """Upgraded: frames flow both ways."""
    CLOSING = 2
    """A close was decided (a close frame sent, a refusal, the TCP close under way): no
    frame is queued for the client any more; reading goes on only for its answer."""
    CLOSED = 3
    """The TCP connection is gone; a command may still be running."""
    RELEASED = 4
    """What the socket held (its place in the user's count, its subscriptions) is given
    back."""


class Handler(Protocol):
    """What a connection hands the client's messages to, and tells about its end
    (`server.edge.commands.Commands`)."""

    def start(self, token: str | None) -> None: ...

    def receive_text(self, data: bytes, now: float) -> None: ...

    def receive_binary(self, now: float) -> None: ...

    def act(self) -> None:
        """Carry out what the messages of one read asked for."""

    def closing(self, drop_waiting: bool) -> None: ...

    def connection_lost(self) -> None:
        """The TCP connection is gone; call `Connection.release` once nothing is held."""


Opener = Callable[["Connection", "Hub"], Handler]
"""Makes the handler of a socket that was just upgraded."""


class Connection(asyncio.Protocol):
    """The transport side of a socket. Its lifecycle is one `Phase`. The flow-control flags
    stay apart from it because they change back and forth within a phase, independently of
    it: `paused` is the transport's word that its write buffer is full (`pause_writing` until
    `resume_writing`), `_held` the handler's that too many messages wait for a command
    (`hold_reading`), and `reading_paused` whether this side told the transport to stop
    reading (while either holds, before the close)."""

    __slots__ = (
        "_close_timeout",
        "_closer",
        "_fragments",
        "_handshake",
        "_handshake_timeout",
        "_held",
        "_open",
        "_pending",
        "_timer",
        "handler",
        "hub",
        "last_seen",
        "outbox",
        "paused",
        "phase",
        "reading_paused",
        "transport",
        "ws",
    )

    def __init__(
        self,
        hub: Hub,
        *,
        handler: Opener = Commands,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        close_timeout: float = CLOSE_TIMEOUT,
    ) -> None:
        self.hub = hub
        self._open = handler
        self._close_timeout = close_timeout
        self._handshake: RequestParser | None = RequestParser()
        self.ws: ServerProtocol | None = None
        """The frame parser, from the upgrade on; None while the socket is idle between
        frames (`_park`): `_protocol` makes a new one."""
        self.transport: asyncio.Transport | None = None
        self.handler: Handler | None = None
        self.outbox: Outbox | None = None
        self.phase = Phase.HANDSHAKE
        self.paused = False
        self.reading_paused = False
        self.last_seen = 0.0
        self._held = False
        self._fragments: tuple[Opcode, list[bytes]] | None = None
        self._pending: list[bytes] | None = None
        self._handshake_timeout = handshake_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._closer: asyncio.TimerHandle | None = None

    @property
    def closing(self) -> bool:
        return self.phase >= Phase.CLOSING

    @property
    def released(self) -> bool:
        return self.phase is Phase.RELEASED

    # ------------------------------------------------------------------ transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._handshake_timeout, self._handshake_expired)

    def data_received(self, data: bytes) -> None:
        try:
            if self.handler is None:
                self._handshake_received(data)
            else:
                self._frames_received(data)
        except Exception:
            log.exception("a socket failed; closing it")
            self.close(CloseCode.INTERNAL, "internal error")

    def _frames_received(self, data: bytes) -> None:
        if self.ws is None and self.phase is Phase.OPEN and self._text_alone(data):
            return
        ws = self._protocol()
        ws.receive_data(data)
        self.last_seen = time.monotonic()
        for event in ws.events_received():
            if isinstance(event, Frame):
                self._frame(event)
        handler = self.handler
        if handler is not None:  # before a close the client sent takes effect: first come counts
            handler.act()
        self._flush_ws()
        self._park()

    def _text_alone(self, data: bytes) -> bool:
        """Take a read that is one whole small text message (`wsframe.client_text`) without
        making the parked socket a frame parser; False if it is anything else."""
        payload = wsframe.client_text(data, self.hub.settings.limits.max_frame_bytes)
        if payload is None:
            return False
        self.last_seen = time.monotonic()
        handler = self.handler
        assert handler is not None
        handler.receive_text(payload, self.last_seen)
        handler.act()
        return True

    def _protocol(self) -> ServerProtocol:
        """The socket's frame parser, made again if it was parked."""
        ws = self.ws
        if ws is None:
            ws = self.ws = ServerProtocol(
                state=WsState.OPEN, max_size=self.hub.settings.limits.max_frame_bytes
            )
        return ws

    def _park(self) -> None:
        """Drop the frame parser when a new one would be the same: open, no close sent or
        received, nothing buffered or waiting to be written, no message half received, and
        the parser waiting for the first byte of the next frame (not inside one whose header
        it already read). An idle socket then holds no `ServerProtocol` (≈ 1.4 KiB). The last
        test looks into `websockets`' generators; should a release change them it fails, and
        the parser is simply kept (`tests/edge/test_connection.py` would notice)."""
        ws = self.ws
        if (
            ws is None
            or self._fragments is not None
            or ws.state is not WsState.OPEN
            or ws.reader.buffer
            or ws.reader.eof
            or ws.current_size is not None
            or ws.close_rcvd is not None
            or ws.close_sent is not None
            or ws.parser_exc is not None
            or ws.events
            or ws.writes
        ):
            return
        outer = getattr(ws.parser, "gi_yieldfrom", None)  # ServerProtocol.parse → Protocol.parse
        inner = getattr(outer, "gi_yieldfrom", None)
        if getattr(outer, "gi_code", None) is _PARSE and getattr(inner, "gi_code", None) is _AT_EOF:
            ws.parser.close()  # it refers to `ws`: closed, the cycle is gone without the GC
            self.ws = None

    def eof_received(self) -> bool | None:
        if self.handler is not None:
            self._protocol().receive_eof()
            self._flush_ws()
        return None

    def pause_writing(self) -> None:
        self.paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.outbox and self.transport is not None and self.phase < Phase.CLOSING:
            self._tally_merged()
            self._write_counted(self.outbox.drain())
        self._update_reading()

    def hold_reading(self, held: bool) -> None:
        """The handler has too many messages waiting (`held`), or no longer."""
        self._held = held
        self._update_reading()

    def _update_reading(self) -> None:
        """Read nothing while the client does not read (pongs would pile up in the
        transport) or while too many of its frames wait for a command; read again to get
        the client's answer to a close."""
        transport = self.transport
        if transport is None:
            return
        stop = (self.paused or self._held) and self.phase < Phase.CLOSING
        if stop != self.reading_paused:
            self.reading_paused = stop
            if stop:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.handler is not None:  # a parked parser had no close frame either
            _count_close(self.ws)
        self.phase = Phase.CLOSED
        self.transport = None
        for timer in (self._timer, self._closer):
            if timer is not None:
                timer.cancel()
        if self.handler is None:
            self.phase = Phase.RELEASED
        else:
            self.handler.connection_lost()

    def release(self) -> None:
        """The handler gave back what the socket held; the hub forgets the socket."""
        self.phase = Phase.RELEASED
        self.hub.connections.discard(self)

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
            metrics.HANDSHAKES.labels(str(refusal.status)).inc()
            self.transport.write(refuse(refusal.status, refusal.text))
            self._shut()
            return
        if parser.rest:
            self._frames_received(parser.rest)

    def _handshake_expired(self) -> None:
        self._timer = None
        if self.phase is Phase.HANDSHAKE and self.transport is not None:
            metrics.HANDSHAKES.labels("timeout").inc()
            self.drop()

    def _upgrade(self, request: UpgradeRequest) -> None:
        hub = self.hub
        assert self.transport is not None
        hub.upgrades.check_upgrade(request, self.transport)
        offered = request.subprotocols
        subprotocol = f.SUBPROTOCOL if f.SUBPROTOCOL in offered else None
        self.transport.write(accept(request, subprotocol))
        _UPGRADED.inc()
        self.phase = Phase.OPEN  # the frame parser is made with the first frame (`_protocol`)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        handler = self.handler = self._open(self, hub)
        self.last_seen = time.monotonic()
        hub.connections.add(self)
        handler.start(_bearer_token(offered) or hub.upgrades.query_token(request))

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
        handler = self.handler
        assert handler is not None
        now = time.monotonic()
        if opcode is Opcode.TEXT:
            handler.receive_text(bytes(data), now)
        else:
            handler.receive_binary(now)

    # ------------------------------------------------------------------ frames out

    def push_frame(self, frame: f.ServerFrame) -> None:
        self.push(wsframe.text(f.encode(frame)))

    def push(self, frame: bytes) -> None:
        """Queue a framed event for this loop iteration's write, or for the outbox while the
        transport is paused. Everything the bus delivers in one read reaches a socket in one
        write: under load that is several events per system call instead of one each."""
        if self.phase >= Phase.CLOSING:
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
        if not pending or self.phase >= Phase.CLOSING or self.transport is None:
            return
        if self.paused:
            for frame in pending:
                self._hold(frame)
        elif len(pending) == 1:
            frame = pending[0]
            self.transport.write(frame)
            TALLY.frames_written += 1
            TALLY.bytes_written += len(frame)
        else:
            self._write_counted(pending)

    def _write_counted(self, frames: list[bytes]) -> None:
        assert self.transport is not None
        self.transport.writelines(frames)
        TALLY.frames_written += len(frames)
        TALLY.bytes_written += sum(map(len, frames))

    def _tally_merged(self) -> None:
        outbox = self.outbox
        if outbox is not None and outbox.merged:
            TALLY.pieces_merged += outbox.merged
            outbox.merged = 0

    def _hold_pending(self) -> None:
        pending, self._pending = self._pending, None
        for frame in pending or ():
            self._hold(frame)

    def _hold(self, frame: bytes) -> None:
        if self.phase >= Phase.CLOSING:
            return
        if self.outbox is None:
            limit = self.hub.settings.limits.outbox_bytes
            self.outbox = Outbox(limit, merge_after=min(65_536, limit // 4))
        if not self.outbox.push(frame):
            self.close(CloseCode.TRY_AGAIN_LATER, "client reads too slowly")

    def ping(self) -> None:
        if self.phase < Phase.CLOSING and self.handler is not None:
            ws = self._protocol()
            if ws.state is WsState.OPEN:
                ws.send_ping(b"")
                self._flush_ws()

    def drop(self) -> None:
        """Cut the TCP connection of a peer that stopped answering: a close frame would only
        wait in a buffer it no longer reads."""
        if self.transport is not None:
            self._closing(drop_waiting=False)
            self.transport.abort()

    def close(self, code: CloseCode, reason: str) -> None:
        """Stop taking frames and close. What waits in the outbox is still sent first (an
        error frame explaining the close, say) unless the client reads too slowly."""
        if self.phase >= Phase.CLOSING:
            return
        self._closing(drop_waiting=True)
        transport = self.transport
        if transport is None:
            return
        self._update_reading()
        frames = [*(self.outbox.drain() if self.outbox else ()), *(self._pending or ())]
        self._pending = None
        if frames and code != CloseCode.TRY_AGAIN_LATER:
            self._write_counted(frames)
        if self.handler is not None:
            ws = self._protocol()
            if ws.state is WsState.OPEN:
                ws.send_close(int(code), reason)
                self._flush_ws()
        if self._closer is None:
            self._closer = asyncio.get_running_loop().call_later(
                self._close_timeout, transport.abort
            )

    def _closing(self, drop_waiting: bool) -> None:
        if self.phase is Phase.OPEN:
            metrics.OUTBOX_AT_CLOSE.observe(self.outbox.size if self.outbox else 0)
            self._tally_merged()
        if self.phase < Phase.CLOSING:
            self.phase = Phase.CLOSING
        if self.handler is not None:
            self.handler.closing(drop_waiting)

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
        self._closing(drop_waiting=False)
        transport = self.transport
        if transport is None:
            return
        transport.close()
        if self._closer is None:
            self._closer = asyncio.get_running_loop().call_later(
                self._close_timeout, transport.abort
            )


def _bearer_token(offered: list[str]) -> str | None:
    for proto in offered:
        if proto.startswith(f.BEARER_PREFIX):
            return proto[len(f.BEARER_PREFIX) :]
    return None


def _count_close(ws: ServerProtocol | None) -> None:
    """Count a socket's close by its code and by the side whose close frame came first."""
    if ws is None:  # parked: no close frame either way
        metrics.CLOSES.labels("none", "none").inc()
        return
    sent, received = ws.close_sent, ws.close_rcvd
    if received is not None and (sent is None or ws.close_rcvd_then_sent):
        metrics.CLOSES.labels(metrics.close_code_label(received.code), "client").inc()
    elif sent is not None:
        metrics.CLOSES.labels(metrics.close_code_label(sent.code), "server").inc()
    else:  # the TCP connection ended (or was cut) without a close frame
        metrics.CLOSES.labels("none", "none").inc()
