"""What a turn hook adds: one signed call's round trip from a process to a local receiver,
then the time to first token: sequential turns on one socket against
`parley serve` without hooks, then with `hooks.turn_url` pointing at a local receiver that
answers `{}` at once (a ThreadingHTTPServer on 127.0.0.1). Simulated model with no delay.

    .venv/bin/python bench/hook_latency.py [--turns 200]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol import frames as f
from server.app.config import HooksSettings
from server.app.hooks import Hooks
from server.dev import embedded
from tests.helpers.conversations import timed_turns
from tests.helpers.processes import INSTANT_TURNS, bench_cluster, redis_db

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


class Allow(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 65536  # the reply in one write: headers then body would meet delayed ACKs
    disable_nagle_algorithm = True

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


async def round_trips(url: str, calls: int) -> list[float]:
    """Milliseconds per signed `Hooks.decide` call from this process: the hook's own cost."""
    hooks = Hooks(HooksSettings(secret=SECRET))
    prompt = [{"role": "user", "content": "hello " * 200}]
    times: list[float] = []
    try:
        for _ in range(calls):
            sent = time.monotonic()
            await hooks.decide(url, {"type": "turn", "messages": prompt})
            times.append((time.monotonic() - sent) * 1000)
    finally:
        await hooks.close()
    return times


def report(name: str, times: list[float]) -> None:
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    print(f"{name:24} p50 {statistics.median(ordered):6.2f} ms   p99 {p99:6.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=200)
    args = parser.parse_args()
    receiver = ThreadingHTTPServer(("127.0.0.1", embedded.free_port()), Allow)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{receiver.server_address[1]}/turn"
    report("one signed hook call", asyncio.run(round_trips(hook, 500)))
    try:
        with tempfile.TemporaryDirectory() as tmp, bench_cluster(Path(tmp)) as cluster:
            for name, db, hooks in (
                ("without hooks", 1, {}),
                ("with a turn hook", 2, {"PARLEY_HOOKS_TURN_URL": hook}),
                ("with a signed turn hook", 3, {"PARLEY_HOOKS_TURN_URL": hook,
                                                "PARLEY_HOOKS_SECRET": SECRET}),
            ):  # fmt: skip
                redis_url = redis_db(cluster.services.redis_url, db)
                server = cluster.process("serve", REDIS_URL=redis_url, **INSTANT_TURNS, **hooks)
                asyncio.run(timed_turns(server.ws_url, 10, f.Token))  # warm up
                report(name, asyncio.run(timed_turns(server.ws_url, args.turns, f.Token)))
                server.stop()
    finally:
        receiver.shutdown()


if __name__ == "__main__":
    main()
