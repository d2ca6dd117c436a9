"""Nothing a client sends may break its session, another session or the process: every bad
frame gets an `error` naming the problem or a documented close code."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
import uuid
from typing import Any

import pytest

from protocol import frames as f
from server.dev.client import Client
from tests.helpers.auth import mint
from tests.helpers.conversations import say_and_finish, start_conversation
from tests.helpers.processes import Db, redis_db

BAD_FRAMES: list[tuple[str, str | bytes, str, str]] = [
    ("not-json", "{nope", "bad_frame", "not valid JSON"),
    ("empty", "", "bad_frame", "not valid JSON"),
    ("array", "[1, 2]", "bad_frame", "JSON object"),
    ("number", "42", "bad_frame", "JSON object"),
    ("no-type", '{"conversation": "x"}', "bad_frame", "`type`"),
    ("type-not-string", '{"type": 7}', "bad_frame", "`type`"),
    ("unknown-type", '{"type": "teleport"}', "bad_frame", "unknown frame type"),
    ("say-missing-text", '{"type": "say", "conversation": "CONV"}', "invalid", "text"),
    (
        "say-text-not-string",
        '{"type": "say", "conversation": "CONV", "text": 5}',
        "invalid",
        "text",
    ),
    ("bad-uuid", '{"type": "join", "conversation": "not-a-uuid"}', "invalid", "conversation"),
    ("negative-after", '{"type": "join", "conversation": "CONV", "after": -1}', "invalid", "after"),
    ("unknown-field", '{"type": "ping", "colour": "red"}', "invalid", "colour"),
    ("ref-too-long", '{"type": "ping", "ref": "' + "r" * 65 + '"}', "invalid", "ref"),
    ("empty-text", '{"type": "say", "conversation": "CONV", "text": "   "}', "invalid", "empty"),
    (
        "text-too-long",
        '{"type": "say", "conversation": "CONV", "text": "LONG"}',
        "too_large",
        "limit",
    ),
    ("unknown-conversation", '{"type": "join", "conversation": "OTHER"}', "not_found", "no such"),
    ("binary", b"\x00\x01binary", "bad_frame", "binary"),
    ("deep-array", "[" * 50_000, "bad_frame", "levels deep"),
    ("deep-objects", '{"a":' * 20_000 + "1" + "}" * 20_000, "bad_frame", "levels deep"),
    (
        "deep-in-a-field",
        '{"type": "ping", "extra": ' + "[" * 50_000 + "]" * 50_000 + "}",
        "bad_frame",
        "levels deep",
    ),
    (
        "deep-in-a-known-field",
        '{"type": "say", "conversation": "CONV", "text": ' + "[" * 50_000 + "]" * 50_000 + "}",
        "bad_frame",
        "levels deep",
    ),
    (
        "after-1e30",
        '{"type": "join", "conversation": "CONV", "after": 1' + "0" * 30 + "}",
        "invalid",
        "after",
    ),
    (
        "after-2-64",
        '{"type": "join", "conversation": "CONV", "after": 18446744073709551616}',
        "invalid",
        "after",
    ),
    (
        "after-2-53-plus-1",
        '{"type": "join", "conversation": "CONV", "after": 9007199254740993}',
        "invalid",
        "after",
    ),
    (
        "seq-as-float",
        '{"type": "join", "conversation": "CONV", "after": 1e300}',
        "invalid",
        "after",
    ),
    ("title-too-long", '{"type": "create", "title": "' + "t" * 201 + '"}', "invalid", "title"),
    (
        "system-too-long",
        '{"type": "create", "system": "' + "s" * 32_001 + '"}',
        "invalid",
        "system",
    ),
    ("token-too-long", '{"type": "auth", "token": "' + "t" * 8193 + '"}', "invalid", "token"),
    ("title-nul", '{"type": "create", "title": "a\\u0000b"}', "invalid", ""),
]


@pytest.mark.parametrize(
    ("name", "raw", "code", "words"), BAD_FRAMES, ids=[b[0] for b in BAD_FRAMES]
)
async def test_bad_frame_gets_error_and_session_goes_on(
    connect: Any, user: str, name: str, raw: str | bytes, code: str, words: str
) -> None:
    client: Client = await connect(user)
    bystander: Client = await connect()
    conversation = await start_conversation(client)
    if isinstance(raw, str):
        raw = (
            raw.replace("CONV", str(conversation))
            .replace("OTHER", str(uuid.uuid4()))
            .replace("LONG", "x" * 32_001)
        )
    start = len(client.frames)
    await client.send(raw)
    error = await client.wait_for(lambda fr: isinstance(fr, f.Error), start=start)
    assert error.code == code
    assert words.lower() in error.message.lower()
    done = await say_and_finish(client, conversation, "still working?")
    assert done.reason == "stop"
    assert isinstance(await bystander.request(f.Ping()), f.Pong)


def _rest(parley: Any, method: str, path: str, body: bytes, user: str | None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if user is not None:
        headers["Authorization"] = f"Bearer {mint(user)}"
    request = urllib.request.Request(parley.url + path, body, headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


DEEP_BODIES = {
    "array": b"[" * 50_000,
    "objects": b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
    "in-a-field": b'{"title": "x", "system": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
}


@pytest.mark.parametrize("body", DEEP_BODIES.values(), ids=DEEP_BODIES.keys())
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/conversations"),
        ("PATCH", "/api/conversations/ID"),
        ("POST", "/api/dev/token"),
    ],
)
async def test_deeply_nested_rest_body_is_400_or_401_never_500(
    parley: Any, connect: Any, user: str, method: str, path: str, body: bytes
) -> None:
    client: Client = await connect(user)
    path = path.replace("ID", str(await start_conversation(client)))
    status, error = await asyncio.to_thread(_rest, parley, method, path, body, user)
    assert status == 400 and "levels deep" in error["detail"], (status, error)
    if path.startswith("/api/conversations"):
        anonymous, _ = await asyncio.to_thread(_rest, parley, method, path, body, None)
        assert anonymous == 401
    status, _ = await asyncio.to_thread(
        _rest, parley, "POST", "/api/conversations", b'{"title": "fine"}', user
    )
    assert status == 201


@pytest.mark.parametrize("field", ["title", "system", "model"])
async def test_a_value_the_database_refuses_is_invalid_not_an_outage(
    parley: Any, connect: Any, user: str, field: str
) -> None:
    """PostgreSQL cannot store NUL in text: that is the request's fault (400 / `invalid`)."""
    body = json.dumps({field: "a\u0000b"}).encode()
    status, error = await asyncio.to_thread(_rest, parley, "POST", "/api/conversations", body, user)
    assert status == 400, (status, error)
    client: Client = await connect(user)
    start = len(client.frames)
    await client.send(json.dumps({"type": "create", field: "a\u0000b", "ref": "nul"}))
    refused = await client.wait_for(lambda fr: isinstance(fr, f.Error), start=start)
    assert (refused.code, refused.ref) == ("invalid", "nul")
    conversation = await start_conversation(client)
    assert (await say_and_finish(client, conversation, "still here")).reason == "stop"


