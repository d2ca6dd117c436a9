"""The request side's steps Parley shapes, per model call, without the network: the request
options copied as `ChatClient.post_bytes` and the `openai` client's `request` copy them (its
idempotency key made where it makes one), the request built (`ChatClient._build_request`),
then its headers read as the client reads them (the raw-response header) and copied as the
aiohttp transport copies them (`CIMultiDict`). Two `ChatClient`s in one process, this tree's
and another tree's (`--against` its chatclient.py), timed alternately in short blocks.

    .venv/bin/python -m bench.request_side --against /path/to/other/server/generation/chatclient.py

Prints, for each, the minimum, lower quartile and median of µs of CPU per call over the
blocks. A benchmark: it never fails on a number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import openai
from multidict import CIMultiDict

from server.generation import chatclient
from server.generation.llm import _STREAMED

CONTENT = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
PATH = "/chat/completions"


def _module(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("other_chatclient", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _client(module: ModuleType) -> Any:
    client = module.ChatClient(
        base_url="http://127.0.0.1:9/v1",  # (nothing listens: only the first call is sent)
        api_key="sk-test",
        max_retries=1,
        timeout=openai.Timeout(60, connect=5),
        http_client=openai.DefaultAioHttpClient(),
    )

    async def first() -> None:  # post_bytes makes its options, the client its first request
        with contextlib.suppress(Exception):
            await client.post_bytes(PATH, CONTENT, _STREAMED)
        await client.close()

    asyncio.run(first())
    return client


def _call(client: Any) -> None:
    options = client._options[PATH][-1].model_copy(update={"content": CONTENT})
    options = options.model_copy()  # `request`'s copy
    if options.idempotency_key is None:
        options.idempotency_key = client._idempotency_key()
    request = client._build_request(options.model_copy(), retries_taken=0)
    request.headers.get("X-Stainless-Raw-Response")  # `_should_stream_response_body`
    CIMultiDict(request.headers)  # aiohttp's `_prepare_headers`


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", required=True, help="another tree's chatclient.py")
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    clients = {"this": _client(chatclient), args.against: _client(_module(args.against))}
    for client in clients.values():
        for _ in range(200):
            _call(client)
    per_call: dict[str, list[float]] = {name: [] for name in clients}
    for _ in range(args.blocks):
        for name, client in clients.items():
            cpu = time.thread_time()
            for _ in range(args.calls):
                _call(client)
            per_call[name].append((time.thread_time() - cpu) * 1e6 / args.calls)
    print(
        json.dumps(
            {
                name: {
                    "min_us": round(min(v), 1),
                    "p25_us": round(statistics.quantiles(v, n=4)[0], 1),
                    "median_us": round(statistics.median(v), 1),
                }
                for name, v in per_call.items()
            }
            | {"loadavg": Path("/proc/loadavg").read_text().split()[:3]}
        )
    )


if __name__ == "__main__":
    main()
