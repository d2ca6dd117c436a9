"""The HTTP edge against a running web process, over raw TCP sockets: every request has a
deadline (1 s here), a 16 KiB head and a bounded body, on every route and on every request of
a kept-alive connection; an idle kept-alive connection is closed (1 s here). The process
trusts X-Forwarded-Proto, as one behind a TLS-terminating proxy would."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import pytest

from tests.helpers.auth import mint, new_user
from tests.helpers.processes import Cluster, ParleyProcess
from tests.helpers.procfs import rss_kib
from tests.helpers.sockets import origin_status

DEADLINE = 1.0
KEEP_ALIVE = 1.0
MAX_BODY = 65_536
SLACK = 1.5
"""How much later than its deadline a cut may come (timers, a busy 2-core machine)."""
GET_INFO = b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.fixture(scope="module")
def edge(cluster: Cluster) -> Iterator[ParleyProcess]:
    web = cluster.process(
        "web",
        PARLEY_SERVER_REQUEST_TIMEOUT=str(DEADLINE),
        PARLEY_SERVER_KEEP_ALIVE_TIMEOUT=str(KEEP_ALIVE),
        PARLEY_SERVER_MAX_BODY_BYTES=str(MAX_BODY),
        PARLEY_SERVER_TRUST_FORWARDED_PROTO="true",
    )
    yield web
    web.stop()


async def opened(server: ParleyProcess) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def until_closed(reader: asyncio.StreamReader, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and the seconds that took."""
    started = time.monotonic()
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := await asyncio.wait_for(reader.read(65_536), timeout):
            received += chunk
    return received, time.monotonic() - started


async def send_and_wait(server: ParleyProcess, data: bytes, timeout: float) -> tuple[bytes, float]:
    """Send `data` on a new connection; what comes back until the server closes, and when."""
    reader, writer = await opened(server)
    try:
        writer.write(data)
        return await until_closed(reader, timeout)
    finally:
        writer.close()


async def response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One response with a Content-Length: its head and body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head, await asyncio.wait_for(reader.readexactly(length), 5)


