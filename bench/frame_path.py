"""Micro-benchmark of the per-frame fan-out path, with and without metrics.

One published token event is framed by the bus's `wrap` and pushed to N sockets, which each
write it at the end of the iteration (`Connection.push` + `Connection.flush`), against a
transport that discards the bytes. The baseline is the same code as it was before metrics
(`git show <rev>:server/edge/connection.py`, framing with `wsframe.text`).

    .venv/bin/python bench/frame_path.py [--rev 8d5c44d] [--sockets 600] [--events 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from protocol import frames as f  # noqa: E402
from protocol import wsframe  # noqa: E402
from server.edge import connection as current  # noqa: E402
from server.edge.observer import Observer  # noqa: E402
from server.redis.eventlog import encode  # noqa: E402


class Discard:
    def write(self, data: bytes) -> None:
        pass

    def writelines(self, data: list[bytes]) -> None:
        pass


class FakeHub:
    def __init__(self) -> None:
        self.dirty: list[Any] = []

    def mark_dirty(self, conn: Any) -> None:
        self.dirty.append(conn)


def baseline(rev: str) -> ModuleType:
    source = subprocess.check_output(["git", "show", f"{rev}:server/edge/connection.py"], cwd=ROOT)
    path = Path(tempfile.mkdtemp()) / "connection_before.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("connection_before", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sockets(module: ModuleType, hub: FakeHub, n: int) -> list[Any]:
    conns = []
    for _ in range(n):
        conn = module.Connection.__new__(module.Connection)
        conn.hub, conn.phase, conn.paused = hub, module.Phase.OPEN, False
        conn._pending, conn.transport, conn.outbox = None, Discard(), None
        conns.append(conn)
    return conns


def run(wrap: Any, module: ModuleType, n: int, events: int) -> float:
    """Seconds per frame delivered."""
    hub = FakeHub()
    conns = sockets(module, hub, n)
    conversation, message = uuid.uuid4(), uuid.uuid4()
    token = encode(f.Token(conversation=conversation, message_id=message, text="word "))
    payloads = [f.splice_seq(token, seq) for seq in range(1, events + 1)]
    started = time.perf_counter()
    for data in payloads:
        frame = wrap(data)
        for conn in conns:
            conn.push(frame)
        dirty, hub.dirty = hub.dirty, []
        for conn in dirty:
            conn.flush()
    return (time.perf_counter() - started) / (n * events)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rev", default="8d5c44d", help="the commit before metrics")
    parser.add_argument("--sockets", type=int, default=600)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    before = baseline(args.rev)
    observer = Observer()
    results: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(args.rounds):  # interleaved, so that a busy neighbour hurts both alike
        results["before"].append(run(wsframe.text, before, args.sockets, args.events))
        results["after"].append(run(observer.frame, current, args.sockets, args.events))
    for name, values in results.items():
        print(
            f"{name:6} median {statistics.median(values) * 1e9:6.1f} ns/frame  "
            f"min {min(values) * 1e9:6.1f}"
        )
    ratio = statistics.median(results["after"]) / statistics.median(results["before"])
    print(f"after/before (median): {ratio:.3f}")


if __name__ == "__main__":
    asyncio.run(main())
