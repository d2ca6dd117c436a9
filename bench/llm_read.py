"""What reading the model's stream costs the worker, and nothing else: `LLM.relay` (the
worker's reader) against `parley model` in its own process, many streams at once.

    .venv/bin/python -m bench.llm_read [--streams 200] [--tokens 100] [--tps 20] [--httpx]
        [--history 0] [--asyncio]

Prints this process's CPU per chunk read (the worker's reading cost, without Redis or the
fan-out) and the model process's CPU per chunk (from /proc), each as µs per chunk. The
`openai` client runs on the transport `LLM` picks (aiohttp where the `openai[aiohttp]` extra
is installed), or on httpx with `--httpx`; `--aiohttp` forces aiohttp (for older trees).
`--history N` sends N earlier messages with each request, as a conversation's turn does (what
building the request costs grows with them). `--asyncio` runs the reader on asyncio's own
event loop instead of uvloop (the worker's, through uvicorn). A benchmark: it never fails on a
number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import uvloop

from protocol.toolcalls import Progress
from server.app.config import LLMSettings
from server.dev import embedded
from server.generation.llm import LLM, Piece
from tests.helpers import procfs
from tests.helpers.processes import ROOT


def _messages(tokens: int, history: int) -> list[dict[str, str]]:
    """Earlier turns (a sentence each), then the request for `tokens` tokens."""
    said = "a sentence of about the length people type when they ask a model something"
    earlier = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"{said} ({i})"}
        for i in range(history)
    ]
    return [*earlier, {"role": "user", "content": f"[sim:tokens={tokens}] go"}]


async def _read(llm: LLM, tokens: int, history: int = 0) -> int:
    """The pieces of one reply, read as the worker reads it: `LLM.relay` (`LLM.stream` on
    trees from before it)."""
    if not hasattr(llm, "relay"):
        count = 0
        async for item in llm.stream("m", _messages(tokens, history)):
            count += isinstance(item, Piece)
        return count
    pieces: list[Piece | Progress] = []
    await llm.relay("m", _messages(tokens, history), None, _counted(pieces))
    return sum(isinstance(piece, Piece) for piece in pieces)


def _counted(pieces: list[Piece | Progress]) -> Callable[[Piece | Progress], None]:
    def take(piece: Piece | Progress) -> None:
        pieces.append(piece)

    return take


async def _run(
    url: str, streams: int, tokens: int, history: int, transport: str
) -> tuple[int, float, float]:
    llm = LLM(LLMSettings(), url)
    if transport:
        await llm.client.close()
        llm.client = llm.client.with_options(http_client=_http_client(transport))
    try:
        await _read(llm, 2)  # connect once before measuring
        began, cpu = time.monotonic(), time.process_time()
        counts = await asyncio.gather(*(_read(llm, tokens, history) for _ in range(streams)))
        return sum(counts), time.process_time() - cpu, time.monotonic() - began
    finally:
        await llm.close()


def _http_client(transport: str) -> openai.DefaultAsyncHttpxClient:
    if transport == "httpx":
        return openai.DefaultAsyncHttpxClient()
    return openai.DefaultAioHttpClient()


def _wait_ready(url: str, limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while True:
        try:
            with urllib.request.urlopen(f"{url}/sim/stats", timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@contextlib.contextmanager
def simulator(
    tokens_per_second: str, first_token_delay: str
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`parley model` in a process of its own, and its base URL once it answers."""
    port = embedded.free_port()
    env = os.environ | {
        "PARLEY_SIMULATOR_TOKENS_PER_SECOND": tokens_per_second,
        "PARLEY_SIMULATOR_FIRST_TOKEN_DELAY": first_token_delay,
    }
    with tempfile.TemporaryDirectory() as tmp, (Path(tmp) / "model.log").open("wb") as log:
        model = subprocess.Popen(
            [sys.executable, "-m", "server.app.cli", "model", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=log,
        )
        try:
            url = f"http://127.0.0.1:{port}/v1"
            _wait_ready(url)
            yield model, url
        finally:
            model.terminate()
            model.wait(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--tps", type=float, default=20)
    parser.add_argument("--history", type=int, default=0)
    parser.add_argument("--httpx", action="store_const", const="httpx", dest="transport")
    parser.add_argument("--aiohttp", action="store_const", const="aiohttp", dest="transport")
    parser.add_argument("--asyncio", action="store_true", help="asyncio's event loop, not uvloop")
    args = parser.parse_args()
    tps = f"{args.tps:g}"
    with simulator(tps, first_token_delay="0.1") as (model, url):
        model_before = procfs.cpu_seconds(model.pid)
        run = asyncio.run if args.asyncio else uvloop.run
        chunks, cpu, wall = run(
            _run(url, args.streams, args.tokens, args.history, args.transport or "")
        )
        model_cpu = procfs.cpu_seconds(model.pid) - model_before
    result = {
        "transport": args.transport or "LLM's own",
        "loop": "asyncio" if args.asyncio else "uvloop",
        "streams": args.streams,
        "history": args.history,
        "chunks": chunks,
        "seconds": round(wall, 2),
        "reader_us_per_chunk": round(cpu * 1e6 / chunks, 1) if chunks else None,
        "model_us_per_chunk": round(model_cpu * 1e6 / chunks, 1) if chunks else None,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
