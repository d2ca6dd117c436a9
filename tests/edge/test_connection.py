"""A `Connection` driven in-process, in the style of python-websockets' own tests: a transport
double records what the server writes, a sans-I/O `ClientProtocol` plays the client, and small
hand-written conversation service, bus and presence objects stand for Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import functools
import json
import uuid
from typing import Any

import pytest
from redis.exceptions import RedisClusterException
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from protocol import frames as f
from protocol.session import CloseCode
from server.app.config import AuthSettings, ServerSettings, Settings
from server.edge.auth import Verifier
from server.edge.bus import Listener
from server.edge.commands import Commands
from server.edge.connection import Connection, Phase
from server.edge.entrance import UpgradePolicy
from server.edge.hub import Hub
from server.redis.eventlog import CachedHistory, CachedMeta, Opening

SECRET = "s" * 40
KEY = "dGhlIHNhbXBsZSBub25jZQ=="


class Transport:
    """What the connection calls on an asyncio transport, recorded. `close` and `abort` end
    the connection on the next loop iteration, as asyncio's transports do."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self.aborted = False
        self.reading = True
        self.protocol: Connection | None = None

    def write(self, data: bytes) -> None:
        assert not (self.closed or self.aborted), "written after close"
        self.data += data

    def writelines(self, parts: list[bytes]) -> None:
        for part in parts:
            self.write(part)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self._end()
        self.closed = True

    def abort(self) -> None:
        self._end()
        self.aborted = True

    def _end(self) -> None:
        if not (self.closed or self.aborted) and self.protocol is not None:
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)


class FakeConversations:
    """The conversation service: one conversation per `create`, no events."""

    def __init__(self) -> None:
        self.owners: dict[uuid.UUID, str] = {}
        self.unreadable: Exception | None = None
        """Raised by `read_events` when set (Redis failing mid-failover)."""

    async def owned(self, user: str, conversation: uuid.UUID) -> f.Conversation:
        if self.owners.get(conversation) != user:
            raise AssertionError("not this user's")
        return _meta(conversation)

    async def read_events(
        self, conversation: uuid.UUID, after: int
    ) -> tuple[int, list[tuple[int, bytes]]]:
        if self.unreadable is not None:
            raise self.unreadable
        return 0, []

    async def history(
        self, conversation: uuid.UUID, cached: bool = True
    ) -> tuple[int, list[f.Message]]:
        return 0, []

    async def opening(self, user: str, conversation: uuid.UUID, after: int | None) -> Opening:
        meta = await self.owned(user, conversation)
        head, events = await self.read_events(conversation, after or 0)
        return Opening(CachedMeta(user, meta), head, events, CachedHistory(0, []))

    async def create(
        self,
        user: str,
        title: str | None,
        system: str | None,
        model: str | None,
        group: str = "",
        tools: list[str] | None = None,
    ) -> f.Conversation:
        conversation = f.new_id()
        self.owners[conversation] = user
        return _meta(conversation)

    async def say(
        self,
        user: str,
        conversation: uuid.UUID,
        text: str,
        message_id: uuid.UUID | None,
        hook_data: object = None,
        group: str = "",
    ) -> tuple[uuid.UUID, bool]:
        return message_id or f.new_id(), False

    async def regenerate(
        self, user: str, conversation: uuid.UUID, hook_data: object = None, group: str = ""
    ) -> uuid.UUID:
        return f.new_id()

    async def budget(self, user: str, group: str) -> f.Budget | None:
        return None

    async def cancel(self, user: str, conversation: uuid.UUID) -> None:
        return None


class FakeBus:
    def __init__(self) -> None:
        self.listeners: dict[str, set[Listener]] = {}

    async def subscribe(self, channel: str, listener: Listener, raw: bool = False) -> None:
        self.listeners.setdefault(channel, set()).add(listener)

    def unsubscribe(self, channel: str, listener: Listener) -> None:
        self.listeners.get(channel, set()).discard(listener)


class FakePresence:
    def __init__(self) -> None:
        self.sockets: dict[str, int] = {}

    async def admit(self, user: str) -> bool:
        self.sockets[user] = self.sockets.get(user, 0) + 1
        return True

    def leave(self, user: str) -> None:
        self.sockets[user] -= 1


def _meta(conversation: uuid.UUID) -> f.Conversation:
    now = f.utcnow()
    return f.Conversation(
        id=conversation, title="t", system="", model="m", created_at=now, updated_at=now
    )


