"""Runs a plan: in this process, or forked over `--procs` generator processes whose results are
merged; samples the server's RSS and CPU from /proc; shows progress while it runs.

Ctrl-C stops the workload: what is in flight is given a few seconds to arrive, and whatever
was measured up to then is reported as usual (the result says `interrupted`).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from server.app import collector
from server.load.stats import ProcSample, Stats, cpu_percent, sample_process
from server.load.workload import Driver, Plan

T = TypeVar("T")

PROGRESS_EVERY = 0.5
SAMPLE_EVERY = 1.0


@dataclass
class Watched:
    """/proc samples of one process (the server, or a generator), times relative to `t0`."""

    pid: int
    samples: list[ProcSample] = field(default_factory=list)

    def sample(self) -> None:
        got = sample_process(self.pid)
        if got is not None:
            self.samples.append(got)

    def series(self, t0: float) -> list[dict[str, float]]:
        out = []
        for before, after in zip(self.samples, self.samples[1:], strict=False):
            out.append(
                {
                    "t": round(after.at - t0, 3),
                    "rss_kib": after.rss_kib,
                    "cpu_percent": round(cpu_percent(before, after), 1),
                }
            )
        return out

    def between(self, start: float, end: float) -> tuple[ProcSample, ProcSample] | None:
        inside = [s for s in self.samples if start <= s.at <= end]
        return (inside[0], inside[-1]) if len(inside) >= 2 else None


@dataclass
class Measured:
    """What a load run measured, merged over its generator processes."""

    stats: Stats
    server: Watched | None
    generators: list[Watched]
    interrupted: bool
    progress: dict[str, Any]


class Progress:
    """Merges the latest snapshot of every generator process and shows it."""

    def __init__(self, show: Callable[[dict[str, Any], float], None], procs: int) -> None:
        self.show = show
        self.latest: dict[int, dict[str, Any]] = {}
        self.procs = procs
        self.started = time.monotonic()
        self.server: Watched | None = None

    def update(self, index: int, snapshot: dict[str, Any]) -> None:
        self.latest[index] = snapshot

    def merged(self) -> dict[str, Any]:
        total: dict[str, Any] = {"p99": {}}
        phases = []
        for snap in self.latest.values():
            phases.append(snap["phase"])
            for key, value in snap.items():
                if isinstance(value, int | float):
                    total[key] = total.get(key, 0) + value
            for name, value in snap["p99"].items():
                if value is not None:
                    total["p99"][name] = max(total["p99"].get(name, 0.0), value)
        order = ["start", "ramp", "join", "run", "drain", "done"]
        total["phase"] = min(phases, key=order.index) if phases else "start"
        if self.server is not None and len(self.server.samples) >= 2:
            before, after = self.server.samples[-2], self.server.samples[-1]
            total["server_rss_kib"] = after.rss_kib
            total["server_cpu"] = cpu_percent(before, after)
        return total

    def tick(self) -> None:
        self.show(self.merged(), time.monotonic() - self.started)


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """On uvloop where installed, as the server runs: the generator shares a core with the
    server's Redis, and uvloop's transports cost it less per frame."""
    collector.calm()
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def run(plan: Plan, procs: int, server_pid: int | None, progress: Progress) -> Measured:
    if procs <= 1:
        return run_loop(_run_here(plan, server_pid, progress))
    return _run_forked(plan, procs, server_pid, progress)


# --------------------------------------------------------------------------- one process


async def _run_here(plan: Plan, server_pid: int | None, progress: Progress) -> Measured:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    interrupted = False

    def on_sigint() -> None:
        nonlocal interrupted
        interrupted = True
        stop.set()

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    driver = Driver(plan, list(range(plan.conversations)), stop)
    server = Watched(server_pid) if server_pid else None
    me = Watched(os.getpid())
    progress.server = server
    for watched in (server, me):
        if watched is not None:
            watched.sample()

    async def watch() -> None:
        next_sample = time.monotonic() + SAMPLE_EVERY
        while True:
            await asyncio.sleep(PROGRESS_EVERY)
            if time.monotonic() >= next_sample:
                next_sample += SAMPLE_EVERY
                for watched in (server, me):
                    if watched is not None:
                        watched.sample()
            progress.update(0, driver.progress())
            progress.tick()

    watcher = asyncio.create_task(watch())
    try:
        stats = await driver.run()
    finally:
        watcher.cancel()
        loop.remove_signal_handler(signal.SIGINT)
    for watched in (server, me):
        if watched is not None:
            watched.sample()
    progress.update(0, driver.progress())
    return Measured(stats, server, [me], interrupted, progress.merged())


# --------------------------------------------------------------------------- forked processes


def _child(plan: Plan, indices: list[int], conn: Connection) -> None:
    """A generator process: run the share, send progress snapshots, then the stats."""

    async def main() -> Stats:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        driver = Driver(plan, indices, stop)

        async def report() -> None:
            while True:
                await asyncio.sleep(PROGRESS_EVERY)
                conn.send(("progress", driver.progress()))

        reporter = asyncio.create_task(report())
        try:
            return await driver.run()
        finally:
            reporter.cancel()
            conn.send(("progress", driver.progress()))

    try:
        stats = run_loop(main())
        conn.send(("stats", stats.to_json()))
    except BaseException as exc:  # report any failure to the parent rather than hang it
        conn.send(("error", repr(exc)))
    finally:
        conn.close()


def _run_forked(plan: Plan, procs: int, server_pid: int | None, progress: Progress) -> Measured:
    context = multiprocessing.get_context("fork")
    children: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    for index in range(procs):
        mine, theirs = context.Pipe(duplex=False)
        indices = list(range(index, plan.conversations, procs))
        proc = context.Process(target=_child, args=(plan, indices, theirs), daemon=True)
        proc.start()
        theirs.close()
        children.append((proc, mine))
    interrupted = False

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal interrupted
        interrupted = True
        for proc, _ in children:
            if proc.pid is not None and proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, on_sigint)
    server = Watched(server_pid) if server_pid else None
    generators = [Watched(proc.pid) for proc, _ in children if proc.pid is not None]
    progress.server = server
    results: dict[int, Stats] = {}
    failures: list[str] = []
    open_pipes = {index: conn for index, (_, conn) in enumerate(children)}
    next_sample = 0.0
    deadline = time.monotonic() + _time_bound(plan)
    try:
        while open_pipes and time.monotonic() < deadline:
            now = time.monotonic()
            if now >= next_sample:
                next_sample = now + SAMPLE_EVERY
                for watched in [*generators, *([server] if server else [])]:
                    watched.sample()
            for index, conn in list(open_pipes.items()):
                try:
                    while conn.poll():
                        kind, payload = conn.recv()
                        if kind == "progress":
                            progress.update(index, payload)
                        elif kind == "stats":
                            results[index] = Stats.from_json(payload)
                        else:
                            failures.append(str(payload))
                except (EOFError, OSError):
                    del open_pipes[index]
            progress.tick()
            time.sleep(PROGRESS_EVERY / 2)
    finally:
        signal.signal(signal.SIGINT, previous)
        for child, _ in children:
            child.join(timeout=5)
            if child.is_alive():
                child.terminate()
    if server is not None:
        server.sample()
    for failure in failures:
        print(f"parley load: a generator process failed: {failure}", file=sys.stderr)
    merged = Stats()
    if results:
        ordered = [results[i] for i in sorted(results)]
        merged = Stats.from_json(ordered[0].to_json())
        for other in ordered[1:]:
            merged.merge(other)
    return Measured(merged, server, generators, interrupted, progress.merged())


def _time_bound(plan: Plan) -> float:
    """Longest a run may take: ramp and join (bounded by timeouts), run, drain, slack."""
    return plan.connect_timeout * 4 + plan.request_timeout * 2 + plan.duration + plan.drain + 60
