"""The opening handshake against a running server: both ways a socket reaches Parley (a
connection whose first request is for `/ws`, and an upgrade after other requests on a
kept-alive connection, which goes through uvicorn's HTTP layer), and refusals."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import ParleyProcess, mint, new_user

UPGRADE = (
    "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Protocol: parley.v1, bearer.{token}\r\n\r\n"
)


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)


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
