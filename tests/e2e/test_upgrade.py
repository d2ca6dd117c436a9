"""The opening handshake against a running server: both ways a socket reaches Parley (a
connection whose first request is for `/ws`, and an upgrade after other requests on a
kept-alive connection, which goes through uvicorn's HTTP layer), and refusals."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from protocol import frames as f
from tests.helpers.auth import mint, new_user
from tests.helpers.processes import ParleyProcess
from tests.helpers.sockets import UPGRADE, origin_status, read_head


async def test_a_socket_after_http_requests_on_one_connection(parley: ParleyProcess) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", parley.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = await read_head(reader)
        assert head.startswith(b"HTTP/1.1 200 ")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        writer.write(UPGRADE.format(token=mint(new_user())).encode())
        head = await read_head(reader)
        assert head.startswith(b"HTTP/1.1 101 ") and b"parley.v1" in head
        first = await asyncio.wait_for(reader.readexactly(2), 5)
        assert first[0] == 0x81  # a text frame: `ready`
    finally:
        writer.close()


async def test_a_socket_from_the_first_byte(parley: ParleyProcess) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", parley.port)
    try:
        data = UPGRADE.format(token=mint(new_user())).encode()
        for i in range(0, len(data), 5):  # in pieces, as a slow client sends it
            writer.write(data[i : i + 5])
            await writer.drain()
        assert (await read_head(reader)).startswith(b"HTTP/1.1 101 ")
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /elsewhere HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", 404),
        (b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n", 426),
        (b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         b"Sec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n", 400),
    ],
)  # fmt: skip
async def test_bad_upgrade_requests_get_an_http_status(
    parley: Any, request_bytes: bytes, status: int
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", parley.port)
    try:
        writer.write(request_bytes)
        response = await asyncio.wait_for(reader.read(), 5)  # the server closes after it
    finally:
        writer.close()
    assert response.startswith(f"HTTP/1.1 {status} ".encode()), response


@pytest.mark.parametrize(
    ("origin", "forwarded", "status"),
    [
        ("http://127.0.0.1:{port}", None, 101),
        ("https://127.0.0.1:{port}", None, 403),
        ("https://127.0.0.1:{port}", "https", 403),  # not trusted unless configured
        ("http://127.0.0.1:1", None, 403),
    ],
)
async def test_origin_must_match_scheme_host_and_port(
    parley: ParleyProcess, origin: str, forwarded: str | None, status: int
) -> None:
    assert await origin_status(parley.port, origin, forwarded) == status


def client_frame(opcode: Opcode, payload: bytes) -> bytes:
    return Frame(opcode, payload).serialize(mask=True)


async def server_frames(reader: asyncio.StreamReader, count: int) -> list[Frame]:
    """Read `count` frames the server sent (unmasked, so websockets' client parser reads them)."""
    parser = ClientProtocol(parse_uri("ws://127.0.0.1/ws"), state=State.OPEN)
    frames: list[Frame] = []
    while len(frames) < count:
        data = await asyncio.wait_for(reader.read(65536), 5)
        assert data, f"the server hung up after {frames}"
        parser.receive_data(data)
        frames += [e for e in parser.events_received() if isinstance(e, Frame)]
    return frames


async def open_raw(parley: ParleyProcess, user: str, first: bytes = b"") -> Any:
    """A socket by hand: the upgrade (and `first`, in the same write), then the 101. With
    `first`, the token is not in the upgrade: `first` must hold the `auth` frame."""
    reader, writer = await asyncio.open_connection("127.0.0.1", parley.port)
    upgrade = UPGRADE.format(token=mint(user))
    if first:
        upgrade = upgrade.replace(
            upgrade[upgrade.index(", bearer.") : upgrade.index("\r\n\r\n")], ""
        )
    writer.write(upgrade.encode() + first)
    assert (await read_head(reader)).startswith(b"HTTP/1.1 101 ")
    return reader, writer


async def test_frames_sent_with_the_upgrade_request_are_read(parley: ParleyProcess) -> None:
    user = new_user()
    auth = f.encode(f.Auth(token=mint(user), ref="early"))
    reader, writer = await open_raw(parley, user, first=client_frame(Opcode.TEXT, auth))
    try:
        [ready] = (f.decode_server(fr.data) for fr in await server_frames(reader, 1))
        assert isinstance(ready, f.Ready) and ready.ref == "early" and ready.user == user
    finally:
        writer.close()


async def test_a_text_frame_that_is_not_utf8_gets_an_error(parley: ParleyProcess) -> None:
    reader, writer = await open_raw(parley, new_user())
    try:
        await server_frames(reader, 1)  # ready: before it, anything but `auth` closes 4401
        writer.write(client_frame(Opcode.TEXT, b'{"type":"ping","ref":"\xff"}'))
        writer.write(client_frame(Opcode.TEXT, b'{"type":"ping","ref":"after"}'))
        error, pong = (f.decode_server(fr.data) for fr in await server_frames(reader, 2))
        assert isinstance(error, f.Error) and error.code == "bad_frame"
        assert isinstance(pong, f.Pong) and pong.ref == "after"
    finally:
        writer.close()


@pytest.mark.parametrize(
    "first",
    [client_frame(Opcode.BINARY, b"\x00\x01"), client_frame(Opcode.TEXT, b"not json")],
    ids=["binary", "not-json"],
)
async def test_garbage_before_auth_closes_4401_at_once(parley: ParleyProcess, first: bytes) -> None:
    """Not an error and a 4408 when the auth window (5 s) ends: a 4401 now."""
    started = time.monotonic()
    reader, writer = await open_raw(parley, new_user(), first=first)
    try:
        [close] = await server_frames(reader, 1)
    finally:
        writer.close()
    assert close.opcode is Opcode.CLOSE
    assert int.from_bytes(close.data[:2], "big") == 4401
    assert time.monotonic() - started < 2


async def test_a_command_sent_just_before_the_clients_close_still_runs(
    parley: ParleyProcess,
) -> None:
    user = new_user()
    reader, writer = await open_raw(parley, user)
    try:
        await server_frames(reader, 1)  # ready
        create = client_frame(Opcode.TEXT, b'{"type":"create","title":"last words"}')
        writer.write(create + client_frame(Opcode.CLOSE, b"\x03\xe8"))
        await asyncio.wait_for(reader.read(), 5)  # the server answers the close and hangs up
    finally:
        writer.close()
    async with httpx.AsyncClient(base_url=parley.url) as http:
        for _ in range(50):
            listed = await http.get(
                "/api/conversations", headers={"Authorization": f"Bearer {mint(user)}"}
            )
            if [c["title"] for c in listed.json()] == ["last words"]:
                return
            await asyncio.sleep(0.1)
    raise AssertionError(f"the conversation was not created: {listed.json()}")
