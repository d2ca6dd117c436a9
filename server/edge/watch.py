"""One socket watching one conversation: the bus listener that gives the socket each of the
conversation's events exactly once and in seq order.

Live frames come from the process's pub/sub connection (`Bus`); the `Cursor` merges them by
seq with what is read from the conversation's event log when the socket joins with `after`,
when a live frame skips a seq, or when the bus reconnects. When the log no longer holds what
the socket misses, the socket gets `joined` with `reset` and the full history instead.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, Final, Protocol

import msgspec

from protocol import frames as f
from protocol import wsframe
from protocol.resume import CatchUp, Cursor, NextStep, Verdict, resume_point
from protocol.session import CloseCode
from server.app import metrics
from server.edge.conversations import Refused
from server.redis.client import UNREACHABLE
from server.redis.eventlog import Opening

log = logging.getLogger("parley.watch")

CATCH_UP_ATTEMPTS: Final = 5

Spawn = Callable[[Coroutine[Any, Any, None]], None]
"""Runs a background task that the process keeps referenced (`Hub.spawn`)."""


class Sink(Protocol):
    """What a watch calls on its socket (`server.edge.connection.Connection`)."""

    def push(self, frame: bytes) -> None: ...

    def push_frame(self, frame: f.ServerFrame) -> None: ...

    def close(self, code: CloseCode, reason: str) -> None: ...


class Transcripts(Protocol):
    """What a watch reads (`server.edge.conversations.Conversations`)."""

    async def owned(self, user: str, conversation: uuid.UUID) -> f.Conversation: ...

    async def read_events(
        self, conversation: uuid.UUID, after: int
    ) -> tuple[int, list[tuple[int, bytes]]]: ...

    async def history(
        self, conversation: uuid.UUID, cached: bool = True
    ) -> tuple[int, list[f.Message]]: ...

    async def opening(self, user: str, conversation: uuid.UUID, after: int | None) -> Opening: ...


class Watch:
    __slots__ = (
        "active",
        "catching_up",
        "conversation",
        "conversations",
        "cursor",
        "socket",
        "spawn",
        "user",
    )

    def __init__(
        self,
        socket: Sink,
        conversation: uuid.UUID,
        conversations: Transcripts,
        user: str,
        spawn: Spawn,
    ) -> None:
        self.socket = socket
        self.conversation = conversation
        self.conversations = conversations
        self.user = user
        self.spawn = spawn
        self.cursor = Cursor()
        self.active = True
        self.catching_up = False

    def on_event(self, seq: int, frame: bytes) -> None:
        verdict = self.cursor.live(seq, frame)
        if verdict is Verdict.SEND:
            self.socket.push(frame)
        elif verdict is Verdict.GAP:
            self._start_catch_up()

    def resync(self) -> None:
        self.cursor.catching_up = True
        self._start_catch_up()

    def _start_catch_up(self) -> None:
        if not self.catching_up:
            self.catching_up = True
            self.spawn(self._catch_up_task())

    async def _catch_up_task(self) -> None:
        try:
            await self.catch_up()
        except (*UNREACHABLE, Refused) as exc:
            # left catching up, the socket would hold every live frame from now on
            log.warning("catch-up failed for %s: %s", self.conversation, exc)
            self.socket.close(CloseCode.TRY_AGAIN_LATER, "lost track of the conversation; rejoin")
        finally:
            self.catching_up = False

    async def _read(self, after: int) -> tuple[int, list[tuple[int, bytes]]]:
        head, logged = await self.conversations.read_events(self.conversation, after)
        return head, [(seq, wsframe.text(payload)) for seq, payload in logged]

    async def join(self, after: int | None, ref: str | None) -> None:
        """Send `joined` and the events after `after`, or the full history when `after` is
        absent or its events are no longer retained (then with `reset`). The ownership, the
        row and what follows `after` (or the cached history) come in one read."""
        opened = await self.conversations.opening(self.user, self.conversation, after)
        assert opened.meta is not None  # `opening` refuses a conversation it cannot show
        meta = opened.meta.meta
        events = [(seq, wsframe.text(payload)) for seq, payload in opened.events]
        if after is None:
            assert opened.history is not None
            result = self._send_opening(
                meta, opened.history.seq, opened.history.messages, ref, events, opened.head
            )
        else:
            metrics.REJOINS.inc()
            self.cursor.start_at(after)
            result = self.cursor.catch_up(events, opened.head)
            if result.next_step is NextStep.RESET:
                result = await self._send_history(meta, ref, reset=True, lost=after > opened.head)
            else:
                metrics.REPLAYED.observe(len(result.frames))
                self._send_joined(meta, opened.head, after, None, False, ref, result.frames)
        if result.next_step is NextStep.AGAIN:
            self._start_catch_up()

    async def catch_up(self) -> None:
        """Fill a gap from the log; when the log no longer has it, send the full history."""
        for _ in range(CATCH_UP_ATTEMPTS):
            if not self.active:
                return
            head, logged = await self._read(self.cursor.last_seq)
            ahead = self.cursor.last_seq > head
            result = self.cursor.catch_up(logged, head)
            for frame in result.frames:
                self.socket.push(frame)
            if result.next_step is NextStep.RESET:
                meta = await self.conversations.owned(self.user, self.conversation)
                if (
                    await self._send_history(meta, None, reset=True, lost=ahead)
                ).next_step is not NextStep.AGAIN:
                    return
            elif result.next_step is NextStep.LIVE:
                return
            await asyncio.sleep(0.05)
        raise Refused("unavailable", "could not catch up with the conversation")

    async def _send_history(
        self, meta: f.Conversation, ref: str | None, reset: bool, lost: bool = False
    ) -> CatchUp:
        """`joined` with the persisted history; `lost`: the socket holds seqs past the log's
        head (Redis lost events it had acknowledged), so the history is read from PostgreSQL,
        not a copy Redis kept from before the loss, which also raises Redis's seq counter to
        PostgreSQL's (`Conversations.history`)."""
        history_seq, history = await self.conversations.history(self.conversation, cached=not lost)
        self.cursor.reset()  # live frames held from here on are after what is read next
        self.cursor.start_at(history_seq)
        head, logged = await self._read(history_seq)
        return self._send_opening(meta, history_seq, history, ref, logged, head, reset)

    def _send_opening(
        self,
        meta: f.Conversation,
        history_seq: int,
        history: list[f.Message],
        ref: str | None,
        logged: list[tuple[int, bytes]],
        head: int,
        reset: bool = False,
    ) -> CatchUp:
        """`joined` with the history up to `history_seq` and the events logged after it (read
        after the socket subscribed: live frames held since then are merged, none lost); the
        catch-up's outcome (AGAIN: a live frame past the log's head skipped a seq).

        Where Redis lost events PostgreSQL never got, the socket follows the log from past
        them (`resume_point`): left waiting for them, it would hold every live frame from
        then on."""
        start = resume_point(logged, history_seq, head)
        if start != history_seq:
            log.warning("events %d..%d of %s are lost", history_seq + 1, start, self.conversation)
        self.cursor.start_at(start)
        result = self.cursor.catch_up(logged, head)
        self._send_joined(meta, head, start, history, reset, ref, result.frames)
        return result

    def _send_joined(
        self,
        meta: f.Conversation,
        head: int,
        start: int,
        history: list[f.Message] | None,
        reset: bool,
        ref: str | None,
        frames: list[bytes],
    ) -> None:
        meta = msgspec.structs.replace(meta, last_seq=max(head, 0))
        metrics.JOINS.inc()
        if reset:
            metrics.RESETS.inc()
        self.socket.push_frame(
            f.Joined(
                conversation=self.conversation,
                meta=meta,
                last_seq=start,
                history=history,
                reset=reset,
                ref=ref,
            )
        )
        for frame in frames:
            self.socket.push(frame)
