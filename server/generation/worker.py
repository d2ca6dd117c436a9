"""Generation: claim a turn, build the prompt, stream the model, publish every piece, finish.

A worker reads jobs from every shard of the turns Stream (`keys.turns`, one on a single
Redis) through the `workers` consumer group in one loop (`streams.Shards`: each shard gets
its share of the free slots), runs up to `worker.concurrency` generations at once, and
listens on the `parley:cancel` channel so that `cancel` from any tab on any web process stops
the upstream stream within milliseconds.
Pieces go through the pipeliner (one Redis round trip per batch, not per token); each carries
an index so that a batch retried after a broken connection appends nothing twice.

A worker keeps a heartbeat key alive. A turn whose worker lost its heartbeat (killed,
partitioned) is claimed by another worker and generated again from the start under the same
message id: clients get a second `start` for that id and discard the partial text.

A model that calls tools gets their results back and is called again, up to `llm.max_steps`
model calls per turn (`_steps`): each call is a `tool_call` part whose arguments stream to the
tabs, the calls of one step run in parallel through the tools' runner, each result is a
`tool_result` part. Once a step's results are in, the reply so far is recorded in Redis
(server/redis/toolsteps.py), so a worker taking the turn over resumes after the completed
steps rather than from the start.

A turn that fails is retried as server/deadletter.py says (an outage for as long as it lasts, a
permanent failure a few times, each try continuing as a takeover would); one that still fails,
or a job that cannot be read, goes to the dead-letter stream and the worker moves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec
import openai
from redis.asyncio import Redis

from protocol import frames as f
from protocol.context import ModelMessage, build_prompt, reply_messages
from protocol.parts import PartsBuilder, content_of, round_ms, stored_parts
from protocol.text import scrub
from protocol.toolcalls import Progress, ToolCall
from protocol.transcript import status_of
from server.app import logs, metrics, tracing
from server.app.config import Settings
from server.app.hooks import ALLOW, Hooks, Reply
from server.app.metrics import TALLY
from server.edge.conversations import Conversations
from server.edge.failures import Refused
from server.edge.shardbus import open_bus
from server.generation import approval, finish_hooks, tokens
from server.generation.llm import LLM, Finished, MalformedReply, Piece, Stalled
from server.redis import generations, keys, toolsteps
from server.redis.approvals import Approvals
from server.redis.client import UNREACHABLE
from server.redis.deadletter import DeadLetters, Malformed, Poisoned, Transient, attempt
from server.redis.eventlog import TAKEN_OVER, Appender, EventLog, Pipeliner, encode
from server.redis.streams import ConsumerGroup, Shards, consumer_name, entry_ms
from server.redis.turns import Job, Turns
from server.tools.definitions import CallContext, Result, Tool, error
from server.tools.runner import Runner
from server.tools.toolbox import Toolbox
from storage.messages import FinishedTurn
from storage.usage import UsageEntry

log = logging.getLogger("parley.worker")

_job_decoder = msgspec.json.Decoder(Job)

QUEUE_TICK = 0.5
"""Seconds between two passes over the fair queue (by any one worker)."""


class OpenText:
    """A generation's text event queued in the pipeliner and not sent yet: text of the same
    part arriving before it goes out joins it. Pieces the model sends while the previous
    batch is on its way to Redis thus become one append, one seq and one frame per tab,
    with nothing waiting longer than it would have (tabs see the same text). Called when
    its batch is taken, it gives the event's frame, encoded."""

    __slots__ = ("head", "part", "parts", "sent", "text")

    def __init__(self, part: int, text: str, parts: PartsBuilder, head: bytes | None) -> None:
        self.part = part
        self.text = text
        self.parts = parts
        self.head = head
        """The encoded `token` frame up to its text (`token_head`), when the part is text."""
        self.sent = False

    def join(self, part: int, text: str) -> bool:
        """Add `text` when it is of this part and this event has not gone yet."""
        if self.sent or part != self.part:
            return False
        self.text += text
        return True

    def __call__(self) -> bytes:
        """The event's frame, its text sealed: a later piece starts a new event."""
        self.sent = True
        if self.head is None:
            return encode(self.parts.piece(self.part, self.text))
        return self.head + encode(self.text) + b"}"


def token_head(conversation: uuid.UUID, message_id: uuid.UUID) -> bytes:
    """A `token` frame of the message, encoded, up to its text: with the text's JSON string
    and `}` after it, the same bytes as the frame encoded whole (the text is its last field
    when its `seq`s are left out), made for the price of the text's encoding."""
    whole = encode(f.Token(conversation=conversation, message_id=message_id, text=""))
    assert whole.endswith(b'""}')
    return whole[:-3]


@dataclass(frozen=True, slots=True)
class Started:
    """A turn as the claim step leaves it: registered as running (a `cancel` published from
    now on reaches it) and its `begin` call queued, before its task runs."""

    run: Running
    begun: asyncio.Future[Any]
    """The `begin` script's answer."""


class TakenOver(Exception):
    """The generation in this conversation is run by another worker now."""