class Peer:
    """One client on one `Connection`: sends masked frames, reads what the server wrote."""

    def __init__(self, kind: type[Connection] = Connection, **connection_args: Any) -> None:
        settings = Settings(server=ServerSettings(allowed_origins=["https://app.example"]))
        self.verifier = Verifier(AuthSettings(), SECRET)
        self.conversations, self.bus, self.presence = FakeConversations(), FakeBus(), FakePresence()
        self.hub = Hub(
            settings,
            self.conversations,
            self.bus,
            self.verifier,
            self.presence,
            UpgradePolicy(settings),
        )
        self.transport = Transport()
        self.conn = kind(self.hub, **connection_args)
        self.transport.protocol = self.conn
        self.conn.connection_made(self.transport)  # type: ignore[arg-type]
        self.client = ClientProtocol(parse_uri("ws://127.0.0.1/ws"), state=State.OPEN)
        self._read = 0

    def request(self, *headers: str, target: str = "/ws", method: str = "GET") -> str:
        """Send an upgrade request; the server's response head."""
        lines = [
            f"{method} {target} HTTP/1.1",
            "Host: 127.0.0.1",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {KEY}",
            "Sec-WebSocket-Version: 13",
            *headers,
        ]
        self.conn.data_received(("\r\n".join(lines) + "\r\n\r\n").encode())
        end = self.transport.data.index(b"\r\n\r\n") + 4
        self._read = end
        return self.transport.data[:end].decode()

    async def open(self, user: str = "ann") -> dict[str, Any]:
        """Upgrade with a bearer token; the `ready` frame."""
        token = self.verifier.mint(user)
        head = self.request(f"Sec-WebSocket-Protocol: {f.SUBPROTOCOL}, bearer.{token}")
        assert head.startswith("HTTP/1.1 101")
        (ready,) = await self.messages()
        return ready

    def send(self, *frames: tuple[Opcode, bytes, bool]) -> None:
        """Frames as (opcode, data, fin), all in one read of the server's."""
        wire = b"".join(
            Frame(opcode, data, fin).serialize(mask=True, extensions=[])
            for opcode, data, fin in frames
        )
        self.conn.data_received(wire)

    def send_json(self, *messages: dict[str, Any]) -> None:
        self.send(*((Opcode.TEXT, json.dumps(m).encode(), True) for m in messages))

    async def frames(self) -> list[Frame]:
        """What the server wrote since the last call, once the loop ran its writes."""
        for _ in range(5):
            await asyncio.sleep(0)
        new = bytes(self.transport.data[self._read :])
        self._read = len(self.transport.data)
        self.client.receive_data(new)
        return [e for e in self.client.events_received() if isinstance(e, Frame)]

    async def messages(self) -> list[dict[str, Any]]:
        frames = await self.frames()
        assert all(frame.opcode is Opcode.TEXT for frame in frames), frames
        return [json.loads(frame.data) for frame in frames]


def close_code(frame: Frame) -> int:
    assert frame.opcode is Opcode.CLOSE
    return int.from_bytes(frame.data[:2], "big")


# ---------------------------------------------------------------------- handshake refusals


@pytest.mark.parametrize(
    ("headers", "target", "method", "status"),
    [
        ((), "/ws", "POST", 400),
        (("Origin: https://evil.example",), "/ws", "GET", 403),
        ((), "/chat", "GET", 404),
    ],
    ids=["not-a-get", "forbidden-origin", "wrong-path"],
)
async def test_an_upgrade_the_policy_refuses_gets_its_status_and_the_connection_closes(
    headers: tuple[str, ...], target: str, method: str, status: int
) -> None:
    peer = Peer()
    head = peer.request(*headers, target=target, method=method)
    assert head.startswith(f"HTTP/1.1 {status} ")
    assert peer.transport.closed
    await asyncio.sleep(0)
    assert peer.conn.phase is Phase.RELEASED and not peer.hub.connections


async def test_an_allowed_origin_is_upgraded_without_the_token_being_echoed() -> None:
    peer = Peer()
    token = peer.verifier.mint("ann")
    head = peer.request(
        "Origin: https://app.example", f"Sec-WebSocket-Protocol: {f.SUBPROTOCOL}, bearer.{token}"
    )
    assert head.startswith("HTTP/1.1 101")
    assert f"Sec-WebSocket-Protocol: {f.SUBPROTOCOL}\r\n" in head and token not in head


# ---------------------------------------------------------------------- authentication


async def test_a_bearer_token_in_the_subprotocols_is_verified_and_the_user_admitted() -> None:
    peer = Peer()
    ready = await peer.open("ann")
    assert ready["type"] == "ready" and ready["user"] == "ann"
    assert peer.presence.sockets == {"ann": 1}
    assert peer.hub.users["ann"] == {peer.conn} and peer.conn in peer.hub.connections


