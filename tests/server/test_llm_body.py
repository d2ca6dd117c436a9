"""`body.pushed` pushes an aiohttp response's body as `readany` reads it: every byte once
and in order, through bursts that fill aiohttp's buffer past its high-water mark (the
connection paused, then resumed), and with the same error when the connection drops;
against a real HTTP server on 127.0.0.1 through a real aiohttp session. A feed that raises
ends the push with its error."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import StreamReader

from server.generation.body import KNOWN, pushed
from tests.helpers.chunked import chunked_server, framed

PIECES = [bytes([65 + i % 26]) * (1 + i * 37 % 300) for i in range(400)]
LARGE = [b"%06d" % i * 700 for i in range(64)]  # 4.1 KiB each, 262 KiB in all
BURST = [b"%06d" % i * 100 for i in range(1024)]
SENT = b"".join(PIECES[:50] + LARGE + PIECES[50:] + BURST) + b"x" * 300_000


async def paced(writer: asyncio.StreamWriter) -> None:
    """One chunk per write (more bytes than aiohttp's high-water mark, read one by one),
    then bursts: many chunks at once, and one chunk of 300 KB."""
    for piece in PIECES[:50] + LARGE:
        writer.write(framed(piece))
        await writer.drain()
        await asyncio.sleep(0.001)
    writer.write(b"".join(framed(piece) for piece in PIECES[50:] + BURST))
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.write(framed(b"x" * 300_000))
    await writer.drain()


@contextlib.asynccontextmanager
async def opened(url: str) -> AsyncIterator[aiohttp.ClientResponse]:
    """A GET of `url` through a real aiohttp session, its body unread."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as response,
    ):
        yield response


async def read_all(url: str) -> bytes:
    """The body through aiohttp's own `readany`."""
    async with opened(url) as response:
        blocks: list[bytes] = []
        while block := await response.content.readany():
            blocks.append(block)
        return b"".join(blocks)


def test_the_installed_aiohttp_has_what_the_push_uses() -> None:
    assert KNOWN  # else every read silently goes the slower way


async def push_all(url: str, *, delay: float = 0) -> tuple[bytes, int, bool]:
    """The body through `pushed`, attached `delay` after the head came (the burst then
    waits in aiohttp's buffer): the bytes, how many blocks, and whether the reader was
    a plain StreamReader again after."""
    async with opened(url) as response:
        await asyncio.sleep(delay)
        blocks: list[bytes] = []
        push = pushed(response.content, lambda block: blocks.append(block) is not None)
        assert push is not None
        try:
            while not push.ended:
                await push.wait()
        finally:
            push.stop()
        return b"".join(blocks), len(blocks), type(response.content) is StreamReader


@pytest.mark.parametrize("delay", [0, 0.5])
async def test_a_pushed_body_every_byte_once_and_in_order(delay: float) -> None:
    async with chunked_server(paced) as url:
        got, blocks, restored = await asyncio.wait_for(push_all(url, delay=delay), 10)
    assert got == SENT
    assert blocks >= 2
    assert restored


@pytest.mark.parametrize("pushing", [False, True])
async def test_a_connection_dropped_mid_body_raises_as_readany_does(pushing: bool) -> None:
    async def dropped(writer: asyncio.StreamWriter) -> None:
        writer.write(framed(b"half"))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()

    async with chunked_server(dropped) as url:
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(push_all(url) if pushing else read_all(url), 10)


async def test_what_the_feed_raises_ends_the_push_and_is_raised_by_wait() -> None:
    def refuse(block: bytes) -> bool:
        raise ValueError("no")

    async with chunked_server(paced) as url, opened(url) as response:
        push = pushed(response.content, refuse)
        assert push is not None
        try:
            with pytest.raises(ValueError, match="no"):
                await asyncio.wait_for(push.wait(), 5)
            assert push.ended
        finally:
            push.stop()