@dataclass(slots=True)
class Running:
    """One generation in progress."""

    job: Job
    history: list[f.Message] = field(default_factory=list)
    pump: asyncio.Task[Any] | None = None
    """What a `cancel` stops: the model's stream, or the step's tool calls."""
    cancelled: bool = False
    refused: bool = False
    """The turn hook refused the turn: it has no `start` and no reply."""
    lost: bool = False
    taken_over: bool = False
    """Another worker runs this generation now (this one's lease lapsed while it could not
    reach Redis): it is stopped here, neither finished nor acknowledged."""
    replaced: int = 0
    """Events indexed up to here were in flight when the turn was last published again: a
    failure of theirs asks for no further republish (the republish carries them)."""
    acked: int = 0
    """The highest seq Redis acknowledged for this generation's events: none is handed out
    again if a failover loses them (`EventLog.append_piece`'s floor)."""
    answered: int = 0
    """How many of its events Redis answered (or failed). While it equals `index` none is
    queued or in flight; after a takeover or a retry `index` starts past the events counted
    here, so it never equals it and nothing is expressed (the cautious answer)."""
    parts: PartsBuilder = field(init=False)
    pieces: int = 0
    index: int = 0
    requested: float = 0.0
    first_chunk: float = 0.0
    last_chunk: float = 0.0
    max_gap: float = 0.0
    cancel_received: float = 0.0
    first_token: float | None = None
    claimed: float = 0.0
    """When this worker claimed the turn from the stream (0: a takeover or a retry), until
    the request to the model is sent (the `start` stage of the time to first token)."""
    first_piece: bool = False
    """Its first text piece went to the pipeliner (the `append` stage is timed from it)."""
    watchers: int = 0
    prompt: list[ModelMessage] = field(default_factory=list)
    """What the model was sent last; empty when it was not called."""
    open_text: OpenText | None = None
    appender: Appender = field(init=False)
    """Queues its events (the conversation's keys made once)."""
    token_head: bytes = b""
    """Its `token` frames up to the text (`token_head`)."""
    tools: dict[str, Tool] = field(default_factory=dict)
    """The tools offered to the model in this turn, by name."""
    steps: int = 0
    """Model calls made (those of a worker this turn was taken over from included)."""
    usages: list[f.Usage | None] = field(default_factory=list)
    """Each model call's usage as the model reported it."""
    call_parts: dict[int, int] = field(default_factory=dict)
    """The model response's calls (by their index) that have a `tool_call` part: its index."""
    unnamed: dict[int, list[str]] = field(default_factory=dict)
    """Arguments of calls whose name has not come yet (their part opens with the name)."""
    pending: list[ToolCall] = field(default_factory=list)
    """Calls of a step taken over before their results were in: run before the model."""
    recorded: bool = False
    """Its tool steps were recorded in Redis (forgotten when the turn ends)."""
    approvals: dict[str, f.ToolApproval] = field(default_factory=dict)
    """How a person answered the step's calls that waited for one (by call id), for their
    `tool_result` parts."""
    awaiting_people: int = 0
    """Its calls waiting for a person's approval now: a draining worker hands such a turn
    back at once (another worker resumes it at the calls) rather than wait for an answer."""
    task: asyncio.Task[Any] | None = None

    def __post_init__(self) -> None:
        self.parts = PartsBuilder(self.job.conversation, self.job.message_id)

    def chunk(self, now: float) -> None:
        """A text chunk from the model arrived: its timing, for the metrics."""
        TALLY.pieces += 1
        self.pieces += 1
        if not self.first_chunk:
            self.first_chunk = now
            if self.first_token is None:
                self.first_token = now
        elif now - self.last_chunk > self.max_gap:
            self.max_gap = now - self.last_chunk
        self.last_chunk = now

    def stop_taken_over(self) -> None:
        """Another worker runs this generation now: stop it here (its task is cancelled;
        `Worker._generate` tells that from a shutdown by `taken_over`)."""
        if not self.taken_over:
            self.taken_over = True
            if self.task is not None and self.task is not asyncio.current_task():
                self.task.cancel()

    def next_index(self) -> int:
        self.index += 1
        return self.index

    def check(self, index: int, future: asyncio.Future[object]) -> None:
        """`settled`, for an append's future."""
        if future.cancelled():
            self.answered += 1
            return
        failure = future.exception()
        self.settled(index, future.result() if failure is None else failure)

    def settled(self, index: int, result: object) -> None:
        """Notice an append (of the event indexed `index`) that found the conversation's
        Redis state gone or failed: the turn so far is published again
        (`Worker._republish`), unless a republish since has carried the event."""
        self.answered += 1
        if type(result) is int and result > 0:  # the rule: the event's seq
            if result > self.acked:
                self.acked = result
            return
        if isinstance(result, BaseException):
            # the event is not in the log: tabs would miss its text without seeing a gap
            log.warning("an event of %s was not appended (%r)", self.job.conversation, result)
            self.lost = self.lost or index > self.replaced
            return
        if not isinstance(result, int):
            return
        if result == TAKEN_OVER:
            self.stop_taken_over()
        elif result < 0:
            self.lost = self.lost or index > self.replaced  # UNLOADED, LOST or BEHIND


