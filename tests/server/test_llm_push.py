"""`LLM.relay` with the body pushed: the pieces are taken where the connection receives them
(not in the reading task), from a stream cut anywhere across blocks, ended without `[DONE]`,
broken midway, cancelled while nothing arrives, and with a taker that has to wait (the pieces
that come meanwhile held, in order); against a real HTTP server on 127.0.0.1 or the
simulated model, through the real `openai` client."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import pytest

from protocol.toolcalls import Progress
from server.app.config import LLMSettings
from server.generation.llm import LLM, MalformedReply, Piece
from tests.helpers.chunked import Writer, chunked_server, framed
from tests.helpers.replies import Way, reply_of
from tests.helpers.simulated import eventually, serving

Taken = Piece | Progress


def chunk(content: str, finish: str | None = None, field: str = "content") -> bytes:
    choice = {"delta": {field: content}, "finish_reason": finish}
    return json.dumps({"model": "m", "choices": [choice]}, separators=(",", ":")).encode()


def sse(*payloads: bytes, newline: bytes = b"\n") -> bytes:
    return b"".join(b"data: " + p + newline + newline for p in payloads)


def text_of(items: list[Taken]) -> str:
    return "".join(item.text for item in items if isinstance(item, Piece))


async def test_every_cut_of_a_stream_across_two_blocks() -> None:
    wire = sse(
        chunk("thought", field="reasoning_content"), chunk("Hé"), chunk("llo", "length"),
        b"[DONE]", newline=b"\r\n",
    )  # fmt: skip
    cuts = list(range(1, len(wire)))  # each served once (a retried request takes the next)

    async def cut(writer: asyncio.StreamWriter) -> None:
        at = cuts.pop() if cuts else len(wire) // 2
        writer.write(framed(wire[:at]))
        await writer.drain()
        await asyncio.sleep(0.001)
        writer.write(framed(wire[at:]))

    async with chunked_server(cut, "/v1") as url:
        llm = LLM(LLMSettings(), url)
        try:
            for _ in range(2 * len(wire)):
                if not cuts:
                    break
                items, finished = await asyncio.wait_for(reply_of(llm, "relay", "q"), 5)
                kinds = [(i.kind, i.text) for i in items if isinstance(i, Piece)]
                assert kinds == [("reasoning", "thought"), ("text", "Hé"), ("text", "llo")]
                assert (finished.reason, finished.model) == ("length", "m")
        finally:
            await llm.close()
    assert not cuts


async def test_the_pieces_are_taken_where_the_connection_receives_them() -> None:
    async with serving() as sim:
        llm = LLM(LLMSettings(), sim.base_url)
        tasks: list[asyncio.Task[object] | None] = []

        def take(item: Taken) -> None:
            tasks.append(asyncio.current_task())

        try:
            text = "[sim:tokens=40][sim:tps=200] q"
            await llm.relay("m", [{"role": "user", "content": text}], None, take)
        finally:
            await llm.close()
    assert len(tasks) == 40
    # (the pieces already buffered when the push began are taken in the reading task)
    assert tasks.count(None) >= 30


@pytest.mark.parametrize("ending", [b"\n\n", b"\n"])  # the blank line, or none
async def test_a_body_that_ends_without_done_ends_the_reply(way: Way, ending: bytes) -> None:
    wire = sse(chunk("a"), chunk("b")) + b"data: " + chunk("c", "stop") + ending

    async def write(writer: asyncio.StreamWriter) -> None:
        writer.write(framed(wire[:40]))
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(framed(wire[40:]))

    async with chunked_server(write, "/v1") as url:
        llm = LLM(LLMSettings(), url)
        try:
            items, finished = await asyncio.wait_for(reply_of(llm, way, "q"), 10)
        finally:
            await llm.close()
    assert (text_of(items), finished.reason) == ("abc", "stop")


async def test_a_malformed_chunk_midway_keeps_what_came_before(way: Way) -> None:
    async def write(writer: asyncio.StreamWriter) -> None:
        writer.write(framed(sse(chunk("kept "))))
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(framed(sse(b'{"choices": [{"delta": {"content": 7}}]}', chunk("never"))))

    taken: list[Taken] = []
    async with chunked_server(write, "/v1") as url:
        llm = LLM(LLMSettings(), url)
        try:
            with pytest.raises(MalformedReply):
                messages = [{"role": "user", "content": "q"}]
                if way == "relay":
                    await asyncio.wait_for(llm.relay("m", messages, None, taken.append), 10)
                else:
                    async for item in llm.stream("m", messages):
                        taken.append(item)  # type: ignore[arg-type]
        finally:
            await llm.close()
    assert text_of(taken) == "kept "


async def test_a_cancel_while_nothing_arrives_ends_within_half_a_second() -> None:
    async with serving() as sim:
        llm = LLM(LLMSettings(), sim.base_url)
        first = asyncio.Event()
        text = "[sim:tokens=50][sim:tps=0.5][sim:delay=0] q"
        relaying = asyncio.create_task(
            llm.relay("m", [{"role": "user", "content": text}], None, lambda _: first.set())
        )
        try:
            await asyncio.wait_for(first.wait(), 10)
            await asyncio.sleep(0.2)  # the model sends nothing for 2 s now
            began = time.monotonic()
            relaying.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(relaying, 2)
            assert time.monotonic() - began < 0.5
            await eventually(lambda: sim.stats.aborted == 1, within=2)
            assert sim.stats.active == 0
        finally:
            relaying.cancel()
            await llm.close()


async def test_a_taker_that_waits_gets_the_pieces_that_came_meanwhile_after_in_order() -> None:
    words = [f"w{i} " for i in range(30)]

    async def write(writer: asyncio.StreamWriter) -> None:
        for word in words:
            writer.write(framed(sse(chunk(word))))
            await writer.drain()
            await asyncio.sleep(0.005)
        writer.write(framed(sse(b"[DONE]")))

    taken: list[str] = []
    waiting = False

    async def wait() -> None:
        nonlocal waiting
        waiting = True
        await asyncio.sleep(0.1)  # most of the words arrive meanwhile
        waiting = False

    def take(item: Taken) -> Callable[[], Awaitable[None]] | None:
        assert not waiting
        assert isinstance(item, Piece)
        taken.append(item.text)
        return wait if len(taken) in (3, 4) else None  # twice, the second one at once

    writer: Writer = write
    async with chunked_server(writer, "/v1") as url:
        llm = LLM(LLMSettings(), url)
        try:
            finished = await asyncio.wait_for(
                llm.relay("m", [{"role": "user", "content": "q"}], None, take), 10
            )
        finally:
            await llm.close()
    assert taken == words
    assert finished.reason == "stop"