async def test_error_keeps_the_ref(connect: Any) -> None:
    client: Client = await connect()
    await client.send('{"type": "join", "conversation": "nope", "ref": "mine"}')
    error = await client.wait_for(lambda fr: isinstance(fr, f.Error))
    assert error.ref == "mine" and error.code == "invalid"


async def test_oversized_frame_closes_1009_and_nothing_else(connect: Any, user: str) -> None:
    client: Client = await connect(user)
    other: Client = await connect(user)
    await client.send('{"type": "ping", "ref": "' + "x" * 300_000 + '"}')
    code, _ = await asyncio.wait_for(client.closed, 5)
    assert code == 1009
    conversation = await start_conversation(other)
    assert (await say_and_finish(other, conversation, "fine")).reason == "stop"


async def test_repeated_garbage_closes_4400(connect: Any) -> None:
    client: Client = await connect()
    for _ in range(25):
        if client.closed.done():
            break
        await client.send("garbage")
    code, _ = await asyncio.wait_for(client.closed, 5)
    assert code == 4400


async def test_frame_flood_is_rate_limited_then_closed_4429(connect: Any) -> None:
    client: Client = await connect()
    for _ in range(600):
        if client.closed.done():
            break
        await client.send('{"type": "ping"}')
    await asyncio.sleep(0.3)
    limited = [fr for fr in client.frames if isinstance(fr, f.Error)]
    assert limited and all(e.code == "rate_limited" and e.retry_after for e in limited)
    code, _ = await asyncio.wait_for(client.closed, 5)
    assert code == 4429


async def test_silence_after_connect_gets_4408(cluster: Any) -> None:
    server = cluster.process(
        "serve",
        PARLEY_AUTH_AUTH_TIMEOUT="0.5",
        REDIS_URL=redis_db(cluster.services.redis_url, Db.AUTH_TIMEOUT),
    )
    client = await Client.connect(server.ws_url, None)
    code, _ = await asyncio.wait_for(client.closed, 5)
    assert code == 4408
    server.stop()


def test_no_unhandled_exception_in_the_server_log(parley: Any) -> None:
    """Runs after the cases above on the same shared server."""
    log = parley.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


async def test_a_malformed_model_reply_ends_the_turn_with_error(connect: Any) -> None:
    """The model sends a few tokens, then an event nested 50,000 deep: the turn ends with
    `done` `error`, the worker lives on and the next turn is answered."""
    client: Client = await connect()
    conversation = await start_conversation(client)
    done = await say_and_finish(client, conversation, "break it [sim:malformed]")
    assert done.reason == "error" and done.error and "malformed" in done.error
    assert (await say_and_finish(client, conversation, "and now?")).reason == "stop"