async def test_a_bad_bearer_token_closes_with_4401() -> None:
    peer = Peer()
    peer.request(f"Sec-WebSocket-Protocol: {f.SUBPROTOCOL}, bearer.not-a-jwt")
    (frame,) = await peer.frames()
    assert close_code(frame) == CloseCode.UNAUTHORIZED
    assert peer.presence.sockets == {}


async def test_no_auth_within_the_auth_timeout_closes_with_4408() -> None:
    peer = Peer(handler=functools.partial(Commands, auth_timeout=0.05))
    peer.request()
    assert await peer.frames() == []
    await asyncio.sleep(0.15)
    (frame,) = await peer.frames()
    assert close_code(frame) == CloseCode.AUTH_TIMEOUT


async def test_a_frame_before_auth_closes_with_4401() -> None:
    peer = Peer()
    peer.request()
    peer.send_json({"type": "ping"})
    (frame,) = await peer.frames()
    assert close_code(frame) == CloseCode.UNAUTHORIZED


# ---------------------------------------------------------------------- frames in


async def test_a_fragmented_text_message_is_reassembled() -> None:
    peer = Peer()
    peer.request()
    auth = json.dumps({"type": "auth", "token": peer.verifier.mint("ann"), "ref": "a"}).encode()
    peer.send(
        (Opcode.TEXT, auth[:10], False),
        (Opcode.CONT, auth[10:30], False),
        (Opcode.PING, b"", True),  # a control frame may come between the fragments
        (Opcode.CONT, auth[30:], True),
    )
    pong, ready = await peer.frames()
    assert pong.opcode is Opcode.PONG
    assert json.loads(ready.data) | {"ref": "a", "type": "ready", "user": "ann"} == json.loads(
        ready.data
    )


async def test_an_idle_socket_holds_no_frame_parser_and_split_frames_still_arrive() -> None:
    """Between frames the `ServerProtocol` is dropped (memory per idle socket); a frame whose
    header came in an earlier read, or a message whose first fragment did, keeps it."""
    peer = Peer()
    await peer.open("ann")
    assert peer.conn.ws is None
    peer.conn.ping()  # the keepalive of an idle socket makes a parser again
    (ping,) = await peer.frames()
    assert ping.opcode is Opcode.PING
    wire = Frame(Opcode.TEXT, json.dumps({"type": "ping", "ref": "p"}).encode()).serialize(
        mask=True, extensions=[]
    )
    peer.conn.data_received(wire[:3])  # the header and a byte of the mask
    assert peer.conn.ws is not None
    peer.conn.data_received(wire[3:])
    (pong,) = await peer.messages()
    assert pong["type"] == "pong" and pong["ref"] == "p"
    assert peer.conn.ws is None
    message = json.dumps({"type": "ping", "ref": "q"}).encode()
    peer.send((Opcode.TEXT, message[:5], False))
    assert peer.conn.ws is not None
    peer.send((Opcode.CONT, message[5:], True))
    (pong,) = await peer.messages()
    assert pong["ref"] == "q" and peer.conn.ws is None


class CountingParsers(Connection):
    """A connection that counts the frame parsers it makes."""

    def __init__(self, hub: Hub, **args: Any) -> None:
        super().__init__(hub, **args)
        self.parsers = 0

    def _protocol(self) -> ServerProtocol:
        self.parsers += self.ws is None
        return super()._protocol()


async def test_a_whole_small_ascii_message_is_read_without_a_frame_parser() -> None:
    """A `join`, `say` or `ping` arriving whole in one read of a parked socket makes no
    `ServerProtocol`; anything else (non-ASCII text, a control frame) still goes to one."""
    peer = Peer(CountingParsers)
    await peer.open("ann")
    conn = peer.conn
    assert isinstance(conn, CountingParsers)
    peer.send_json({"type": "ping", "ref": "p"})
    (pong,) = await peer.messages()
    assert pong["ref"] == "p" and conn.parsers == 0 and conn.ws is None
    peer.send(
        (Opcode.TEXT, json.dumps({"type": "ping", "ref": "é"}, ensure_ascii=False).encode(), True)
    )
    (pong,) = await peer.messages()
    assert pong["ref"] == "é" and conn.parsers == 1 and conn.ws is None
    peer.send((Opcode.TEXT, b'{"type": "ping", "ref": "\xff"}', True))
    (error,) = await peer.messages()  # not UTF-8: the parser's, and the same answer as ever
    assert error["code"] == "bad_frame" and conn.parsers == 2


