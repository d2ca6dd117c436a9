"""`server.log_format = "json"`: one object per line, the ids in scope, no message text."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import uuid
from typing import Any

import pytest

from protocol import frames as f
from server.app import logs
from server.dev.client import Client
from tests.helpers.auth import mint, new_user
from tests.helpers.processes import Cluster, Db, redis_db


def test_json_line_carries_the_ids_set_in_context() -> None:
    record = logging.LogRecord("parley.worker", logging.WARNING, __file__, 1, "x %s", ("y",), None)
    context = logs.CONVERSATION.set("c-1")
    try:
        logs.WORKER.set("w-1")
        line = json.loads(logs.JsonFormatter().format(record))
    finally:
        logs.CONVERSATION.reset(context)
        logs.WORKER.set(None)
    assert line["level"] == "warning"
    assert line["logger"] == "parley.worker"
    assert line["message"] == "x y"
    assert line["conversation"] == "c-1"
    assert line["worker"] == "w-1"
    assert "message_id" not in line
    assert "session" not in line


def test_exception_is_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("p", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    text = logs.JsonFormatter().format(record)
    assert "\n" not in text
    assert "ValueError: boom" in json.loads(text)["exception"]


@pytest.mark.e2e  # a real `parley serve`: the slow tier
async def test_json_logs_of_a_real_process(cluster: Cluster) -> None:
    # A Redis database of its own, so that this server's worker, not another test's, takes
    # the turn (the turns stream is per database).
    own_db = redis_db(cluster.services.redis_url, Db.LOGS)
    server = cluster.process("serve", PARLEY_SERVER_LOG_FORMAT="json", REDIS_URL=own_db)
    try:
        user = new_user()
        secret_text = f"do not log {uuid.uuid4().hex}"
        client = await Client.connect(server.ws_url, mint(user))
        try:
            created = await client.request(f.Create(title="logged"))
            await client.request(f.Join(conversation=created.conversation))
            start = len(client.frames)
            say = f.Say(conversation=created.conversation, text=f"{secret_text} [sim:status=503]")
            await client.request(say)
            done = await client.wait_for(lambda fr: isinstance(fr, f.Done), start=start)
            assert done.reason == "error"
        finally:
            await client.close()
        lines = await asyncio.to_thread(json_lines, server, "model error")
        warning = next(line for line in lines if line["message"].startswith("model error"))
        assert warning["level"] == "warning"
        assert warning["conversation"] == str(created.conversation)
        assert uuid.UUID(warning["message_id"])
        assert warning["worker"]
        log_text = server.log()
        assert secret_text not in log_text
        assert mint(user).split(".")[1] not in log_text
    finally:
        server.stop()


def json_lines(server: Any, wanted: str, timeout: float = 10) -> list[dict[str, Any]]:
    """The log's JSON lines, once one contains `wanted` (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        text = server.log()
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        if any(wanted in line["message"] for line in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)
