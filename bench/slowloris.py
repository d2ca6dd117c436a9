"""Slow and endless HTTP requests against a running Parley, while normal clients keep coming.

    .venv/bin/python bench/slowloris.py --url http://127.0.0.1:8000 --pid PID

Holds `--half` connections that each send half a request line and nothing more, and
`--endless` connections that each start a header line and add 1 KiB to it every 100 ms; a
connection the server cuts is opened again at once, so the pressure stays. Meanwhile a normal
client sends `GET /api/info` on a new connection every `--every` seconds. Prints the normal
clients' success and latency, how long the server took to cut the attackers, and the server's
RSS (`--pid`). A benchmark, not a test: it never fails on a number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

HALF = b"GET / HT"
ENDLESS_HEAD = b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: "
NORMAL = b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


@dataclass
class Tally:
    cut_after: list[float] = field(default_factory=list)
    """Seconds from opening to the server's cut, per attacking connection cut."""
    open_now: int = 0
    normal_ok: int = 0
    normal_failed: int = 0
    latencies: list[float] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)


async def attacker(host: str, port: int, endless: bool, until: float, tally: Tally) -> None:
    """One slow client, again and again until `until`."""
    while time.monotonic() < until:
        opened = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        tally.open_now += 1
        try:
            writer.write(ENDLESS_HEAD if endless else HALF)
            read = asyncio.ensure_future(reader.read())  # returns when the server closes
            while not read.done() and time.monotonic() < until:
                if endless:
                    writer.write(b"a" * 1024)
                await asyncio.wait([read], timeout=0.1)
            if read.done():
                tally.cut_after.append(time.monotonic() - opened)
            read.cancel()
        except OSError:
            tally.cut_after.append(time.monotonic() - opened)
        finally:
            tally.open_now -= 1
            writer.close()


async def normal_client(host: str, port: int, every: float, until: float, tally: Tally) -> None:
    async def one() -> None:
        started = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
            try:
                writer.write(NORMAL)
                answer = await asyncio.wait_for(reader.read(), 5)
            finally:
                writer.close()
        except (OSError, TimeoutError):
            tally.normal_failed += 1
            return
        if answer.startswith(b"HTTP/1.1 200 "):
            tally.normal_ok += 1
            tally.latencies.append(time.monotonic() - started)
        else:
            tally.normal_failed += 1

    pending: set[asyncio.Task[None]] = set()
    while time.monotonic() < until:
        task = asyncio.ensure_future(one())
        pending.add(task)
        task.add_done_callback(pending.discard)
        await asyncio.sleep(every)
    if pending:
        await asyncio.wait(pending, timeout=10)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def sample_rss(pid: int | None, until: float, tally: Tally) -> None:
    while pid is not None and time.monotonic() < until:
        with contextlib.suppress(OSError):
            tally.rss_kib.append(rss_kib(pid))
        await asyncio.sleep(0.5)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * share), len(ordered) - 1)] if ordered else 0.0


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--pid", type=int, help="the server's PID, for its RSS")
    parser.add_argument("--half", type=int, default=500, help="half-request-line connections")
    parser.add_argument("--endless", type=int, default=100, help="endless-header connections")
    parser.add_argument("--every", type=float, default=0.05, help="seconds between normal ones")
    parser.add_argument("--duration", type=float, default=40.0)
    args = parser.parse_args()
    parts = urlsplit(args.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    tally = Tally()
    rss_before = rss_kib(args.pid) if args.pid else 0
    until = time.monotonic() + args.duration
    attackers = [attacker(host, port, False, until, tally) for _ in range(args.half)]
    attackers += [attacker(host, port, True, until, tally) for _ in range(args.endless)]
    await asyncio.gather(
        *attackers,
        normal_client(host, port, args.every, until, tally),
        sample_rss(args.pid, until, tally),
    )
    latencies = [s * 1000 for s in tally.latencies]
    total = tally.normal_ok + tally.normal_failed
    print(f"attackers: {args.half} half request lines + {args.endless} endless headers, reopened")
    print(f"  cut by the server: {len(tally.cut_after)} times", end="")
    if tally.cut_after:
        print(
            f", after {min(tally.cut_after):.2f}–{max(tally.cut_after):.2f} s "
            f"(median {statistics.median(tally.cut_after):.2f} s)"
        )
    else:
        print(" (never)")
    print(
        f"normal clients: {tally.normal_ok}/{total} got 200; latency ms "
        f"p50 {percentile(latencies, 0.5):.1f}, p99 {percentile(latencies, 0.99):.1f}, "
        f"max {max(latencies, default=0.0):.1f}"
    )
    if tally.rss_kib:
        print(
            f"server RSS: {rss_before / 1024:.1f} MiB before, "
            f"{max(tally.rss_kib) / 1024:.1f} MiB at most, "
            f"{tally.rss_kib[-1] / 1024:.1f} MiB at the end"
        )


if __name__ == "__main__":
    asyncio.run(main())