class Worker:
    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        conversations: Conversations,
        events: EventLog,
        turns: Turns,
        llm: LLM,
        name: str | None = None,
        hooks: Hooks | None = None,
        toolbox: Toolbox | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.conversations = conversations
        self.events = events
        self.turns = turns
        self.llm = llm
        self.name = name or consumer_name()
        self.groups = [
            ConsumerGroup(redis, keys.turns(shard), keys.WORKERS, self.name)
            for shard in range(turns.turn_shards)
        ]
        self.shards = Shards(self.groups)
        self.lease = max(settings.worker.lease_seconds, 1.0)
        self.pipeliner = Pipeliner(redis, settings.worker.append_interval, worker=self.name)
        self.coalesce = settings.worker.coalesce
        self.starts = Pipeliner(redis)
        """The turns' `begin` calls: those of the turns claimed together go together."""
        self.cancels = open_bus(redis, settings.redis.url)
        self.running: dict[uuid.UUID, Running] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._slot_freed = asyncio.Event()
        self._draining = False
        self._background: list[asyncio.Task[None]] = []
        self.taken_over = 0
        self.dead_letters = DeadLetters(redis)
        self.hooks = hooks
        self.toolbox = toolbox
        tools = settings.tools
        self.runner = (
            None if toolbox is None else Runner(toolbox, tools.max_result_bytes, tools.max_parallel)
        )
        self.approvals = Approvals(
            redis,
            tools.approval_timeout,
            log_max_events=settings.redis.log_max_events,
            log_ttl=settings.redis.ttl_seconds,
        )

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        logs.WORKER.set(self.name)  # for every line logged by this task and those it starts
        await self.shards.ensure()
        self.pipeliner.start()
        self.starts.start()
        await self.cancels.start()
        await self.cancels.subscribe(keys.CANCEL, _CancelListener(self))
        await self._beat()
        await asyncio.to_thread(tokens.warm)  # before the first turn: no `done` waits for it
        self._background = [
            asyncio.create_task(self._heartbeat()),
            asyncio.create_task(self._take_over_loop()),
            asyncio.create_task(self._queue_loop()),
        ]
        log.info("worker ready (%s)", self.name)
        await self._claim_loop()

    def begin_drain(self) -> None:
        self._draining = True

    async def stop(self, deadline: float | None = None) -> None:
        """Stop claiming; let running generations finish within the deadline, then hand the
        rest back (their turns stay pending and another worker takes them over)."""
        self._draining = True
        for run in list(self.running.values()):
            if run.awaiting_people:
                self._hand_back(run)
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
        await self.starts.stop()
        await self.cancels.stop()
        with contextlib.suppress(*UNREACHABLE):
            await self.redis.delete(keys.worker(self.name))
            await self.turns.queue.leave(self.redis, self.name)

    async def _claim_loop(self) -> None:
        """Claim turns from every shard while slots are free (one loop: see `Shards`)."""
        while not self._draining:
            free = self.settings.worker.concurrency - len(self._tasks)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                claimed = await self.shards.read(free, 1000)
            except UNREACHABLE as exc:
                metrics.REDIS_ERRORS.labels("worker").inc()
                metrics.RETRIES.labels("worker").inc()
                log.warning("cannot read turns (%s); retrying", exc)
                await asyncio.sleep(1.0)
                continue
            if self._draining:
                break  # what was just claimed stays pending and is taken over elsewhere
            now = time.monotonic()
            _observe_claims(entry_id for _, (entry_id, _) in claimed)
            for group, (entry_id, fields) in claimed:
                self._spawn(group, entry_id, fields, takeover=False, early=self._start(fields, now))

    def _start(self, fields: dict[bytes, bytes], claimed: float) -> Started | None:
        """Register a turn just claimed and queue its `begin` call at once (the turns claimed
        together share a round trip), not one task wake later: the model's context comes
        back sooner. The run is registered before the call is queued, so a `cancel`
        published after `begin` reads the cancel mark finds it. None for an entry that is no
        turn (its task says so)."""
        try:
            job = _job_decoder.decode(fields[b"job"])
        except (KeyError, msgspec.DecodeError):
            return None
        run = Running(job, claimed=claimed)
        self.running[job.conversation] = run
        call = self.events.begin_call(job.conversation, job.message_id, self.name, self.turns.lease)
        return Started(run, self.starts.call(call))

    def _spawn(
        self,
        group: ConsumerGroup,
        entry_id: bytes,
        fields: dict[bytes, bytes],
        *,
        takeover: bool,
        early: Started | None = None,
    ) -> None:
        task = asyncio.create_task(self._run_job(group, entry_id, fields, takeover, early))
        self._tasks.add(task)
        task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slot_freed.set()

    async def _run_job(
        self,
        group: ConsumerGroup,
        entry_id: bytes,
        fields: dict[bytes, bytes],
        takeover: bool,
        early: Started | None,
    ) -> None:
        tries = 0
        unused = early

        async def handle() -> bool:
            nonlocal tries, unused
            tries += 1  # a second try continues the first's pieces, as a takeover does
            started, unused = unused, None
            return await self._handle(fields, takeover or tries > 1, started)

        try:
            ours = await attempt(handle, f"turn {entry_id.decode()}")
        except Poisoned as failure:
            await self.dead_letters.bury(group.stream, keys.WORKERS, entry_id, fields, failure)
            await self._ack(group, entry_id, fields, buried=True)
            return
        except asyncio.CancelledError:
            log.warning("turn %s handed back at shutdown", entry_id.decode())
            raise
        finally:
            if unused is not None:  # never handled (shut down first)
                self._unstart(unused)
        if ours:  # a turn taken over is the other worker's to acknowledge
            await self._ack(group, entry_id, fields)

    def _unstart(self, started: Started) -> None:
        """Forget a turn the claim step started that will not run here."""
        run = started.run
        if self.running.get(run.job.conversation) is run:
            del self.running[run.job.conversation]
        if started.begun.done() and not started.begun.cancelled():
            started.begun.exception()  # retrieved: not logged as never retrieved
        started.begun.cancel()

    async def _handle(
        self, fields: dict[bytes, bytes], takeover: bool, early: Started | None = None
    ) -> bool:
        """Run a turn; whether it is still this worker's to acknowledge (not taken over).
        `early`: as the claim step started it (None for a takeover or a retry)."""
        if early is not None:
            job = early.run.job  # decoded by the claim step
        else:
            try:
                job = _job_decoder.decode(fields[b"job"])
            except (KeyError, msgspec.DecodeError) as exc:
                raise Malformed(f"not a turn: {exc}") from exc
        logs.CONVERSATION.set(str(job.conversation))
        logs.MESSAGE.set(str(job.message_id))
        try:
            return await self._generate(job, takeover, early)
        except Refused as exc:
            if exc.code == "not_found":
                log.info("conversation %s is gone; turn dropped", job.conversation)
                return True
            raise Transient(exc.message) from exc
        finally:
            logs.CONVERSATION.set(None)
            logs.MESSAGE.set(None)

    async def _ack(
        self,
        group: ConsumerGroup,
        entry_id: bytes,
        fields: dict[bytes, bytes],
        *,
        buried: bool = False,
    ) -> None:
        """Done with a turn: a turn the fair queue counts (its entry names the user) frees
        its slot, and when turns wait the queue hands over the next and the others waiting
        learn their new places (the one now next at once: announce.lua)."""
        user = fields.get(b"user")
        with contextlib.suppress(*UNREACHABLE):
            if user is None:
                if not buried:
                    await group.ack(entry_id)
                return
            queue = self.turns.queue
            stream, name = group.stream, user.decode()

            def release() -> Awaitable[Any]:
                """Through the pipeliner (with other turns' calls, as a rule), which sends a
                batch again while Redis is unreachable: a second call of this one frees
                nothing twice (the entry is deleted in the same step)."""
                return self.pipeliner.call(queue.release_call(stream, keys.WORKERS, entry_id, name))

            # retried through a failover of the queue's slot (a release lost would hold the
            # slot and the user's count for good); a buried entry's is not: a second call
            # would lower the count twice
            if buried:
                waiting = await queue.release(stream, keys.WORKERS, entry_id, name, buried=True)
            else:
                waiting = int(await self.turns.persistently(release)) > 0
            if waiting:
                await queue.serve()

    # ------------------------------------------------------------------ liveness and takeover

    async def _beat(self, renewed: Iterable[uuid.UUID] = ()) -> None:
        """This worker's heartbeat, and the `generating` marks of the `renewed` generations."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(keys.worker(self.name), "1", px=int(self.lease * 1000))
            self.turns.queue.beat(pipe, self.name, self.settings.worker.concurrency, self.lease)
            for conversation in renewed:
                generations.renew(pipe, conversation, self.turns.lease)
            await pipe.execute()

    async def _heartbeat(self) -> None:
        """Keep this worker's heartbeat and its generations' `generating` marks alive. Any
        error that means Redis cannot answer now is survived (a cluster's client raises some
        that are no `RedisError` while a failover settles): a heartbeat task that ended would
        let this worker's lease lapse while it still runs its generations, which another
        worker would then take over and run a second time."""
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                await self._beat(list(self.running))
            except UNREACHABLE as exc:
                metrics.REDIS_ERRORS.labels("worker").inc()
                log.warning("heartbeat failed: %s", exc)

    async def _queue_loop(self) -> None:
        """Fill free slots from the fair queue and tell the waiting turns their positions,
        one worker per tick (a slot freed here is filled at once, by `_ack`; this covers a
        worker joining, one dying, and positions that changed)."""
        queue = self.turns.queue
        while queue.enabled and not self._draining:
            await asyncio.sleep(QUEUE_TICK)
            try:
                if await queue.take_turn(QUEUE_TICK):
                    await queue.serve(renew=True)
            except UNREACHABLE as exc:
                log.warning("cannot serve the fair queue: %s", exc)

    async def _take_over_loop(self) -> None:
        while not self._draining:
            await asyncio.sleep(self.lease / 2)
            try:
                await self._take_over()
            except UNREACHABLE as exc:
                log.warning("cannot look for abandoned turns: %s", exc)

    async def _take_over(self) -> None:
        """Claim turns pending with a worker whose heartbeat is gone, on every shard."""
        for group in self.groups:
            await self._take_over_shard(group)

    async def _take_over_shard(self, group: ConsumerGroup) -> None:
        idle_ms = int(self.lease * 1000)
        for entry in await group.pending():
            owner = entry.consumer
            if owner == self.name or entry.idle_ms < idle_ms:
                continue
            if await self.redis.exists(keys.worker(owner)):
                continue
            for entry_id, fields in await group.claim([entry.entry_id], idle_ms):
                if fields:
                    log.warning("taking over a turn abandoned by %s", owner)
                    self.taken_over += 1
                    metrics.TAKEOVERS.inc()
                    self._spawn(group, entry_id, fields, takeover=True)

    # ------------------------------------------------------------------ one generation

    async def _generate(self, job: Job, takeover: bool, early: Started | None = None) -> bool:
        """Run the generation; whether it ended here (False: another worker took it over)."""
        conversation = job.conversation
        if takeover and await self.redis.exists(keys.finished(conversation, job.message_id)):
            await self.turns.queue_finished_again(job)
            return True  # the dead worker had finished it; only the acknowledgement was missing
        if job.accepted_at and not takeover:
            metrics.QUEUE_WAIT.observe(max(time.time() - job.accepted_at, 0.0))
        begun = time.monotonic()
        run = Running(job) if early is None else early.run
        run.task = asyncio.current_task()
        run.appender = self.events.appender(
            conversation, job.message_id, lambda: run.acked, run.settled
        )
        run.token_head = token_head(conversation, job.message_id)
        self.running[conversation] = run
        accepted_at = 0.0 if takeover else job.accepted_at
        try:
            with tracing.chat(
                job.traceparent, job.model, conversation, job.message_id, accepted_at
            ) as chat:
                reason, finished, error = await self._run(run, takeover, early)
                chat.chat_finished(reason, finished.usage, finished.model, error)
            _observe(run, reason, finished, time.monotonic() - begun)
        except (asyncio.CancelledError, TakenOver):
            if not run.taken_over:
                raise
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                task.uncancel()
            log.warning(
                "the turn in %s was taken over by another worker; stopped here", conversation
            )
            return False
        finally:
            if self.running.get(conversation) is run:  # not the next turn's, claimed since
                del self.running[conversation]
        return True

    async def _run(
        self, run: Running, takeover: bool, early: Started | None = None
    ) -> tuple[f.DoneReason, Finished, str | None]:
        """The generation's steps, each a span of the turn's trace when tracing is on."""
        job = run.job
        with tracing.span("build prompt"):
            run.history, meta, cancelled = await self._begin(job, run, takeover, early)
            prompt = build_prompt(meta.system, run.history, self.settings.llm.context_tokens)
            run.tools = await self._offered(meta.tools)
        verdict = await self._turn_hook(run, prompt)
        started, began = f.utcnow(), time.monotonic()
        run.watchers = await self._subscribers(job.conversation)
        if not verdict.allow:
            return await self._refuse(run, verdict.message or "refused", started, began)
        if takeover:
            await self._publish(run, self._start_event(run.job))
            await self._resume_steps(run)
        else:  # queued ahead of every piece; the model is not kept waiting for its round trip
            self._publish_later(run, self._start_event(run.job))
        run.cancelled = run.cancelled or cancelled
        with tracing.span("model stream"):
            finished, error = await self._steps(run, verdict_prompt(verdict, prompt))
        finished = await self._measured(run, finished)
        at_end = await self._subscribers(job.conversation)
        with tracing.span("finish turn"):
            reason = await self._finish(run, finished, error, started)
        if run.recorded:
            with contextlib.suppress(*UNREACHABLE):
                await toolsteps.forget(self.redis, job.conversation, job.message_id)
        await self._finish_hook(run, (finished, error, None), at_end, started, began)
        return reason, finished, error

    # ------------------------------------------------------------------ tools

    async def _offered(self, names: list[str] | None) -> dict[str, Tool]:
        """The tools the model may call in this conversation (`names`; None: all of them)."""
        if self.toolbox is None:
            return {}
        await self.toolbox.refresh()
        tools = self.toolbox.definitions()
        return {t.name: t for t in tools if names is None or t.name in names}

    async def _steps(self, run: Running, prompt: list[ModelMessage]) -> tuple[Finished, str | None]:
        """Call the model, run the tools it calls, give it their results, and again, until it
        answers without calling tools, the turn is cancelled, or it made `llm.max_steps`
        calls (then its last calls do not run, the turn ends with reason `tool_calls`)."""
        limit = self.settings.llm.max_steps
        offered = [tool.openai() for tool in run.tools.values()]
        while True:
            if run.pending:  # a taken-over step: its calls were made, their results were not in
                calls, run.pending = run.pending, []
                finished = Finished("tool_calls", _total(run.usages))
                if run.cancelled:
                    self._publish_results(run, [error_of(c, CANCELLED, "cancelled") for c in calls])
                    return dataclasses.replace(finished, reason="cancelled"), None
            else:
                finished, error = await self._stream(
                    run, prompt + reply_messages(run.parts.parts()), offered
                )
                run.steps += 1
                run.usages.append(finished.usage)
                calls = self._step_closed(run, finished.calls)
                finished = dataclasses.replace(finished, usage=_total(run.usages))
                if error is not None or run.cancelled or not calls:
                    return finished, error
            if run.steps >= limit:
                note = (
                    f"the turn reached its step limit ({limit} model calls); the call did not run"
                )
                self._publish_results(run, [error_of(c, note) for c in calls])
                return finished, f"the turn reached its step limit of {limit} model calls"
            await self._record_steps(run, calls)
            self._publish_results(run, await self._call_tools(run, calls))
            if run.cancelled:
                return dataclasses.replace(finished, reason="cancelled"), None
            await self._record_steps(run, [])

    def _step_closed(self, run: Running, calls: tuple[ToolCall, ...]) -> list[ToolCall]:
        """End the model response's open parts; its calls as their parts name them (a call
        whose name never came gets its part now)."""
        now = time.monotonic()
        for boundary in run.parts.close(now):
            self._publish_later(run, boundary)
        named = []
        for call in calls:
            index = run.call_parts.get(call.index)
            if index is None:
                index = self._open_call(run, call.index, call.id, call.name, now)
                if call.arguments:
                    self._publish_later(run, run.parts.add_to(index, scrub(call.arguments)))
                for boundary in run.parts.close(now):
                    self._publish_later(run, boundary)
            part = run.parts.parts()[index]
            named.append(
                ToolCall(call.index, part.call_id or call.id, part.name or "", call.arguments,
                         call.problem)
            )  # fmt: skip
        run.call_parts.clear()
        run.unnamed.clear()
        return named

    def _open_call(self, run: Running, call: int, call_id: str, name: str, now: float) -> int:
        index, events = run.parts.open_call(scrub(call_id), scrub(name), now)
        run.call_parts[call] = index
        for event in events:
            self._publish_later(run, event)
        return index

    def _call_piece(self, run: Running, progress: Progress) -> None:
        """A fragment of a tool call: its part opens when the call's name is known, then its
        arguments stream into it like text."""
        index = run.call_parts.get(progress.index)
        text = progress.arguments
        if index is None:
            if not progress.name:
                run.unnamed.setdefault(progress.index, []).append(text)
                return
            now = time.monotonic()
            index = self._open_call(run, progress.index, progress.id, progress.name, now)
            text = "".join(run.unnamed.pop(progress.index, ())) + text
        if text:
            text = scrub(text)
            run.parts.add_to(index, text)
            self._publish_text(run, index, text, None)  # (a call's part: no `token` frame)

    def _publish_results(self, run: Running, results: list[Result]) -> None:
        for result in results:
            events = run.parts.result(
                result.call_id, result.tool, result.status, result.content,
                round_ms(result.duration), run.approvals.pop(result.call_id, None),
            )  # fmt: skip
            for event in events:
                self._publish_later(run, event)

    async def _call_tools(self, run: Running, calls: list[ToolCall]) -> list[Result]:
        """The step's calls, run in parallel; a `cancel` abandons those still running."""
        running: asyncio.Task[list[Result]] = asyncio.create_task(self._run_calls(run, calls))
        run.pump = running
        try:
            return await running
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                running.cancel()
                raise
            return [error_of(call, CANCELLED, "cancelled") for call in calls]

    async def _run_calls(self, run: Running, calls: list[ToolCall]) -> list[Result]:
        """Each call's result, in order: those that may not run get theirs without running."""
        outcomes = list(await asyncio.gather(*(self._screen(run, call) for call in calls)))
        runnable = [call for call, outcome in zip(calls, outcomes, strict=True) if outcome is None]
        if not runnable or self.runner is None:  # (a runnable call needs the runner)
            return [outcome for outcome in outcomes if outcome is not None]
        job = run.job
        context = CallContext(job.user, str(job.conversation), str(job.message_id))
        batch = self.runner.start(runnable, context)
        try:
            ran = iter(await batch.results())
        except asyncio.CancelledError:
            if not run.cancelled:
                await batch.cancel()
                raise
            ran = iter(await batch.cancel())  # a `cancel`: finished calls keep their results
        return [outcome or next(ran) for outcome in outcomes]

    async def _screen(self, run: Running, call: ToolCall) -> Result | None:
        """None when the call may run; else its result without running it (a tool this
        conversation does not offer, arguments that miss the schema, a person's denial).
        The arguments are checked before anyone is asked: an approved call runs."""
        prepared = None if self.runner is None else self.runner.prepare(call)
        if call.problem is not None and isinstance(prepared, Result):
            return prepared  # what the runner could not read of it
        tool = run.tools.get(call.name)
        if tool is None:
            known = ", ".join(run.tools) or "none"
            return error_of(call, f"there is no tool {call.name!r} (tools: {known})")
        if isinstance(prepared, Result):
            return prepared
        return await self._approve(run, call, tool)

    async def _approve(self, run: Running, call: ToolCall, tool: Tool) -> Result | None:
        """Whether a person lets the call run: None when it may run, else how it ended without
        running. The one place a call waits for approval; a tool with `approval = "never"`
        runs at once."""
        if not approval.needs_approval(tool):
            return None
        run.awaiting_people += 1
        try:
            if self._draining:
                self._hand_back(run)
            answered, refusal = await approval.approved(self.approvals, self.cancels, run.job, call)
        except asyncio.CancelledError:
            if run.cancelled:  # the user stopped the turn: the call will never run
                run.approvals[call.id] = approval.WITHDRAWN
                await asyncio.shield(approval.withdrawn(self.approvals, run.job, call))
            raise
        finally:
            run.awaiting_people -= 1
        if answered is not None:
            run.approvals[call.id] = answered
        return refusal

    def _hand_back(self, run: Running) -> None:
        """Stop a turn that waits for a person, leaving it pending: the step and its waiting
        calls are recorded, so the worker that takes it over resumes there."""
        if run.task is not None and not run.task.done():
            log.info("handing back a turn waiting for approval in %s", run.job.conversation)
            run.task.cancel()

    async def _record_steps(self, run: Running, pending: list[ToolCall]) -> None:
        """The reply so far, for a takeover to resume from: before the step's calls run (with
        them `pending`: a takeover runs them without calling the model again), and once their
        results are in (before the model is called again)."""
        job = run.job
        steps = toolsteps.Steps(
            steps=run.steps, parts=run.parts.parts(), usage=run.usages, pending=pending
        )
        await toolsteps.record(self.redis, job.conversation, job.message_id, steps)
        run.recorded = True

    async def _resume_steps(self, run: Running) -> None:
        """Continue after the steps the previous worker completed: publish them again (tabs
        discarded the reply at `start`) and count their model calls."""
        job = run.job
        recorded = await toolsteps.recorded(self.redis, job.conversation, job.message_id)
        if recorded is None:
            return
        run.parts.restore(recorded.parts)
        run.steps = recorded.steps
        run.usages = list(recorded.usage)
        run.pending = list(recorded.pending)
        run.recorded = True
        for event in run.parts.replay():
            self._publish_later(run, event)

    async def _refuse(
        self, run: Running, message: str, started: datetime, began: float
    ) -> tuple[f.DoneReason, Finished, str | None]:
        """The turn hook said no: no reply begins. Every tab gets `error {code: "refused"}`
        as a conversation event (in the log, so a rejoin replays it), the user's message is
        kept as sent, and the conversation is free again."""
        job = run.job
        run.refused = True
        refusal = f.Error(
            code="refused",
            message=message,
            conversation=job.conversation,
            message_id=job.message_id,
        )
        turn = self._finished_turn(run, None, None)
        at_end = await self._subscribers(job.conversation)
        with tracing.span("finish turn"):
            await self._call_finish(run, encode(refusal), None, encode(turn), 0)
        finished = Finished("error", None)
        await self._finish_hook(run, (finished, message, "refused"), at_end, started, began)
        return "error", finished, message

    @staticmethod
    async def _measured(run: Running, finished: Finished) -> Finished:
        """The usage with the generation's timing, counted here (`estimated`) when the model
        reported none; none at all when the model was not called."""
        if not run.requested:
            return finished
        usage = finished.usage
        if usage is None:
            usage = await tokens.estimate_off_loop(run.prompt, run.parts.parts())
        first = None if run.first_token is None else round_ms(run.first_token - run.requested)
        usage = msgspec.structs.replace(
            usage, first_token_ms=first, duration_ms=round_ms(time.monotonic() - run.requested)
        )
        return dataclasses.replace(finished, usage=usage)

    async def _turn_hook(self, run: Running, prompt: list[ModelMessage]) -> Reply:
        """Ask the host application's turn hook, if any; a model it picks becomes the job's."""
        url = self.settings.hooks.turn_url
        if not url or self.hooks is None:
            return ALLOW
        job = run.job
        payload = {
            "type": "turn",
            "user": job.user,
            "conversation": str(job.conversation),
            "message_id": str(job.message_id),
            "message": self._user_message(run),
            "regenerate": job.replaces is not None,
            "model": job.model,
            "messages": prompt,
            "data": job.hook_data,
        }
        verdict = await self.hooks.decide(url, payload)
        if verdict.model:
            run.job = msgspec.structs.replace(job, model=verdict.model[:200])
        return verdict

    async def _subscribers(self, conversation: uuid.UUID) -> int:
        """The channel's subscriber count, which only the finish hook reports."""
        if not self.settings.hooks.finish_url:
            return 0
        return await finish_hooks.subscribers(self.redis, conversation)

    async def _finish_hook(
        self,
        run: Running,
        outcome: tuple[Finished, str | None, str | None],
        at_end: int,
        started: datetime,
        began: float,
    ) -> None:
        """Queue the finish hook; `at_end` is the channel's subscriber count just before
        `done` was published (measured after, a tab that closes on `done` would be missed)."""
        if not self.settings.hooks.finish_url:
            return
        finished, error, code = outcome
        job = run.job
        reason = "cancelled" if run.cancelled and finished.reason != "error" else finished.reason
        end = time.monotonic()
        event = finish_hooks.FinishEvent(
            conversation=job.conversation,
            user=job.user,
            message_id=job.message_id,
            user_message_id=job.user_message,
            replaces=None if code == "refused" else job.replaces,
            status=finish_hooks.STATUS[reason],
            reason=reason,
            error=error,
            code=code,
            model=job.model,
            usage=finished.usage,
            timings=finish_hooks.Timings(
                started_at=started,
                finished_at=f.utcnow(),
                first_token_ms=None
                if run.first_token is None
                else round((run.first_token - began) * 1000, 1),
                duration_ms=round((end - began) * 1000, 1),
            ),
            watchers=finish_hooks.watchers(run.watchers, at_end),
            data=job.hook_data,
        )
        await finish_hooks.enqueue(self.redis, event)

    async def _mark_running(self, job: Job, piece: int | None = None) -> None:
        """Record this generation as the conversation's; with `piece`, every event of it
        indexed up to there (still in flight) will be refused as a repeat."""
        async with self.redis.pipeline(transaction=False) as pipe:
            generations.claim(
                pipe, job.conversation, job.message_id, self.name, self.turns.lease, piece
            )
            await pipe.execute()

    @staticmethod
    def _start_event(job: Job) -> f.Start:
        return f.Start(
            conversation=job.conversation,
            message_id=job.message_id,
            model=job.model,
            replaces=job.replaces,
            accepted_at=job.accepted_at or None,
        )

    async def _begin(
        self, job: Job, run: Running, takeover: bool, early: Started | None = None
    ) -> tuple[list[f.Message], f.Conversation, bool]:
        """Record this generation as the conversation's and read, in the same script call
        (sent with those of the turns claimed with it: `starts`), its context (the recent
        messages and the conversation's meta; PostgreSQL's when Redis has not loaded them),
        whether a `cancel` came before this worker listened for it, and, on a takeover,
        where the last worker's events stopped. The cancel is read after the run is
        registered (`self.running`): one published later reaches `cancel`. `early`: the
        call the claim step sent (`_start`)."""
        if early is not None:
            begun = self.events.begun(await early.begun)
        else:
            begun = await self.events.begin(
                job.conversation, job.message_id, self.name, self.turns.lease, self.starts
            )
        if takeover:
            run.index = begun.piece
        history, cached = begun.history, begun.meta
        if history is None or cached is None:
            cached = await self.conversations.load(job.conversation)
            history = await self.events.recent(job.conversation) or []
        if job.replaces is not None:
            history = [m for m in history if m.id != job.replaces]
        return history, cached.meta, begun.cancelled == str(job.message_id)

    async def _stream(
        self, run: Running, prompt: list[ModelMessage], tools: list[dict[str, Any]]
    ) -> tuple[Finished, str | None]:
        if run.cancelled:
            return Finished("cancelled", None), None
        run.prompt = prompt
        run.pump = asyncio.create_task(self._pump(run, prompt, tools))
        try:
            return await run.pump, None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                run.pump.cancel()
                raise
            return Finished("cancelled", None), None
        except Stalled as exc:
            return Finished("error", None), str(exc)
        except TimeoutError:
            return Finished("error", None), "the model took too long"
        except openai.APIError as exc:
            log.warning("model error in %s: %s", run.job.conversation, exc)
            return Finished("error", None), _describe(exc)
        except MalformedReply as exc:
            log.warning("model error in %s: %s", run.job.conversation, exc)
            return Finished("error", None), "the model sent a malformed reply"

    async def _pump(
        self, run: Running, prompt: list[ModelMessage], tools: list[dict[str, Any]]
    ) -> Finished:
        job = run.job
        if not run.requested:
            run.requested = time.monotonic()
            if run.claimed:
                metrics.FIRST_TOKEN_STAGE.labels("start").observe(run.requested - run.claimed)
        take = functools.partial(self._take, run)
        async with asyncio.timeout(self.settings.llm.max_duration):
            return await self.llm.relay(job.model, prompt, tools, take)

    def _take(self, run: Running, item: Piece | Progress) -> Callable[[], Awaitable[None]] | None:
        """A piece of the reply (or of a tool call) as the model's stream brings it, in the
        connection's callback (`LLM.relay`): published at once; when Redis lost the turn,
        what to await first (the turn republished, this piece with it). Nothing once the
        turn is cancelled or taken over: its task, cancelled, has yet to wake."""
        if run.cancelled or run.taken_over:
            return None
        if not isinstance(item, Piece):
            run.first_token = run.first_token or time.monotonic()
            self._call_piece(run, item)
            return None
        now = time.monotonic()
        run.chunk(now)
        parts, kind, text = run.parts, item.kind, item.text
        if kind != parts.kind:
            for boundary in parts.switch(kind, now):
                self._publish_later(run, boundary)
        index = parts.extend(text)
        if run.lost:
            return functools.partial(self._republish, run)
        self._publish_text(run, index, text, run.token_head if kind == "text" else None)
        return None

    def _publish_text(self, run: Running, part: int, text: str, head: bytes | None) -> None:
        """Publish a piece of part `part`'s text: joined to the part's event still queued, if
        any, else as a new event (made from the text it ends up holding when its batch is
        taken). `head`: the part is the current text part (`OpenText.head`)."""
        open_text = run.open_text
        if (  # (`sent` first: at one token per event the rule, and no call)
            open_text is not None
            and not open_text.sent
            and self.coalesce
            and open_text.join(part, text)
        ):
            TALLY.coalesced += 1
            return
        open_text = run.open_text = OpenText(part, text, run.parts, head)
        if run.first_piece or not run.first_chunk:
            run.appender.queue(self.pipeliner, open_text, run.next_index())
            return
        # the reply's first token waits for no interval, nor, when none of the turn's
        # events is outstanding (it cannot pass one), for the batch in flight
        run.first_piece = True
        express = run.answered == run.index
        if not express:
            self.pipeliner.hurry()
        future = self._appended(run, open_text, express=express)
        future.add_done_callback(functools.partial(_observe_append, run.first_chunk))

    def _publish_later(self, run: Running, event: f.ServerFrame | Callable[[], bytes]) -> None:
        """Queue an event of the turn; its result goes to `run.settled`."""
        frame = event if callable(event) else encode(event)
        run.appender.queue(self.pipeliner, frame, run.next_index())

    def _appended(
        self, run: Running, event: f.ServerFrame | Callable[[], bytes], *, express: bool = False
    ) -> asyncio.Future[object]:
        """`_publish_later`, and a future for whoever waits for the event's result."""
        frame, index = event if callable(event) else encode(event), run.next_index()
        future = run.appender.append(self.pipeliner, frame, index, express=express)
        future.add_done_callback(functools.partial(run.check, index))
        return future

    async def _publish(self, run: Running, event: f.ServerFrame) -> None:
        await self._appended(run, event)
        if run.lost:
            await self._republish(run)

    async def _run_by_another(self, job: Job) -> bool:
        """Whether another worker runs the generation now, or has finished it: a worker cut
        off from Redis for longer than its lease, whose events failed meanwhile, must not
        claim the turn back and publish it again."""
        c = job.conversation
        if await self.redis.exists(keys.finished(c, job.message_id)):
            return True
        running = await generations.message_id(self.redis, c)
        worker = await generations.worker(self.redis, c)
        return running == str(job.message_id) and worker not in (None, self.name)

    async def _republish(self, run: Running) -> None:
        """Redis lost the conversation (restarted empty) or some of its last events (a
        failover to a replica that lacked them): seed it again from PostgreSQL if need be
        and publish the turn so far, so that every tab, after its reset, sees it whole."""
        job = run.job
        if await self._run_by_another(job):
            run.stop_taken_over()
            raise TakenOver(job.conversation)
        run.lost = False
        run.replaced = run.index
        run.open_text = None  # what it holds is in run.pieces, republished below
        await self.conversations.load(job.conversation)
        await self._mark_running(job, piece=run.index)
        await self.events.raise_seq(job.conversation, run.acked)  # once, not at each event
        user_message = self._user_message(run)
        if user_message is not None:
            await self._appended(
                run, f.MessageEvent(conversation=job.conversation, message=user_message)
            )
        if not run.refused:
            await self._appended(run, self._start_event(job))
        for event in run.parts.replay():
            await self._appended(run, event)
        log.warning("conversation %s was lost by Redis; republished the turn", job.conversation)

    @staticmethod
    def _user_message(run: Running) -> f.Message | None:
        return next((m for m in run.history if m.id == run.job.user_message), None)

    async def _finish(
        self, run: Running, finished: Finished, error: str | None, started: datetime
    ) -> f.DoneReason:
        job = run.job
        reason = "cancelled" if run.cancelled and finished.reason != "error" else finished.reason
        for boundary in run.parts.close(time.monotonic()):
            self._publish_later(run, boundary)
        parts = run.parts.parts()
        reply = f.Message(
            id=job.message_id,
            role="assistant",
            content=content_of(parts),
            status=status_of(reason),
            created_at=started,
            model=job.model,
            usage=finished.usage,
            parts=stored_parts(parts),
            reason=None if reason == "stop" else reason,
        )
        done = f.Done(
            conversation=job.conversation,
            message_id=job.message_id,
            reason=reason,
            usage=finished.usage,
            error=error,
        )
        spent = self._spent(job, reply, started)
        turn = self._finished_turn(run, reply, spent)
        if await self._call_finish(run, encode(done), reply, encode(turn), spent.tokens):
            await self._warn(job)
        return reason

    def _finished_turn(
        self, run: Running, reply: f.Message | None, spent: UsageEntry | None
    ) -> FinishedTurn:
        """The turn for PostgreSQL; without a reply (refused) it replaces nothing."""
        job = run.job
        return FinishedTurn(
            conversation=job.conversation,
            user_message=self._user_message(run),
            user_seq=job.user_seq,
            reply=reply,
            replaces=job.replaces if reply is not None else None,
            finished_at=f.utcnow(),
            traceparent=tracing.current_traceparent(),
            refused_reply=job.message_id if reply is None else None,
            spent=spent,
        )

    async def _call_finish(
        self, run: Running, done_event: bytes, reply: f.Message | None, turn: bytes, spent: int
    ) -> bool:
        """Finish the turn (`Turns.finish`: one script, or a cluster's steps), republishing
        it first if Redis lost it; whether it finished."""
        for _ in range(3):
            if run.lost:
                await self._republish(run)
            seq = await self.turns.finish(
                self.pipeliner, run.job, done_event, reply, turn, spent, lambda: run.acked
            )
            if seq >= 0:
                return True
            if seq == TAKEN_OVER:
                run.stop_taken_over()
                raise TakenOver(run.job.conversation)
            run.lost = True
        log.error("could not finish the turn in %s", run.job.conversation)
        return False

    def _spent(self, job: Job, reply: f.Message, started: datetime) -> UsageEntry:
        """The reply's row in the usage ledger: what the model reported (nothing when it
        reported nothing, as for a turn cancelled before it began) and what that cost."""
        usage = reply.usage
        prompt = usage.prompt_tokens if usage else 0
        completion = usage.completion_tokens if usage else 0
        budgets = self.conversations.spending.budgets
        return UsageEntry(
            owner=job.user,
            model=job.model,
            status=reply.status,
            prompt_tokens=prompt,
            completion_tokens=completion,
            reasoning_tokens=(usage.reasoning_tokens or 0) if usage else 0,
            cached_tokens=(usage.cached_prompt_tokens or 0) if usage else 0,
            estimated=bool(usage and usage.estimated),
            cost=self.settings.budgets.cost(job.model, prompt, completion),
            bucket=job.budget_bucket or budgets.bucket(),
            started_at=started,
        )

    async def _warn(self, job: Job) -> None:
        """Tell the user's tabs, once per window, that their spending nears the budget."""
        spending = self.conversations.spending
        if not spending.settings.enabled:
            return
        try:
            reached = await spending.budgets.warning(job.user, job.group)
            if reached is None:
                return
            state = await spending.state(job.user, job.group)
        except (Refused, *UNREACHABLE) as exc:
            log.warning("cannot check the budget's warning: %s", exc)
            return
        used, limit = reached
        warning = f.UsageWarning(used=used, limit=limit, resets_at=state.resets_at)
        await self.conversations.tell(job.user, warning)

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
    if run.last_chunk > run.first_chunk and run.pieces > 1:
        gap = (run.last_chunk - run.first_chunk) / (run.pieces - 1)
        metrics.TPOT.labels(model).observe(gap)
    if finished.usage is not None:
        usage = metrics.TOKEN_USAGE
        usage.labels(model, "input").observe(finished.usage.prompt_tokens)
        usage.labels(model, "output").observe(finished.usage.completion_tokens)


