"""A small asyncio client for the Parley protocol, on the `websockets` library.

Used by the tests and `bench/core_numbers.py` (the load kit has its own lighter client,
`server/load/wsclient.py`); also the shortest way to script Parley from Python:

    async with await Client.connect("ws://127.0.0.1:8000/ws", token) as c:
        conv = (await c.request(Create(title="hi"))).conversation
        await c.request(Join(conversation=conv))
        await c.request(Say(conversation=conv, text="Hello"))
        done = await c.wait_for(lambda fr: isinstance(fr, Done))
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

import msgspec
import websockets
from websockets.asyncio.client import ClientConnection

from protocol import frames as f

T = TypeVar("T")

_refs = itertools.count(1)


class ProtocolError(Exception):
    def __init__(self, error: f.Error) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.error = error


class Client:
    """One socket. Received frames are kept in order in `frames` (with arrival times in
    `arrived`) and can be awaited with `wait_for`."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[f.ServerFrame] = []
        self.raw: list[str] = []
        self.arrived: list[float] = []
        self.ready: f.Ready | None = None
        self.closed: asyncio.Future[tuple[int | None, str]] = (
            asyncio.get_running_loop().create_future()
        )
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(
        cls,
        url: str,
        token: str | None,
        *,
        via: str = "header",
        origin: str | None = None,
        wait_ready: bool = True,
        **kwargs: Any,
    ) -> Client:
        """`via` is "header" (Sec-WebSocket-Protocol bearer), "frame" (first `auth` frame)
        or "none"."""
        protocols = [f.SUBPROTOCOL]
        if token and via == "header":
            protocols.append(f"{f.BEARER_PREFIX}{token}")
        ws = await websockets.connect(
            url,
            subprotocols=protocols,  # type: ignore[arg-type]
            origin=origin,  # type: ignore[arg-type]
            max_size=None,
            compression=None,
            open_timeout=10,
            **kwargs,
        )
        client = cls(ws)
        if token and via == "frame":
            await client.send(f.Auth(token=token))
        if token and wait_ready and via != "none":
            client.ready = await client.wait_for(lambda fr: isinstance(fr, f.Ready), timeout=10)
        return client

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                text = message if isinstance(message, str) else message.decode()
                frame = f.decode_server(text)
                async with self._changed:
                    self.raw.append(text)
                    self.frames.append(frame)
                    self.arrived.append(time.monotonic())
                    self._changed.notify_all()
        except (websockets.ConnectionClosed, msgspec.DecodeError):
            pass
        finally:
            if not self.closed.done():
                rcvd = self.ws.protocol.close_rcvd
                self.closed.set_result((rcvd.code, rcvd.reason) if rcvd else (None, ""))
            async with self._changed:
                self._changed.notify_all()

    async def send(self, frame: f.ClientFrame | dict[str, Any] | str | bytes) -> None:
        if isinstance(frame, str | bytes):
            await self.ws.send(frame)
        else:
            await self.ws.send(msgspec.json.encode(frame).decode())

    async def wait_for(
        self, match: Callable[[f.ServerFrame], bool], *, start: int = 0, timeout: float = 10.0
    ) -> Any:
        """The first frame at index >= start that matches, waiting for it if need be."""
        async with asyncio.timeout(timeout), self._changed:
            index = start
            while True:
                for frame in self.frames[index:]:
                    if match(frame):
                        return frame
                index = len(self.frames)
                if self.closed.done():
                    raise ConnectionError(f"socket closed: {self.closed.result()}")
                await self._changed.wait()

    async def request(self, frame: Any, timeout: float = 10.0) -> Any:
        """Send a frame with a fresh `ref` and return the reply carrying it (raise on error)."""
        ref = f"r{next(_refs)}"
        frame = msgspec.structs.replace(frame, ref=ref)
        start = len(self.frames)
        await self.send(frame)
        reply = await self.wait_for(
            lambda fr: getattr(fr, "ref", None) == ref, start=start, timeout=timeout
        )
        if isinstance(reply, f.Error):
            raise ProtocolError(reply)
        return reply

    def events(self, conversation: Any) -> list[Any]:
        """The conversation events received so far, in arrival order (a refused turn's
        `error` is one)."""
        return [
            fr
            for fr in self.frames
            if isinstance(fr, f.ConversationEvent | f.Error) and fr.conversation == conversation
        ]
