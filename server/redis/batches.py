"""Asks gathered into batches: whatever is asked while one batch is in flight goes in the next.

A web process asks Redis the same kind of question for every socket it sets up (may this
user open one more? what does this joining socket need?). Under a connection storm those
asks arrive by the thousand: sent in batches they cost one Redis round trip (one script
call, as a rule) per few dozen sockets instead of one each. Alone, an ask waits for no one:
its batch is sent at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

Send = Callable[[list[T]], Awaitable[Sequence[R | BaseException]]]
"""Answers a batch of asks, one result per ask, in order: an exception given as a result
fails its ask alone, one raised the whole batch."""


class Batches(Generic[T, R]):
    """Sends asks to `send` in batches of at most `most`, one batch in flight at a time:
    the task sending them runs only while there are asks (nothing is left behind when
    idle)."""

    def __init__(self, send: Send[T, R], most: int) -> None:
        self.send = send
        self.most = most
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None

    async def ask(self, item: T) -> R:
        """`item`'s result, or the error its batch failed with."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._task is None:
            self._task = asyncio.create_task(self._batches())
        return await future

    def stop(self) -> None:
        """Fail what is waiting (ConnectionError) and send nothing more."""
        if self._task is not None:
            self._task.cancel()

    async def _batches(self) -> None:
        try:
            await self._send_all()
        finally:
            _fail(self._waiting, ConnectionError("the process is stopping"))
            self._waiting.clear()
            self._task = None

    async def _send_all(self) -> None:
        while self._waiting:
            batch = self._waiting[: self.most]
            del self._waiting[: self.most]
            try:
                results = await self.send([item for item, _ in batch])
            except asyncio.CancelledError:
                _fail(batch, ConnectionError("the process is stopping"))
                raise
            except Exception as exc:  # the batch fails, not the asks queued behind it
                _fail(batch, exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue  # its asker went meanwhile
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)


def _fail(waiting: list[tuple[T, asyncio.Future[R]]], exc: BaseException) -> None:
    for _, future in waiting:
        if not future.done():
            future.set_exception(exc)