async def test_commands_run_in_the_order_sent() -> None:
    peer = Peer()
    await peer.open()
    peer.send_json({"type": "create", "ref": "c"}, {"type": "ping", "ref": "p"})
    await asyncio.sleep(0.01)
    created, pong = await peer.messages()
    assert (created["type"], created["ref"], pong["type"], pong["ref"]) == (
        "created",
        "c",
        "pong",
        "p",
    )
    peer.send_json({"type": "join", "conversation": created["conversation"], "ref": "j"})
    await asyncio.sleep(0.01)
    (joined,) = await peer.messages()
    assert joined["type"] == "joined" and sum(map(len, peer.bus.listeners.values())) == 1


@pytest.mark.parametrize(
    "failure",
    [
        RedisClusterException("Redis Cluster cannot be connected"),
        AttributeError("'NoneType' object has no attribute 'writelines'"),
    ],
    ids=["no-node-answers", "connection-torn-down"],
)
async def test_a_catch_up_the_cluster_client_fails_closes_the_socket_to_rejoin(
    failure: Exception,
) -> None:
    """What redis-py's cluster client raises while a failover settles besides RedisError:
    the socket is closed with 1013 (the tab rejoins with `after`) rather than left catching
    up, holding every live frame from then on."""
    peer = Peer()
    await peer.open()
    peer.send_json({"type": "create", "ref": "c"})
    await asyncio.sleep(0.01)
    (created,) = await peer.messages()
    peer.send_json({"type": "join", "conversation": created["conversation"], "ref": "j"})
    await asyncio.sleep(0.01)
    await peer.messages()
    peer.conversations.unreadable = failure
    (listener,) = next(iter(peer.bus.listeners.values()))
    listener.resync()
    await asyncio.sleep(0.01)
    (frame,) = await peer.frames()
    assert close_code(frame) == CloseCode.TRY_AGAIN_LATER


# ---------------------------------------------------------------------- flow control


async def test_a_paused_transport_holds_frames_in_the_outbox_and_resuming_drains_them() -> None:
    peer = Peer()
    await peer.open()
    peer.conn.pause_writing()
    assert not peer.transport.reading  # a client that does not read is not read either
    peer.send_json(*({"type": "ping", "ref": str(i)} for i in range(3)))
    assert await peer.frames() == []
    assert peer.conn.outbox
    peer.conn.resume_writing()
    assert [m["ref"] for m in await peer.messages()] == ["0", "1", "2"]
    assert peer.transport.reading and not peer.conn.outbox


async def test_an_outbox_past_its_bound_closes_with_1013() -> None:
    peer = Peer()
    await peer.open()
    peer.conn.pause_writing()
    for _ in range(20):
        peer.conn.push(b"\x81\x7e\xff\xff" + b"x" * 65_535)  # 20 x 64 KiB > outbox_bytes
    peer.conn.resume_writing()
    (frame,) = await peer.frames()
    assert close_code(frame) == CloseCode.TRY_AGAIN_LATER


# ---------------------------------------------------------------------- closing handshake


async def test_a_close_of_the_server_sends_a_close_frame_and_ends_on_the_answer() -> None:
    peer = Peer(close_timeout=0.05)
    await peer.open()
    peer.conn.close(CloseCode.RESTART, "server restarting")
    (frame,) = await peer.frames()
    assert close_code(frame) == CloseCode.RESTART
    assert peer.conn.phase is Phase.CLOSING and not peer.transport.closed
    peer.send((Opcode.CLOSE, frame.data, True))
    assert peer.transport.closed and not peer.transport.aborted
    await asyncio.sleep(0.1)  # the close timer was cancelled with the connection
    assert not peer.transport.aborted
    assert peer.conn.phase is Phase.RELEASED and peer.presence.sockets == {"ann": 0}
    assert not peer.hub.connections and not peer.hub.users


async def test_a_client_that_does_not_answer_a_close_is_cut_after_the_close_timeout() -> None:
    peer = Peer(close_timeout=0.05)
    await peer.open()
    peer.conn.close(CloseCode.RESTART, "server restarting")
    await asyncio.sleep(0.1)
    assert peer.transport.aborted and peer.conn.phase is Phase.RELEASED


async def test_a_close_of_the_client_is_answered_and_the_connection_closed() -> None:
    peer = Peer()
    await peer.open()
    peer.send((Opcode.CLOSE, (1000).to_bytes(2, "big") + b"bye", True))
    (frame,) = await peer.frames()
    assert close_code(frame) == 1000
    assert peer.transport.closed
    await asyncio.sleep(0)
    assert peer.conn.phase is Phase.RELEASED and peer.presence.sockets == {"ann": 0}


async def test_a_connection_silent_during_the_handshake_is_cut() -> None:
    peer = Peer(handshake_timeout=0.05)
    await asyncio.sleep(0.1)
    assert peer.transport.aborted and peer.transport.data == b""
