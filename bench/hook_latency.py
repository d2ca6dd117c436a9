"""What a turn hook adds: one signed call's round trip from a process to a local receiver,
then the time to first token: sequential turns, one socket each, against three `parley
serve` processes running side by side — without hooks, with `hooks.turn_url` pointing at a
local receiver that answers `{}` at once (a ThreadingHTTPServer on 127.0.0.1), and with that
hook signed — one turn on each in turn (rotating which goes first), so that the machine's
other load falls on all three alike. Simulated model with no delay. The added time is the
difference of the percentiles against the row without hooks.

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
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol import frames as f
from server.app.config import HooksSettings
from server.app.hooks import Hooks
from server.dev import embedded
from server.dev.client import Client
from tests.helpers.auth import mint, new_user
from tests.helpers.conversations import start_conversation
from tests.helpers.processes import (
    INSTANT_TURNS,
    ParleyProcess,
    bench_cluster,
    redis_db,
    start_all,
)

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


async def first_token_ms(client: Client, conversation: uuid.UUID, i: int) -> float:
    """Milliseconds from sending a `say` to its first token (then waits for its `done`)."""
    start = len(client.frames)
    sent = time.monotonic()
    await client.send(f.Say(conversation=conversation, text=f"q{i} [sim:tokens=2]"))
    await client.wait_for(lambda fr: isinstance(fr, f.Token), start=start, timeout=10)
    took = (time.monotonic() - sent) * 1000
    await client.wait_for(lambda fr: isinstance(fr, f.Done), start=start, timeout=10)
    return took


async def interleaved(servers: list[ParleyProcess], turns: int) -> list[list[float]]:
    """Time to first token on each server, one turn on each in turn, after 10 to warm up."""
    clients = [await Client.connect(s.ws_url, mint(new_user())) for s in servers]
    times: list[list[float]] = [[] for _ in servers]
    try:
        conversations = [await start_conversation(c) for c in clients]
        for i in range(turns + 10):
            order = list(range(len(servers)))
            order = order[i % len(order) :] + order[: i % len(order)]
            for k in order:
                took = await first_token_ms(clients[k], conversations[k], i)
                if i >= 10:
                    times[k].append(took)
    finally:
        for client in clients:
            await client.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=200)
    args = parser.parse_args()
    receiver = ThreadingHTTPServer(("127.0.0.1", embedded.free_port()), Allow)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{receiver.server_address[1]}/turn"
    report("one signed hook call", asyncio.run(round_trips(hook, 500)))
    configurations: list[tuple[str, dict[str, str]]] = [
        ("without hooks", {}),
        ("with a turn hook", {"PARLEY_HOOKS_TURN_URL": hook}),
        ("with a signed turn hook", {"PARLEY_HOOKS_TURN_URL": hook, "PARLEY_HOOKS_SECRET": SECRET}),
    ]
    try:
        with tempfile.TemporaryDirectory() as tmp, bench_cluster(Path(tmp)) as cluster:
            servers = [
                cluster.process(
                    "serve",
                    start=False,
                    REDIS_URL=redis_db(cluster.services.redis_url, db),
                    **INSTANT_TURNS,
                    **hooks,
                )
                for db, (_, hooks) in enumerate(configurations, start=1)
            ]
            start_all(servers)
            results = asyncio.run(interleaved(servers, args.turns))
            for (name, _), times in zip(configurations, results, strict=True):
                report(name, times)
            for server in servers:
                server.stop()
    finally:
        receiver.shutdown()


if __name__ == "__main__":
    main()
