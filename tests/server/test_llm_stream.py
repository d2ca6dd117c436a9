"""`LLM.stream` reads the model's server-sent events itself: the bytes on the wire, in every
shape an OpenAI-compatible server may send them, against a real HTTP server on 127.0.0.1
that writes a fixed body (for the shapes the simulator never sends) or the simulated model."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import openai
import pytest

from server.app.config import LLMSettings
from server.generation.llm import LLM, MAX_EVENT_BYTES, Finished, MalformedReply, Piece
from tests.helpers.chunked import Writer, chunked_server, framed
from tests.helpers.replies import Way, reply_of
from tests.helpers.simulated import eventually, serving


def chunk(content: str, finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": {"content": content}, "finish_reason": finish}
    return json.dumps({"id": "c", "model": "m", "choices": [choice]}).encode()


def sse(*payloads: bytes, newline: bytes = b"\n") -> bytes:
    return b"".join(b"data: " + p + newline + newline for p in payloads)


def upstream(write_body: Writer) -> contextlib.AbstractAsyncContextManager[str]:
    """A server answering every request 200 with a chunked body `write_body` writes (each
    write one chunk, see `framed`): the base URL."""
    return chunked_server(write_body, "/v1")


def body(data: bytes, pieces: int = 1) -> Writer:
    """Writes `data` in `pieces` TCP writes, each flushed, so the reader sees split blocks."""

    async def write(writer: asyncio.StreamWriter) -> None:
        step = max(1, -(-len(data) // pieces))
        for start in range(0, len(data), step):
            writer.write(framed(data[start : start + step]))
            await writer.drain()
            await asyncio.sleep(0.002)

    return write


async def relay(base_url: str, way: Way, prompt: str = "q") -> tuple[str, Finished]:
    llm = LLM(LLMSettings(), base_url)
    try:
        async with asyncio.timeout(10):
            items, finished = await reply_of(llm, way, prompt)
    finally:
        await llm.close()
    assert all(isinstance(item, Piece) for item in items)
    return "".join(item.text for item in items if isinstance(item, Piece)), finished


REPLY = [chunk("Hello"), chunk(", wor"), chunk("ld", "length"), b"[DONE]"]


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
@pytest.mark.parametrize("pieces", [1, 7, 400])
async def test_every_line_ending_and_any_split(way: Way, newline: bytes, pieces: int) -> None:
    async with upstream(body(sse(*REPLY, newline=newline), pieces)) as url:
        text, finished = await relay(url, way)
    assert (text, finished.reason, finished.model) == ("Hello, world", "length", "m")


async def test_comments_other_fields_and_multiline_data(way: Way) -> None:
    split = chunk("two lines").replace(b", ", b",\ndata: ", 1)  # one event, two data lines
    wire = (
        b": keep-alive\n\nevent: message\nid: 1\nretry: 5\n"
        + sse(chunk("one "))
        + b"data: "
        + split
        + b"\n\ndata:"  # no space after the colon
        + chunk("!")
        + b"\n\n"
        + sse(b"[DONE]")
        + sse(chunk(" never read"))
    )
    async with upstream(body(wire, 3)) as url:
        text, _ = await relay(url, way)
    assert text == "one two lines!"


@pytest.mark.parametrize(
    ("sent", "reason"),
    [("stop", "stop"), ("length", "length"), ("content_filter", "content_filter"),
     ("tool_calls", "tool_calls"), ("function_call", "tool_calls"),  # its deprecated name
     ("eos_token", "stop"), (None, "stop")],  # one outside OpenAI's set, or none at all
)  # fmt: skip
async def test_the_finish_reason_as_a_server_names_it(
    way: Way, sent: str | None, reason: str
) -> None:
    wire = sse(chunk("a"), chunk("b", sent), b"[DONE]")
    async with upstream(body(wire)) as url:
        text, finished = await relay(url, way)
    assert (text, finished.reason) == ("ab", reason)


async def test_bytes_that_are_not_utf8_become_replacement_characters(way: Way) -> None:
    wire = sse(chunk("ok ").replace(b"ok", b"o\xffk"), b"[DONE]")
    async with upstream(body(wire)) as url:
        text, _ = await relay(url, way)
    assert text == "o\ufffdk "


async def test_an_error_inside_the_stream_is_the_models_error(way: Way) -> None:
    error = json.dumps({"error": {"message": "the model is overloaded", "code": 503}}).encode()
    async with upstream(body(sse(chunk("partial"), error))) as url:
        with pytest.raises(openai.APIError, match="the model is overloaded"):
            await relay(url, way)


@pytest.mark.parametrize(
    ("opening", "each"),
    [(b'data: {"choices": [{"delta": {"content": "', b"a" * 65536),  # a line with no end
     (b"data: a\n", b"data: " + b"a" * 65536 + b"\n")],  # an event of ever more data lines
)  # fmt: skip
async def test_a_line_or_event_is_refused_at_the_limit(
    way: Way, opening: bytes, each: bytes
) -> None:
    async def endless(writer: asyncio.StreamWriter) -> None:
        writer.write(framed(opening))
        for _ in range(MAX_EVENT_BYTES // len(each) + 8):
            writer.write(framed(each))
            await writer.drain()

    async with upstream(endless) as url:
        with pytest.raises(MalformedReply, match="longer than the limit"):
            await relay(url, way)


async def test_a_connection_dropped_mid_body_is_a_connection_error(way: Way) -> None:
    async def dropped(writer: asyncio.StreamWriter) -> None:
        writer.write(framed(b"data: " + chunk("half")[:10]))
        await writer.drain()
        writer.transport.abort()

    async with upstream(dropped) as url:
        with pytest.raises(openai.APIConnectionError):
            await relay(url, way)


async def test_a_status_error_is_raised_before_streaming(way: Way) -> None:
    async with serving() as sim:
        with pytest.raises(openai.RateLimitError):
            await relay(sim.base_url, way, "[sim:status=429] q")
        with pytest.raises(openai.NotFoundError):
            await relay(sim.base_url, way, "[sim:status=404] q")
        assert sim.stats.started == 0


async def test_closing_the_stream_early_closes_the_http_response() -> None:
    async with serving() as sim:
        llm = LLM(LLMSettings(), sim.base_url)
        try:
            stream = llm.stream("m", [{"role": "user", "content": "[sim:tokens=500][sim:tps=50]"}])
            assert isinstance(await anext(stream), Piece)
            await stream.aclose()
            await eventually(lambda: sim.stats.aborted == 1, within=2)
            assert sim.stats.active == 0
        finally:
            await llm.close()


async def test_a_body_kept_open_after_done_does_not_delay_the_end(way: Way) -> None:
    async def lingering(writer: asyncio.StreamWriter) -> None:
        writer.write(framed(sse(chunk("bye", "stop"), b"[DONE]")))
        await writer.drain()
        await asyncio.sleep(3)

    async with upstream(lingering) as url:
        began = time.monotonic()
        text, finished = await relay(url, way)
        assert time.monotonic() - began < 0.6
    assert (text, finished.reason) == ("bye", "stop")
