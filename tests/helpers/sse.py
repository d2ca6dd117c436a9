"""A Server-Sent Events reader over httpx, the way `EventSource` reads a stream: events with
their `id`, `event` and `data`, comment lines counted, and the last id kept for a reconnect."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from protocol import frames as f


@dataclass
class Event:
    id: str | None
    event: str
    data: str

    def frame(self) -> f.ServerFrame:
        return f.decode_server(self.data)

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class Reader:
    """One SSE tab: every event it got across reconnects, and the id it resumes after."""

    events: list[Event] = field(default_factory=list)
    last_id: str | None = None
    comments: int = 0
    ends: int = 0
    """Responses the server ended (not dropped by the reader)."""

    @property
    def frames(self) -> list[f.ServerFrame]:
        return [e.frame() for e in self.events if e.event != "heartbeat"]

    async def read(
        self,
        http: httpx.AsyncClient,
        url: str,
        headers: dict[str, str],
        *,
        stop: Callable[[Event], bool] = lambda _: False,
        timeout: float = 20.0,
    ) -> bool:
        """Read one response until `stop` says so (True) or the server ends it (False)."""
        sent = dict(headers)
        if self.last_id is not None:
            sent["last-event-id"] = self.last_id
        deadline = time.monotonic() + timeout
        async with http.stream("GET", url, headers=sent, timeout=timeout) as response:
            assert response.status_code == 200, await response.aread()
            assert response.headers["content-type"].startswith("text/event-stream")
            fields: dict[str, str] = {}
            async for line in response.aiter_lines():
                assert time.monotonic() < deadline, "the stream ran past the test's bound"
                if line.startswith(":"):
                    self.comments += 1
                elif line:
                    name, _, value = line.partition(":")
                    fields[name] = value.removeprefix(" ")
                elif "data" in fields:
                    event = Event(fields.get("id"), fields.get("event", "message"), fields["data"])
                    if event.id is not None:
                        self.last_id = event.id
                    self.events.append(event)
                    fields = {}
                    if stop(event):
                        return True
                else:
                    fields = {}
        self.ends += 1
        return False


def chunks(body: str) -> list[Any]:
    """The JSON of each `data:` line of an AI SDK UI message stream (`[DONE]` as the string)."""
    out: list[Any] = []
    for line in body.splitlines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


class SseTab:
    """A tab following one conversation over SSE the way the browser UI does: it reads in
    the background, reopens at once with `Last-Event-ID` when the server ends a response
    (its lifetime), and can be dropped mid-stream and reopened on any web process."""

    def __init__(self, http: httpx.AsyncClient, token: str, name: str) -> None:
        self.http = http
        self.headers = {"authorization": f"Bearer {token}"}
        self.name = name
        self.reader = Reader()
        self.reopened = 0
        self._task: asyncio.Task[None] | None = None

    def open(self, url: str) -> None:
        self._task = asyncio.create_task(self._follow(url), name=self.name)

    async def _follow(self, url: str) -> None:
        for _ in range(1000):  # bounded: each response ends within the server's lifetime
            await self.reader.read(self.http, url, self.headers)

    async def drop(self, url: str) -> None:
        """Cut the response wherever it is (mid-event too) and reopen it at `url`."""
        await self.close()
        self.reopened += 1
        self.open(url)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        if task.done():
            task.result()  # a read that failed fails the test, with its reason
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def failed(self) -> BaseException | None:
        task = self._task
        if task is None or not task.done() or task.cancelled():
            return None
        return task.exception()

    @property
    def last_seq(self) -> int:
        return int(self.reader.last_id or 0)
