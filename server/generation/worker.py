"""Generation: claim a turn, build the prompt, stream the model, publish every piece, finish.

A worker reads jobs from the `parley:turns` Stream through the `workers` consumer group, runs
up to `worker.concurrency` generations at once, and listens on the `parley:cancel` channel so
that `cancel` from any tab on any web process stops the upstream stream within milliseconds.
Pieces go through the pipeliner (one Redis round trip per batch, not per token); each carries
an index so that a batch retried after a broken connection appends nothing twice.

A worker keeps a heartbeat key alive. A turn whose worker lost its heartbeat (killed,
partitioned) is claimed by another worker and generated again from the start under the same
message id: clients get a second `start` for that id and discard the partial text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

import msgspec
import openai
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from protocol import frames as f
from protocol.context import build_prompt
from protocol.transcript import status_of
from server.app import logs, metrics
from server.app.config import Settings
from server.app.metrics import TALLY
from server.edge.bus import Bus
from server.edge.conversations import Chat
from server.generation.llm import LLM, Finished, Piece
from server.redis import keys
from server.redis.eventlog import EventLog, Pipeliner, encode
from server.redis.turns import Entry, Job, Turns, read_group, text_of
from storage.messages import FinishedTurn

log = logging.getLogger("parley.worker")

_job_decoder = msgspec.json.Decoder(Job)


@dataclass(slots=True)
class Running:
    """One generation in progress."""

    job: Job
    history: list[f.Message] = field(default_factory=list)
    pump: asyncio.Task[Finished] | None = None
    cancelled: bool = False
    lost: bool = False
    pieces: list[str] = field(default_factory=list)
    index: int = 0
    requested: float = 0.0
    first_chunk: float = 0.0
    last_chunk: float = 0.0
    max_gap: float = 0.0
    cancel_received: float = 0.0

    def chunk(self, now: float) -> None:
        """A text chunk from the model arrived: its timing, for the metrics."""
        TALLY.pieces += 1
        if not self.first_chunk:
            self.first_chunk = now
        elif now - self.last_chunk > self.max_gap:
            self.max_gap = now - self.last_chunk
        self.last_chunk = now

    def next_index(self) -> int:
        self.index += 1
        return self.index

    def check(self, future: asyncio.Future[object]) -> None:
        """Notice an append that found the conversation's Redis state gone."""
        if future.cancelled() or future.exception() is not None:
            return
        result = future.result()
        if isinstance(result, int) and result < 0:
            self.lost = True  # UNLOADED or LOST


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
        self.lease = max(settings.worker.lease_seconds, 1.0)
        self.pipeliner = Pipeliner(redis)
        self.cancels = Bus(settings.redis.url)
        self.running: dict[uuid.UUID, Running] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._slot_freed = asyncio.Event()
        self._draining = False
        self._background: list[asyncio.Task[None]] = []
        self.taken_over = 0

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        logs.WORKER.set(self.name)  # for every line logged by this task and those it starts
        await self.turns.ensure_group(keys.TURNS, keys.WORKERS)
        self.pipeliner.start()
        await self.cancels.start()
        await self.cancels.subscribe(keys.CANCEL, _CancelListener(self))
        await self._beat()
        self._background = [
            asyncio.create_task(self._heartbeat()),
            asyncio.create_task(self._take_over_loop()),
        ]
        log.info("worker ready (%s)", self.name)
        await self._claim_loop()

    def begin_drain(self) -> None:
        self._draining = True

    async def stop(self, deadline: float | None = None) -> None:
        """Stop claiming; let running generations finish within the deadline, then hand the
        rest back (their turns stay pending and another worker takes them over)."""
        self._draining = True
        deadline = self.settings.worker.shutdown_deadline if deadline is None else deadline
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=deadline)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=5)
        for task in self._background:  # the heartbeat lives until the last generation ends
            task.cancel()
        await self.pipeliner.stop()
        await self.cancels.stop()
        with contextlib.suppress(RedisError, OSError):
            await self.redis.delete(keys.worker(self.name))

    async def _claim_loop(self) -> None:
        while not self._draining:
            free = self.settings.worker.concurrency - len(self._tasks)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                entries = await read_group(
                    self.redis, keys.TURNS, keys.WORKERS, self.name, free, 1000
                )
            except ResponseError as exc:
                await self._recover_group(exc)
                continue
            except (RedisError, OSError) as exc:
                metrics.REDIS_ERRORS.labels("worker").inc()
                metrics.RETRIES.labels("worker").inc()
                log.warning("cannot read turns (%s); retrying", exc)
                await asyncio.sleep(1.0)
                continue
            if self._draining:
                break  # what was just claimed stays pending and is taken over elsewhere
            for entry_id, fields in entries:
                self._spawn(entry_id, fields, takeover=False)

    async def _recover_group(self, exc: ResponseError) -> None:
        """Redis lost its data (restarted empty): the consumer group must be made again."""
        if "NOGROUP" not in str(exc):
            raise exc
        log.warning("turns consumer group missing; creating it again")
        with contextlib.suppress(RedisError, OSError):
            await self.turns.ensure_group(keys.TURNS, keys.WORKERS)
        await asyncio.sleep(0.1)

    def _spawn(self, entry_id: bytes, fields: dict[bytes, bytes], *, takeover: bool) -> None:
        task = asyncio.create_task(self._run_job(entry_id, fields, takeover))
        self._tasks.add(task)
        task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slot_freed.set()

    async def _run_job(self, entry_id: bytes, fields: dict[bytes, bytes], takeover: bool) -> None:
        try:
            job = _job_decoder.decode(fields[b"job"])
        except (KeyError, msgspec.DecodeError):
            log.error("dropping malformed turn %s", entry_id)
            await self._ack(entry_id)
            return
        logs.CONVERSATION.set(str(job.conversation))
        logs.MESSAGE.set(str(job.message_id))
        try:
            await self._generate(job, takeover)
        except asyncio.CancelledError:
            log.warning("generation in %s handed back at shutdown", job.conversation)
            raise
        except Exception:
            log.exception("generation in %s failed", job.conversation)
        finally:
            logs.CONVERSATION.set(None)
            logs.MESSAGE.set(None)
        await self._ack(entry_id)

    async def _ack(self, entry_id: bytes) -> None:
        with contextlib.suppress(RedisError, OSError):
            pipe = self.redis.pipeline(transaction=False)
            pipe.xack(keys.TURNS, keys.WORKERS, entry_id)
            pipe.xdel(keys.TURNS, entry_id)
            await pipe.execute()

    # ------------------------------------------------------------------ liveness and takeover

    async def _beat(self) -> None:
        await self.redis.set(keys.worker(self.name), "1", px=int(self.lease * 1000))

    async def _heartbeat(self) -> None:
        """Keep this worker's heartbeat and its generations' `generating` marks alive."""
        while True:
            await asyncio.sleep(self.lease / 3)
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(keys.worker(self.name), "1", px=int(self.lease * 1000))
            for conversation in self.running:
                pipe.expire(keys.generation(conversation), self.turns.lease)
            try:
                await pipe.execute()
            except (RedisError, OSError) as exc:
                metrics.REDIS_ERRORS.labels("worker").inc()
                log.warning("heartbeat failed: %s", exc)

    async def _take_over_loop(self) -> None:
        while not self._draining:
            await asyncio.sleep(self.lease / 2)
            try:
                await self._take_over()
            except ResponseError as exc:
                await self._recover_group(exc)
            except (RedisError, OSError) as exc:
                log.warning("cannot look for abandoned turns: %s", exc)

    async def _take_over(self) -> None:
        """Claim turns pending with a worker whose heartbeat is gone."""
        pending: list[dict[str, Any]] = await self.redis.xpending_range(
            keys.TURNS, keys.WORKERS, "-", "+", 100
        )
        idle_ms = int(self.lease * 1000)
        for entry in pending:
            owner = entry["consumer"].decode()
            if owner == self.name or entry["time_since_delivered"] < idle_ms:
                continue
            if await self.redis.exists(keys.worker(owner)):
                continue
            claimed = cast(
                list[Entry],
                await self.redis.xclaim(
                    keys.TURNS, keys.WORKERS, self.name, idle_ms, [entry["message_id"]]
                ),
            )
            for entry_id, fields in claimed:
                if fields:
                    log.warning("taking over a turn abandoned by %s", owner)
                    self.taken_over += 1
                    metrics.TAKEOVERS.inc()
                    self._spawn(entry_id, fields, takeover=True)

    # ------------------------------------------------------------------ one generation

    async def _generate(self, job: Job, takeover: bool) -> None:
        conversation = job.conversation
        if takeover and await self.redis.exists(keys.finished(conversation, job.message_id)):
            return  # the dead worker had finished it; only the acknowledgement was missing
        if job.accepted_at and not takeover:
            metrics.QUEUE_WAIT.observe(max(time.time() - job.accepted_at, 0.0))
        begun = time.monotonic()
        run = Running(job)
        self.running[conversation] = run
        try:
            await self._mark_running(job)
            if takeover:
                run.index = await self._last_index(job)
            run.history, system = await self._context(job)
            started = f.utcnow()
            await self._publish(run, self._start_event(job))
            run.cancelled = await self._cancelled_before_start(job)
            prompt = build_prompt(system, run.history, self.settings.llm.context_tokens)
            finished, error = await self._stream(run, prompt)
            reason = await self._finish(run, finished, error, started)
            _observe(run, reason, finished, time.monotonic() - begun)
        finally:
            self.running.pop(conversation, None)

    async def _mark_running(self, job: Job, piece: int | None = None) -> None:
        """Record this generation as the conversation's; with `piece`, every event of it
        indexed up to there (still in flight) will be refused as a repeat."""
        pipe = self.redis.pipeline(transaction=False)
        gen = keys.generation(job.conversation)
        pipe.hset(gen, mapping={"message_id": str(job.message_id), "worker": self.name})
        if piece is not None:
            pipe.hset(gen, "piece", piece)
        pipe.expire(gen, self.turns.lease)
        await pipe.execute()

    async def _last_index(self, job: Job) -> int:
        value = await self.redis.hget(keys.generation(job.conversation), "piece")
        return int(value) if value is not None else 0

    @staticmethod
    def _start_event(job: Job) -> f.Start:
        return f.Start(
            conversation=job.conversation,
            message_id=job.message_id,
            model=job.model,
            replaces=job.replaces,
            accepted_at=job.accepted_at or None,
        )

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
        return marked is not None and text_of(marked) == str(job.message_id)

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
        run.requested = time.monotonic()
        async with asyncio.timeout(self.settings.llm.max_duration):
            async for item in self.llm.stream(job.model, prompt):
                if not isinstance(item, Piece):
                    return item
                run.chunk(time.monotonic())
                run.pieces.append(item.text)
                if run.lost:
                    await self._republish(run)
                    continue
                token = f.Token(
                    conversation=job.conversation, message_id=job.message_id, text=item.text
                )
                self._publish_later(run, token)
        return Finished("stop", None)

    def _publish_later(self, run: Running, event: f.ServerFrame) -> asyncio.Future[object]:
        job = run.job
        future = self.events.append_piece(
            self.pipeliner,
            job.conversation,
            encode(event),
            job.message_id,
            run.next_index(),
            self.turns.lease,
        )
        future.add_done_callback(run.check)
        return future

    async def _publish(self, run: Running, event: f.ServerFrame) -> None:
        await self._publish_later(run, event)
        if run.lost:
            await self._republish(run)

    async def _republish(self, run: Running) -> None:
        """Redis lost the conversation (restarted empty): seed it again from PostgreSQL and
        publish the turn so far, so that every tab, after its reset, sees it whole."""
        job = run.job
        run.lost = False
        await self.chat.load(job.conversation)
        await self._mark_running(job, piece=run.index)
        user_message = self._user_message(run)
        if user_message is not None:
            await self._publish_later(
                run, f.MessageEvent(conversation=job.conversation, message=user_message)
            )
        await self._publish_later(run, self._start_event(job))
        if run.pieces:
            text = "".join(run.pieces)
            token = f.Token(conversation=job.conversation, message_id=job.message_id, text=text)
            await self._publish_later(run, token)
        log.warning("conversation %s was lost by Redis; republished the turn", job.conversation)

    @staticmethod
    def _user_message(run: Running) -> f.Message | None:
        return next((m for m in run.history if m.id == run.job.user_message), None)

    async def _finish(
        self, run: Running, finished: Finished, error: str | None, started: datetime
    ) -> f.DoneReason:
        job = run.job
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
        turn = FinishedTurn(
            conversation=job.conversation,
            user_message=self._user_message(run),
            user_seq=job.user_seq,
            reply=reply,
            replaces=job.replaces,
            finished_at=f.utcnow(),
        )
        call = self.turns.finish_call(job, encode(done), reply, encode(turn))
        for _ in range(3):
            if run.lost:
                await self._republish(run)
            if await self.pipeliner.call(*call) >= 0:
                return reason
            run.lost = True
        log.error("could not finish the turn in %s", job.conversation)
        return reason

    def cancel(self, conversation: uuid.UUID, message_id: str) -> None:
        run = self.running.get(conversation)
        if run is None or str(run.job.message_id) != message_id:
            return
        run.cancelled = True
        run.cancel_received = time.monotonic()
        if run.pump is not None:
            run.pump.cancel()


def _observe(run: Running, reason: f.DoneReason, finished: Finished, duration: float) -> None:
    """A generation's metrics, once its `done` is appended."""
    model = metrics.MODELS.label(run.job.model)
    metrics.FINISHED.labels(reason).inc()
    metrics.REQUEST_DURATION.labels(model).observe(duration)
    if run.cancel_received:
        metrics.CANCEL_LATENCY.observe(time.monotonic() - run.cancel_received)
    if run.first_chunk:
        metrics.MODEL_TTFT.labels(model).observe(run.first_chunk - run.requested)
        metrics.MAX_GAP.labels(model).observe(run.max_gap)
    if run.last_chunk > run.first_chunk and len(run.pieces) > 1:
        gap = (run.last_chunk - run.first_chunk) / (len(run.pieces) - 1)
        metrics.TPOT.labels(model).observe(gap)
    if finished.usage is not None:
        usage = metrics.TOKEN_USAGE
        usage.labels(model, "input").observe(finished.usage.prompt_tokens)
        usage.labels(model, "output").observe(finished.usage.completion_tokens)


class _CancelListener:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def on_event(self, seq: int, frame: bytes) -> None:
        conversation, _, message_id = frame.decode().partition(":")
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
