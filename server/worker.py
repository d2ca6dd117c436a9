"""Generation: claim a turn, build the prompt, stream the model, publish every piece, finish.

A worker reads jobs from the `parley:turns` Stream through the `workers` consumer group, runs
up to `worker.concurrency` generations at once, and listens on the `parley:cancel` channel so
that `cancel` from any tab on any web process stops the upstream stream within milliseconds.
Pieces are appended through the pipeliner (one Redis round trip per batch, not per token).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from dataclasses import dataclass, field
from datetime import datetime

import msgspec
import openai
from redis.asyncio import Redis
from redis.exceptions import RedisError

from protocol import frames as f
from protocol import keys
from protocol.context import build_prompt
from protocol.transcript import status_of
from server.bus import Bus
from server.chat import Chat
from server.config import Settings
from server.eventlog import UNLOADED, EventLog, Pipeliner, encode
from server.llm import LLM, Finished, Piece
from server.turns import Job, Turns
from storage.messages import FinishedTurn

log = logging.getLogger("parley.worker")

_job_decoder = msgspec.json.Decoder(Job)


@dataclass(slots=True)
class Running:
    job: Job
    pump: asyncio.Task[Finished] | None = None
    cancelled: bool = False
    pieces: list[str] = field(default_factory=list)


class Worker:
    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        chat: Chat,
        events: EventLog,
        turns: Turns,
        llm: LLM,
        name: str | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.chat = chat
        self.events = events
        self.turns = turns
        self.llm = llm
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.pipeliner = Pipeliner(redis)
        self.cancels = Bus(settings.redis.url)
        self.running: dict[uuid.UUID, Running] = {}
        self._slot_freed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._draining = False

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        await self.turns.ensure_group(keys.TURNS, keys.WORKERS)
        self.pipeliner.start()
        await self.cancels.start()
        await self.cancels.subscribe(keys.CANCEL, _CancelListener(self))
        heartbeat = asyncio.create_task(self._heartbeat())
        log.info("worker ready (%s)", self.name)
        try:
            await self._claim_loop()
        finally:
            heartbeat.cancel()

    async def stop(self, deadline: float | None = None) -> None:
        """Stop claiming; let running generations finish within the deadline."""
        self._draining = True
        deadline = self.settings.worker.shutdown_deadline if deadline is None else deadline
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=deadline)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=5)
        await self.pipeliner.stop()
        await self.cancels.stop()

    async def _claim_loop(self) -> None:
        while not self._draining:
            free = self.settings.worker.concurrency - len(self._tasks)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                entries = await self.redis.xreadgroup(
                    keys.WORKERS, self.name, {keys.TURNS: ">"}, count=free, block=1000
                )
            except (RedisError, OSError) as exc:
                log.warning("cannot read turns (%s); retrying", exc)
                await asyncio.sleep(1.0)
                continue
            for _, items in entries or []:
                for entry_id, fields in items:
                    self._spawn(entry_id, fields)

    def _spawn(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        task = asyncio.create_task(self._run_job(entry_id, fields))
        self._tasks.add(task)
        task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slot_freed.set()

    async def _run_job(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        try:
            job = _job_decoder.decode(fields[b"job"])
            await self._generate(job)
        except Exception:
            log.exception("generation failed")
        finally:
            with contextlib.suppress(RedisError, OSError):
                await self.redis.xack(keys.TURNS, keys.WORKERS, entry_id)
                await self.redis.xdel(keys.TURNS, entry_id)

    async def _heartbeat(self) -> None:
        """Keep the `generating` marks of running generations alive (they expire otherwise)."""
        lease = max(int(self.settings.worker.lease_seconds), 1)
        while True:
            await asyncio.sleep(lease / 3)
            if not self.running:
                continue
            pipe = self.redis.pipeline(transaction=False)
            for conversation in self.running:
                pipe.expire(keys.generation(conversation), lease)
            with contextlib.suppress(RedisError, OSError):
                await pipe.execute()

    # ------------------------------------------------------------------ one generation

    async def _generate(self, job: Job) -> None:
        conversation = job.conversation
        run = Running(job)
        self.running[conversation] = run
        try:
            await self.redis.hset(
                keys.generation(conversation), mapping={"worker": self.name, "state": "running"}
            )
            history, system = await self._context(job)
            started = f.utcnow()
            await self._append(
                job,
                f.Start(
                    conversation=conversation,
                    message_id=job.message_id,
                    model=job.model,
                    replaces=job.replaces,
                ),
            )
            if await self._cancelled_before_start(job):
                run.cancelled = True
            finished, error = await self._stream(
                run, build_prompt(system, history, self.settings.llm.context_tokens)
            )
            await self._finish(job, run, finished, error, history, started)
        finally:
            self.running.pop(conversation, None)

    async def _context(self, job: Job) -> tuple[list[f.Message], str]:
        history = await self.events.recent(job.conversation)
        cached = await self.events.meta(job.conversation)
        if history is None or cached is None:
            cached = await self.chat.load(job.conversation)
            history = await self.events.recent(job.conversation) or []
        if job.replaces is not None:
            history = [m for m in history if m.id != job.replaces]
        return history, cached.meta.system

    async def _cancelled_before_start(self, job: Job) -> bool:
        marked = await self.redis.get(keys.cancelled(job.conversation))
        return marked is not None and marked.decode() == str(job.message_id)

    async def _stream(
        self, run: Running, prompt: list[dict[str, str]]
    ) -> tuple[Finished, str | None]:
        if run.cancelled:
            return Finished("cancelled", None), None
        run.pump = asyncio.create_task(self._pump(run, prompt))
        try:
            return await run.pump, None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                run.pump.cancel()
                raise
            return Finished("cancelled", None), None
        except TimeoutError:
            return Finished("error", None), "the model took too long"
        except openai.APIError as exc:
            log.warning("model error in %s: %s", run.job.conversation, exc)
            return Finished("error", None), _describe(exc)

    async def _pump(self, run: Running, prompt: list[dict[str, str]]) -> Finished:
        job = run.job
        async with asyncio.timeout(self.settings.llm.max_duration):
            async for item in self.llm.stream(job.model, prompt):
                if isinstance(item, Piece):
                    run.pieces.append(item.text)
                    event = f.Token(
                        conversation=job.conversation, message_id=job.message_id, text=item.text
                    )
                    self.events.append_later(self.pipeliner, job.conversation, encode(event))
                else:
                    return item
        return Finished("stop", None)

    async def _finish(
        self,
        job: Job,
        run: Running,
        finished: Finished,
        error: str | None,
        history: list[f.Message],
        started: datetime,
    ) -> None:
        reason = "cancelled" if run.cancelled and finished.reason != "error" else finished.reason
        reply = f.Message(
            id=job.message_id,
            role="assistant",
            content="".join(run.pieces),
            status=status_of(reason),
            created_at=started,
            model=job.model,
            usage=finished.usage,
        )
        done = f.Done(
            conversation=job.conversation,
            message_id=job.message_id,
            reason=reason,
            usage=finished.usage,
            error=error,
        )
        user_message = next((m for m in history if m.id == job.user_message), None)
        turn = FinishedTurn(
            conversation=job.conversation,
            user_message=user_message,
            user_seq=job.user_seq,
            reply=reply,
            replaces=job.replaces,
            finished_at=f.utcnow(),
        )
        await self.pipeliner.call(*self.turns.finish_call(job, encode(done), reply, encode(turn)))

    async def _append(self, job: Job, event: f.ServerFrame) -> int:
        seq = await self.events.append_later(self.pipeliner, job.conversation, encode(event))
        if int(seq) == UNLOADED:
            await self.chat.load(job.conversation)
            seq = await self.events.append_later(self.pipeliner, job.conversation, encode(event))
        return int(seq)

    def cancel(self, conversation: uuid.UUID, message_id: str) -> None:
        run = self.running.get(conversation)
        if run is None or str(run.job.message_id) != message_id:
            return
        run.cancelled = True
        if run.pump is not None:
            run.pump.cancel()


class _CancelListener:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def on_event(self, seq: int, frame: str) -> None:
        conversation, _, message_id = frame.partition(":")
        with contextlib.suppress(ValueError):
            self.worker.cancel(uuid.UUID(conversation), message_id)

    def resync(self) -> None:
        """A cancel published while disconnected is still in its key; checked at start."""


def _describe(exc: openai.APIError) -> str:
    if isinstance(exc, openai.APIStatusError):
        return f"the model answered HTTP {exc.status_code}"
    if isinstance(exc, openai.APITimeoutError):
        return "the model did not answer in time"
    if isinstance(exc, openai.APIConnectionError):
        return "the connection to the model broke"
    return "the model failed"
