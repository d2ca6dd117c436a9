"""`body.quick_reader` reads an aiohttp response's body as `readany` does: every byte once and
in order, through bursts that fill aiohttp's buffer past its high-water mark (the connection
paused, then resumed), and with the same error when the connection drops; against a real HTTP
server on 127.0.0.1 through a real aiohttp session."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from server.generation.body import KNOWN, quick_reader
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


async def read_all(url: str, *, delay: float = 0) -> tuple[bytes, int]:
    """The body through `quick_reader`, waiting `delay` before the first read (the burst
    then fills aiohttp's buffer): the bytes and how many reads gave some."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as response,
    ):
        read = quick_reader(response.content)
        await asyncio.sleep(delay)
        blocks: list[bytes] = []
        while block := await read():
            blocks.append(block)
        return b"".join(blocks), len(blocks)


def test_the_installed_aiohttp_has_what_the_quick_reader_reads() -> None:
    assert KNOWN  # else every read silently goes the slower way


@pytest.mark.parametrize("delay", [0, 0.5])
async def test_every_byte_once_and_in_order(delay: float) -> None:
    async with chunked_server(paced) as url:
        got, reads = await asyncio.wait_for(read_all(url, delay=delay), 10)
    assert got == SENT
    assert reads >= 2


async def test_a_connection_dropped_mid_body_raises_as_readany_does() -> None:
    async def dropped(writer: asyncio.StreamWriter) -> None:
        writer.write(framed(b"half"))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()

    async with chunked_server(dropped) as url:
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(read_all(url), 10)