def _observe_claims(entry_ids: Iterable[bytes]) -> None:
    """The `claim` stage of each turn just claimed: since Redis added its entry to the turns
    stream (the entry id's milliseconds are Redis's clock when it did)."""
    now_ms = time.time() * 1000
    stage = metrics.FIRST_TOKEN_STAGE.labels("claim")
    for entry_id in entry_ids:
        stage.observe(max(now_ms - entry_ms(entry_id), 0.0) / 1000)


def _observe_append(first_chunk: float, future: asyncio.Future[object]) -> None:
    """The `append` stage: from the model's first chunk to Redis having appended (and
    published) the event that carries it."""
    if not future.cancelled() and future.exception() is None:
        metrics.FIRST_TOKEN_STAGE.labels("append").observe(time.monotonic() - first_chunk)


class _CancelListener:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def on_event(self, seq: int, frame: bytes) -> None:
        conversation, _, message_id = frame.decode().partition(":")
        with contextlib.suppress(ValueError):
            self.worker.cancel(uuid.UUID(conversation), message_id)

    def resync(self) -> None:
        """A cancel published while disconnected is still in its key; checked at start."""


def verdict_prompt(verdict: Reply, prompt: list[ModelMessage]) -> list[ModelMessage]:
    """The messages the turn hook chose, or Parley's own prompt."""
    if verdict.messages is None:
        return prompt
    return [{"role": m.role, "content": m.content} for m in verdict.messages]


