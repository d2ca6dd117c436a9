"""Sockets as the tests see them from outside: a raw reader that stops reading, draining
it, the kernel's TCP state of a connection."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import websockets

from protocol import frames as f
from tests.helpers.auth import mint, new_user
from tests.helpers.tabs import Recorded

TCP_ESTABLISHED = 1


def tcp_state(ws: Any) -> int:
    sock = ws.transport.get_extra_info("socket")
    return struct.unpack("B", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0]


async def stalled_reader(url: str, token: str, conversation: uuid.UUID) -> tuple[Any, Recorded]:
    """A raw socket with a tiny receive buffer that joins, then stops reading."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    parts = urlsplit(url)
    await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port))
    ws = await websockets.connect(
        url,
        sock=sock,
        subprotocols=[f.SUBPROTOCOL, f"{f.BEARER_PREFIX}{token}"],  # type: ignore[list-item]
        ping_interval=None,
        compression=None,
        max_size=None,
        max_queue=None,
        open_timeout=10,
    )
    got = Recorded()
    got.add(await asyncio.wait_for(ws.recv(), 10))
    await ws.send(f.encode(f.Join(conversation=conversation, ref="join")).decode())
    while not any(isinstance(fr, f.Joined) for fr in got.frames):
        got.add(await asyncio.wait_for(ws.recv(), 10))
    ws.transport.pause_reading()
    return ws, got


async def drain(ws: Any, got: Recorded, timeout: float) -> int | None:
    """Read everything the server queued; the close code if it closed the socket."""
    ws.transport.resume_reading()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                got.add(await asyncio.wait_for(ws.recv(), 1.0))
            except TimeoutError:
                break
    except websockets.ConnectionClosed:
        pass
    return ws.close_code if ws.close_code is not None else None


# A raw upgrade request, for tests that speak HTTP/1.1 to the front door themselves.
UPGRADE = (
    "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Protocol: parley.v1, bearer.{token}\r\n\r\n"
)


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)


async def origin_status(port: int, origin: str, forwarded: str | None) -> int:
    """The status an upgrade with `Host: 127.0.0.1:port`, `Origin: origin` (`{port}` filled
    in) and, when given, `X-Forwarded-Proto: forwarded` gets."""
    headers = f"Origin: {origin.format(port=port)}\r\n"
    if forwarded is not None:
        headers += f"X-Forwarded-Proto: {forwarded}\r\n"
    request = UPGRADE.format(token=mint(new_user()))
    request = request.replace("Host: 127.0.0.1", f"Host: 127.0.0.1:{port}")[:-2] + headers
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request.encode() + b"\r\n")
        head = await read_head(reader)
    finally:
        writer.close()
    return int(head.split(b" ", 2)[1])