def post_head(*headers: str) -> bytes:
    """The head of an authenticated `POST /api/conversations` with a JSON body."""
    lines = [
        "POST /api/conversations HTTP/1.1",
        "Host: 127.0.0.1",
        f"Authorization: Bearer {mint(new_user())}",
        "Content-Type: application/json",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def status(data: bytes) -> int:
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0


async def test_a_normal_request_gets_200_and_keep_alive_serves_the_next(
    edge: ParleyProcess,
) -> None:
    reader, writer = await opened(edge)
    try:
        for _ in range(3):
            writer.write(GET_INFO)
            head, _ = await response(reader)
            assert status(head) == 200
            await asyncio.sleep(KEEP_ALIVE / 2)  # within the keep-alive timeout
        writer.write(GET_INFO + GET_INFO)  # pipelined
        assert [status((await response(reader))[0]) for _ in range(2)] == [200, 200]
    finally:
        writer.close()


@pytest.mark.parametrize("path", ["/", "/api/info", "/healthz"])
async def test_half_a_request_line_is_cut_at_the_deadline(edge: ParleyProcess, path: str) -> None:
    half = f"GET {path} HT".encode()
    results = await asyncio.gather(
        *(send_and_wait(edge, half, DEADLINE + SLACK + 3) for _ in range(5))
    )
    for received, seconds in results:
        assert status(received) == 408, received
        assert DEADLINE - 0.2 <= seconds <= DEADLINE + SLACK, seconds


async def test_a_connection_that_sends_nothing_is_cut_at_the_deadline(
    edge: ParleyProcess,
) -> None:
    received, seconds = await send_and_wait(edge, b"", DEADLINE + SLACK + 3)
    assert received == b"" and seconds <= DEADLINE + SLACK


async def test_the_second_request_on_a_kept_alive_connection_has_a_deadline(
    edge: ParleyProcess,
) -> None:
    reader, writer = await opened(edge)
    try:
        writer.write(GET_INFO)
        assert status((await response(reader))[0]) == 200
        writer.write(b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        received, seconds = await until_closed(reader, DEADLINE + SLACK + 3)
    finally:
        writer.close()
    assert status(received) == 408, received
    assert seconds <= DEADLINE + SLACK


async def test_an_idle_kept_alive_connection_is_closed(edge: ParleyProcess) -> None:
    reader, writer = await opened(edge)
    try:
        writer.write(GET_INFO)
        assert status((await response(reader))[0]) == 200
        received, seconds = await until_closed(reader, KEEP_ALIVE + SLACK + 3)
    finally:
        writer.close()
    assert received == b"" and KEEP_ALIVE - 0.2 <= seconds <= KEEP_ALIVE + SLACK


@pytest.mark.parametrize("path", ["/", "/api/info", "/ws"])
async def test_a_32_kib_header_gets_431_and_the_connection_closes(
    edge: ParleyProcess, path: str
) -> None:
    big = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {'a' * 32_768}\r\n\r\n"
    received, _ = await send_and_wait(edge, big.encode(), 5)
    assert status(received) == 431, received


async def test_endless_headers_hold_no_memory(edge: ParleyProcess) -> None:
    """20 connections each start a header line of 2 MiB that never ends: each gets 431 once
    its head passes 16 KiB and is closed; the server's memory does not grow by their size."""
    before = rss_kib(edge.pid)

    async def endless() -> bytes:
        reader, writer = await opened(edge)
        answer = asyncio.create_task(until_closed(reader, 10))
        try:
            writer.write(b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: ")
            with contextlib.suppress(ConnectionError, TimeoutError):
                for _ in range(32):  # 2 MiB in 64 KiB pieces, until the server answers
                    if answer.done():
                        break
                    writer.write(b"a" * 65_536)
                    await asyncio.wait_for(writer.drain(), 5)
            received, _ = await answer
            return received
        finally:
            writer.close()

    received = await asyncio.gather(*(endless() for _ in range(20)))
    grown = rss_kib(edge.pid) - before
    assert all(status(r) == 431 for r in received), [r[:40] for r in received]
    assert grown < 8 * 1024, f"RSS grew by {grown} KiB"


async def test_an_oversize_body_gets_413_before_it_is_read(edge: ParleyProcess) -> None:
    received, _ = await send_and_wait(edge, post_head(f"Content-Length: {MAX_BODY + 1}"), 5)
    assert status(received) == 413, received


async def test_an_oversize_chunked_body_gets_413(edge: ParleyProcess) -> None:
    reader, writer = await opened(edge)
    try:
        writer.write(post_head("Transfer-Encoding: chunked"))
        chunk = b"%x\r\n%s\r\n" % (16_384, b" " * 16_384)
        with contextlib.suppress(ConnectionError):
            for _ in range(MAX_BODY // 16_384 + 2):
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 5)
        received, _ = await until_closed(reader, 5)
    finally:
        writer.close()
    assert status(received) == 413, received


async def test_a_slow_body_is_cut_at_the_deadline(edge: ParleyProcess) -> None:
    incomplete = post_head("Content-Length: 100") + b'{"title": '
    received, seconds = await send_and_wait(edge, incomplete, DEADLINE + SLACK + 3)
    assert status(received) == 408, received
    assert seconds <= DEADLINE + SLACK


async def test_a_body_within_the_limit_is_served(edge: ParleyProcess) -> None:
    body = b'{"title": "edge", "system": "%s"}' % (b"s" * 30_000)  # system: <= 32,000 chars
    assert MAX_BODY // 4 < len(body) < MAX_BODY
    reader, writer = await opened(edge)
    try:
        writer.write(post_head(f"Content-Length: {len(body)}") + body)
        head, _ = await response(reader)
    finally:
        writer.close()
    assert status(head) == 201, head


@pytest.mark.parametrize(
    ("origin", "forwarded", "status"),
    [
        ("https://127.0.0.1:{port}", "https", 101),
        ("https://127.0.0.1:{port}", "https, http", 101),
        ("http://127.0.0.1:{port}", "https", 403),
        ("https://127.0.0.1:{port}", None, 403),
        ("http://127.0.0.1:{port}", None, 101),
    ],
)
async def test_behind_a_trusted_proxy_the_origin_scheme_is_the_forwarded_one(
    edge: ParleyProcess, origin: str, forwarded: str | None, status: int
) -> None:
    assert await origin_status(edge.port, origin, forwarded) == status


def test_no_unhandled_exception_in_the_edge_log(edge: ParleyProcess) -> None:
    """Runs after the cases above on the same server."""
    log = edge.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