CANCELLED = "the call was cancelled: the turn was stopped"


def error_of(call: ToolCall, message: str, status: f.ToolStatus = "error") -> Result:
    """A call's result when it did not run (or stopped): `message` is what the model reads."""
    return error(call.id, call.name, message, status)


def _total(usages: list[f.Usage | None]) -> f.Usage | None:
    """The usage of every model call of the turn; None when one of them reported none (then
    Parley counts the whole turn itself)."""
    if not usages or any(u is None for u in usages):
        return None
    if len(usages) == 1:
        return usages[0]
    known = [u for u in usages if u is not None]

    def summed(values: list[int | None]) -> int | None:
        present = [v for v in values if v is not None]
        return sum(present) if present else None

    return f.Usage(
        prompt_tokens=sum(u.prompt_tokens for u in known),
        completion_tokens=sum(u.completion_tokens for u in known),
        reasoning_tokens=summed([u.reasoning_tokens for u in known]),
        cached_prompt_tokens=summed([u.cached_prompt_tokens for u in known]),
    )


def _describe(exc: openai.APIError) -> str:
    if isinstance(exc, openai.APIStatusError):
        return f"the model answered HTTP {exc.status_code}"
    if isinstance(exc, openai.APITimeoutError):
        return "the model did not answer in time"
    if isinstance(exc, openai.APIConnectionError):
        return "the connection to the model broke"
    return "the model failed"
