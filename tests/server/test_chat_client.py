"""The worker's `openai` client builds each streamed chat completion's request from the one it
built first: what goes on the wire must be what the `openai` client itself sends, on the
first request, on the next ones and on a retry (a real HTTP server on 127.0.0.1 records the
requests)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai

from server.app.config import LLMSettings
from server.generation.chatclient import UNSENT_KEY
from server.generation.llm import _STREAMED, LLM, Finished, _http_client

REPLY = b'data: {"choices":[{"delta":{"content":"hi"},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'

Recorded = tuple[list[tuple[bytes, bytes]], bytes]
"""A request's head (its request line as ("", line), then each header) and its body."""


@contextlib.asynccontextmanager
async def recording(
    dropped: frozenset[int] = frozenset(),
) -> AsyncIterator[tuple[str, list[Recorded]]]:
    """An HTTP/1.1 server recording each request and answering it with a short streamed
    reply; the connection of a request whose number (from 0) is `dropped` is closed
    unanswered (a retry follows)."""
    recorded: list[Recorded] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")[:-2]
                lines = [(b"", head[0])] + [
                    (name.strip().lower(), value.strip())
                    for name, _, value in (line.partition(b":") for line in head[1:])
                ]
                length = int(dict(lines)[b"content-length"])
                recorded.append((lines, await reader.readexactly(length)))
                if len(recorded) - 1 in dropped:
                    break
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(REPLY), REPLY)
                )
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1", recorded
    finally:
        server.close()
        await server.wait_closed()


async def relay(llm: LLM, prompt: str) -> None:
    async with asyncio.timeout(10):
        items = [item async for item in llm.stream("m", [{"role": "user", "content": prompt}])]
    assert isinstance(items[-1], Finished) and items[-1].reason == "stop"


async def sent_by_openai(base_url: str, settings: LLMSettings, content: bytes) -> None:
    """The same request, sent by the `openai` client as it is."""
    client = openai.AsyncOpenAI(
        base_url=base_url,
        api_key=settings.api_key,
        timeout=openai.Timeout(
            max(settings.first_chunk_timeout, settings.stall_timeout),
            connect=settings.request_timeout,
        ),
        max_retries=1,
        http_client=_http_client(),
    )
    try:
        response = await client.post(
            "/chat/completions", cast_to=httpx2.Response, content=content, options=_STREAMED
        )
        await response.aclose()
    finally:
        await client.close()


async def test_every_request_is_what_the_openai_client_sends() -> None:
    settings = LLMSettings(api_key="sk-test")
    async with recording() as (base_url, recorded):
        llm = LLM(settings, base_url)
        try:
            for prompt in ("one", "two", "three"):
                await relay(llm, prompt)
        finally:
            await llm.close()
        for _, content in list(recorded):
            await sent_by_openai(base_url, settings, content)
        ours, theirs = recorded[:3], recorded[3:]
    assert [content for _, content in ours] == [content for _, content in theirs]
    assert [b'"content":"one"' in c for _, c in ours] == [True, False, False]
    assert [head for head, _ in ours] == [head for head, _ in theirs]
    assert dict(ours[0][0])[b"x-stainless-retry-count"] == b"0"
    assert dict(ours[0][0])[b"authorization"] == b"Bearer sk-test"


async def test_a_retried_request_says_it_is_one_each_time() -> None:
    settings = LLMSettings(api_key="sk-test")
    async with recording(dropped=frozenset({0, 2})) as (base_url, recorded):
        llm = LLM(settings, base_url)
        try:
            await relay(llm, "once")
            await relay(llm, "more")  # (as long: the same content-length)
        finally:
            await llm.close()
    heads = [head for head, _ in recorded]
    contents = [content for _, content in recorded]
    assert contents[0] == contents[1] != contents[2] == contents[3]
    tries = [dict(head)[b"x-stainless-retry-count"] for head in heads]
    assert tries == [b"0", b"1", b"0", b"1"]
    assert heads[0] == heads[2] and heads[1] == heads[3]  # built again, the same
    assert [h for h in heads[0] if h[0] != b"x-stainless-retry-count"] == [
        h for h in heads[1] if h[0] != b"x-stainless-retry-count"
    ]


async def test_no_idempotency_key_is_made_for_a_client_that_sends_none() -> None:
    async with recording() as (base_url, recorded):
        llm = LLM(LLMSettings(api_key="sk-test"), base_url)
        try:
            keys = {llm.client._idempotency_key() for _ in range(3)}
            await relay(llm, "one")
            await relay(llm, "two")
        finally:
            await llm.close()
    assert keys == {UNSENT_KEY}  # (the client's own makes a uuid4 each time)
    assert all(not name.startswith(b"idempotency") for head, _ in recorded for name, _ in head)


async def test_a_client_that_sends_an_idempotency_key_sends_one_per_call_kept_on_retry() -> None:
    async with recording(dropped=frozenset({1})) as (base_url, recorded):
        llm = LLM(LLMSettings(api_key="sk-test"), base_url)
        try:
            await relay(llm, "none")
            llm.client._idempotency_header = "Idempotency-Key"  # (from the next call on)
            await relay(llm, "one")
            await relay(llm, "two")
        finally:
            await llm.close()
    keys = [dict(head).get(b"idempotency-key") for head, _ in recorded]
    assert len(keys) == 4 and keys[0] is None
    assert all(key and key.startswith(b"stainless-python-retry-") for key in keys[1:])
    assert keys[1] == keys[2] != keys[3]  # the retry keeps its call's key


async def test_a_request_built_again_knows_its_headers_encoding() -> None:
    """(a copy of httpx2's headers works its encoding out again, decoding every header, at
    its first read: the client, httpx2 and the transport read them at each call)"""
    encodings: list[str | None] = []
    async with recording() as (base_url, _):
        llm = LLM(LLMSettings(api_key="sk-test"), base_url)
        build = llm.client._build_request

        def recorded_build(*args: Any, **kwargs: Any) -> httpx2.Request:
            request = build(*args, **kwargs)
            encodings.append(request.headers._encoding)
            return request

        llm.client._build_request = recorded_build  # type: ignore[method-assign]
        try:
            await relay(llm, "one")
            await relay(llm, "two")
        finally:
            await llm.close()
    assert encodings[1:] == ["ascii"]
