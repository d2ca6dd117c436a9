"""The four workloads one generator process drives (tabs and conversations: `tab.py`).

A `Driver` owns a share of the conversations of a plan. It opens every tab's socket (at most
`concurrency` handshakes in flight, timing each from TCP connect to `ready`), has the first tab
of each conversation `create` it and every tab `join` it, then runs the workload until the
duration is over or it is told to stop, lets what is in flight arrive (`drain`), and checks
that every tab holds every event of its conversation.

Every tab checks `seq` on every conversation event: the next one must be exactly one more than
the last; a smaller one is a duplicate, a larger one means events were lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, Final

from protocol import frames as f
from server.load import ssetab
from server.load.publisher import Publisher
from server.load.stats import Stats, sample_process
from server.load.tab import STAMP, Conv, LoadTab, RequestFailed
from server.load.wsclient import Endpoint

WORKLOADS: Final = ("idle", "chat", "fanout", "publish")
TRANSPORTS: Final = ("websocket", "sse")
CHURN_TICK: Final = 0.1


@dataclass
class Plan:
    """What to run; built from the command line, identical in every generator process."""

    workload: str
    url: str
    """The first (or only) /ws endpoint."""
    tokens: list[str]
    conversations: int
    tabs: int
    duration: float
    rate: float
    churn: float = 0.0
    text: str = "Tell me something about load testing."
    sim_tokens: int | None = None
    sim_tps: float | None = None
    sim_delay: float | None = None
    concurrency: int = 200
    connect_timeout: float = 10.0
    request_timeout: float = 30.0
    turn_timeout: float = 120.0
    drain: float = 15.0
    redis_url: str = ""
    join: bool = True
    """False: `idle` only connects (to measure or profile connection set-up alone)."""
    server_pid: int | None = None
    """Sampled (RSS, CPU time) at every phase change, for exact per-phase costs."""
    log_max_events: int = 2000
    log_ttl: int = 604_800
    seed: int = 0
    transport: str = "websocket"
    """`sse`: every tab follows its conversation over Server-Sent Events (`ssetab`)."""
    sse_tickets: bool = False
    """SSE: open each stream with a single-use stream ticket instead of the bearer token."""
    urls: tuple[str, ...] = ()
    """Every /ws endpoint, `url` first: sockets are spread over them round-robin."""

    def prompt(self) -> str:
        controls = []
        if self.sim_tokens is not None:
            controls.append(f"[sim:tokens={self.sim_tokens}]")
        if self.sim_tps is not None:
            controls.append(f"[sim:tps={self.sim_tps:g}]")
        if self.sim_delay is not None:
            controls.append(f"[sim:delay={self.sim_delay:g}]")
        return " ".join([self.text, *controls])


# --------------------------------------------------------------------------- the driver


class Driver:
    """Runs a plan's share of conversations (`indices`) in this process."""

    def __init__(self, plan: Plan, indices: list[int], stop: asyncio.Event) -> None:
        self.plan = plan
        self.stop = stop
        self.endpoints = [Endpoint(url) for url in plan.urls or (plan.url,)]
        self.stats = Stats()
        # no gap between tokens for `publish`: the generator's own pacing would be measured
        self.publishing = plan.workload == "publish"
        self.rng = random.Random(plan.seed * 1_000_003 + (indices[0] if indices else 0))
        self.convs = [Conv(i) for i in indices]
        self.http = (
            [ssetab.client_for(url, plan.connect_timeout) for url in plan.urls or (plan.url,)]
            if plan.transport == "sse"
            else []
        )
        """SSE: one HTTP client per web process, in the order of `endpoints`."""
        for conv in self.convs:
            conv.tabs = [self._tab(conv, t) for t in range(plan.tabs)]
        self.phase = "start"
        self.opened = 0
        self.failed = 0
        self.frames = 0
        self.tokens = 0
        self.lost = 0
        self.duplicated = 0
        self.unexpected_closes = 0
        self.published = 0
        self.closing = False
        self._run_started = 0.0
        self._frames_at_run = 0
        self._tokens_at_run = 0

    def spread(self, conv: Conv, index: int) -> int:
        """Which web process tab `index` of `conv` uses: socket k of the plan
        (conversation-major) goes to process k modulo their number, so a conversation's tabs
        are spread."""
        return (conv.index * self.plan.tabs + index) % len(self.endpoints)

    def endpoint(self, conv: Conv, index: int) -> Endpoint:
        """Where tab `index` of `conv` connects (`spread`)."""
        return self.endpoints[self.spread(conv, index)]

    def _tab(self, conv: Conv, index: int) -> LoadTab:
        if self.http:
            return ssetab.SseTab(self, conv, index, self.http[self.spread(conv, index)])
        return LoadTab(self, conv, index)

    @property
    def sockets(self) -> int:
        return len(self.convs) * self.plan.tabs

    def _phase(self, name: str) -> None:
        self.phase = name
        self.stats.phase(name)
        if self.plan.server_pid:
            sample = sample_process(self.plan.server_pid)
            if sample is not None:
                at = self.stats.extra.setdefault("server_at_phase", {})
                at[name] = [sample.at - self.stats.t0, sample.cpu_seconds, sample.rss_kib]

    async def run(self) -> Stats:
        ticker = asyncio.create_task(self._tick())
        try:
            await self._run()
        finally:
            ticker.cancel()
            self._phase("done")
            await self._close_all()
            self._collect()
        return self.stats

    async def _run(self) -> None:
        self._phase("ramp")
        started = time.monotonic()
        await self._bounded([tab.open for conv in self.convs for tab in conv.tabs])
        self.stats.extra["ramp_seconds"] = time.monotonic() - started
        if self.stop.is_set():
            return
        self._phase("join")
        if self.plan.join or self.plan.workload != "idle":
            await self._bounded([self._create_and_join(conv) for conv in self.convs])
        self.stats.counters["tabs.joined"] += sum(
            1 for conv in self.convs for tab in conv.tabs if tab.last_seq is not None
        )
        if self.stop.is_set():
            return
        self._phase("run")
        self._run_started = time.monotonic()
        self._frames_at_run, self._tokens_at_run = self.frames, self.tokens
        deadline = self._run_started + self.plan.duration
        kind = self.plan.workload
        tasks: list[asyncio.Task[None]] = []
        if kind in ("chat", "fanout"):
            tasks += [asyncio.create_task(self._talk(conv, deadline)) for conv in self.convs]
        elif kind == "publish":
            tasks.append(asyncio.create_task(self._publish(deadline)))
        if self.plan.churn > 0:
            tasks.append(asyncio.create_task(self._churn(deadline)))
        await self._until(deadline)
        self._end_run()
        self._phase("drain")
        # after Ctrl-C, a short drain: report soon
        drain = self.plan.drain if not self.stop.is_set() else min(self.plan.drain, 3.0)
        drain_deadline = time.monotonic() + drain
        if tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(drain_deadline - time.monotonic(), 0.1)):
                    await asyncio.gather(*tasks, return_exceptions=True)
            for task in tasks:
                task.cancel()
        if kind != "idle":
            await self._settle(drain_deadline)

    async def _tick(self) -> None:
        """Delivered frames per second, for the timeline (cheaper than counting per frame)."""
        t0 = self.stats.t0
        seen = 0
        second = 0
        while True:
            second += 1
            await asyncio.sleep(max(t0 + second - time.monotonic(), 0))
            frames = self.frames
            self.stats.frames_per_second[second - 1] = frames - seen
            seen = frames

    def _end_run(self) -> None:
        if self._run_started and "run_seconds" not in self.stats.extra:
            seconds = time.monotonic() - self._run_started
            self.stats.extra["run_seconds"] = seconds
            self.stats.counters["run.frames"] += self.frames - self._frames_at_run
            self.stats.counters["run.tokens"] += self.tokens - self._tokens_at_run

    async def _until(self, deadline: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                await self.stop.wait()

    async def _bounded(self, jobs: list[Any]) -> None:
        """Run coroutine functions / coroutines with at most `concurrency` in flight."""
        semaphore = asyncio.Semaphore(self.plan.concurrency)

        async def one(job: Any) -> None:
            async with semaphore:
                if self.stop.is_set():
                    if asyncio.iscoroutine(job):
                        job.close()
                    return
                await (job() if callable(job) else job)

        await asyncio.gather(*(one(job) for job in jobs))

    async def _create_and_join(self, conv: Conv) -> None:
        creator = next((tab for tab in conv.tabs if tab.alive), None)
        if creator is None:
            return
        try:
            created = await creator.request({"type": "create", "title": f"load {conv.index}"})
        except RequestFailed as exc:
            self.stats.counters[f"create.failed.{exc.reason}"] += 1
            return
        conv.id = created.conversation
        results = await asyncio.gather(
            *(tab.join(None) for tab in conv.tabs if tab.alive), return_exceptions=True
        )
        for result in results:
            if isinstance(result, RequestFailed):
                self.stats.counters[f"join.failed.{result.reason}"] += 1

    # ------------------------------------------------------------------ chat / fanout

    async def _talk(self, conv: Conv, deadline: float) -> None:
        """Send turns at `rate` per second; a turn waits for the previous reply's `done`."""
        if not conv.id or self.plan.rate <= 0:
            return
        interval = 1.0 / self.plan.rate
        next_at = time.monotonic() + self.rng.uniform(0, min(interval, self.plan.duration))
        counters = self.stats.counters
        prompt = self.plan.prompt()
        while not self.stop.is_set():
            now = time.monotonic()
            if next_at >= deadline:
                return
            if next_at > now:
                await asyncio.sleep(next_at - now)
                continue
            if now - next_at > interval:
                counters["turns.late"] += 1
            next_at = max(next_at + interval, now)
            if not await self._say(conv, prompt):
                continue
            try:
                async with asyncio.timeout(self.plan.turn_timeout):
                    await conv.done.wait()
                counters["turns.done"] += 1
            except TimeoutError:
                counters["turns.timeout"] += 1

    async def _say(self, conv: Conv, prompt: str) -> bool:
        """Send one `say`, retried with the same id through another tab if the socket drops."""
        message_id = str(uuid.uuid4())
        counters = self.stats.counters
        for _ in range(3):
            tab = conv.speaker()
            if tab is None:
                await asyncio.sleep(0.1)
                continue
            conv.done.clear()
            conv.turn += 1
            conv.said_at = time.monotonic()
            frame = {"type": "say", "conversation": conv.id, "text": prompt, "id": message_id}
            try:
                await tab.request(frame)
            except RequestFailed as exc:
                if exc.reason.startswith("closed") or exc.reason == "not_connected":
                    counters["turns.resent"] += 1
                    continue
                counters[f"turns.refused.{exc.reason}"] += 1
                conv.said_at = 0.0
                return False
            counters["turns.sent"] += 1
            return True
        counters["turns.unsent"] += 1
        conv.said_at = 0.0
        return False

    async def _churn(self, deadline: float) -> None:
        """Each second, each tab drops with probability `churn` and rejoins with `after`."""
        p = self.plan.churn * CHURN_TICK
        rejoins: set[asyncio.Task[None]] = set()
        while not self.stop.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(CHURN_TICK)
            for conv in self.convs:
                for tab in conv.tabs:
                    eligible = tab.alive and not tab.rejoining and tab.last_seq is not None
                    if eligible and self.rng.random() < p:
                        tab.drop()
                        task = asyncio.create_task(tab.rejoin())
                        rejoins.add(task)
                        task.add_done_callback(rejoins.discard)
        if rejoins:
            await asyncio.gather(*rejoins, return_exceptions=True)

    # ------------------------------------------------------------------ publish

    async def _publish(self, deadline: float) -> None:
        """Play the generation worker: append token events straight into the conversations'
        logs (the same Lua append Parley uses) at `rate` frames/s in total, each carrying its
        publish time, so tabs measure publish -> tab latency without the model in the way."""
        convs = [conv for conv in self.convs if conv.id]
        if not convs or self.plan.rate <= 0:
            return
        publisher = Publisher(self.plan.redis_url, self.plan.log_max_events, self.plan.log_ttl)
        await publisher.start()
        try:
            await self._pace(publisher, convs, deadline)
            await publisher.flush()
        finally:
            self.stats.counters["publish.errors"] += publisher.errors
            self.stats.counters["publish.sent"] += publisher.sent
            for conv, seq in publisher.heads.items():
                target = next(c for c in convs if c.id == conv)
                target.head = max(target.head, seq)
            await publisher.close()

    async def _pace(self, publisher: Publisher, convs: list[Conv], deadline: float) -> None:
        rate = self.plan.rate
        start = time.monotonic()
        n = len(convs)
        templates = [
            f.encode(
                f.Token(conversation=uuid.UUID(c.id), message_id=uuid.UUID(c.message_id), text="%s")
            )
            for c in convs
        ]
        backlog_limit = max(int(rate), 1000)
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= deadline:
                return
            due = int(rate * (now - start)) - self.published
            if due > 0 and publisher.outstanding < backlog_limit:
                for _ in range(due):
                    i = self.published % n
                    stamp = f"{STAMP}{time.monotonic_ns()}".encode()
                    publisher.append(convs[i].id, templates[i].replace(b"%s", stamp, 1))
                    self.published += 1
                publisher.write()
            elif due > 0:
                self.stats.counters["publish.backlogged_ticks"] += 1
            await asyncio.sleep(0.002)

    # ------------------------------------------------------------------ the end

    async def _settle(self, deadline: float) -> None:
        """Wait (until `deadline`) for every tab to catch up with its conversation's head."""
        while time.monotonic() < deadline:
            behind = any(
                tab.alive and (tab.last_seq or 0) < conv.head
                for conv in self.convs
                for tab in conv.tabs
            )
            pending = any(tab.rejoin_target is not None for conv in self.convs for tab in conv.tabs)
            if not behind and not pending:
                return
            await asyncio.sleep(0.05)

    def _collect(self) -> None:
        """Tail check and final counters: a tab still behind its conversation's head at the end
        has lost those events."""
        self._end_run()
        counters = self.stats.counters
        for conv in self.convs:
            for tab in conv.tabs:
                if tab.last_seq is None:
                    continue
                if tab.rejoin_target is not None:
                    counters["rejoins.unfilled"] += 1
                    tab.rejoin_target = None
                if tab.alive and tab.last_seq < conv.head:
                    counters["lost.at_end"] += conv.head - tab.last_seq
        counters["frames"] += self.frames
        counters["tokens"] += self.tokens
        counters["lost"] += self.lost + counters["lost.at_end"]
        counters["duplicated"] += self.duplicated
        counters["published"] += self.published
        counters["sockets"] += self.sockets
        counters["conversations"] += len(self.convs)

    async def _close_all(self) -> None:
        self.closing = True
        for conv in self.convs:
            for tab in conv.tabs:
                tab.close()
        await asyncio.sleep(0.2)
        for http in self.http:
            await ssetab.close_client(http)

    def progress(self) -> dict[str, Any]:
        """A small snapshot for the live display (sent between processes as it is)."""
        now = time.monotonic()
        second = int(now - self.stats.t0) - 1
        recent = {
            name: series[second].percentile(99)
            for name, series in self.stats.per_second.items()
            if second in series
        }
        counters = self.stats.counters
        return {
            "phase": self.phase,
            "sockets": self.sockets,
            "opened": self.opened,
            "failed": self.failed,
            "open_now": sum(1 for c in self.convs for t in c.tabs if t.alive),
            "frames": self.frames,
            "tokens": self.tokens,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "published": self.published,
            "rejoins": counters["rejoins"],
            "errors": sum(n for k, n in counters.items() if k.startswith(("errors.", "closed."))),
            "p99": recent,
        }
