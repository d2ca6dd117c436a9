"""What one model call's request costs the worker: `LLM.relay` of a one-token reply, calls
one after another against `parley model` in its own process over real HTTP (a kept
connection), this process's CPU time per call from the request built to the response closed.

    .venv/bin/python -m bench.request_cost [--calls 2000] [--rounds 5] [--profile FILE]

Prints the minimum and median over the rounds of µs of CPU per call. A benchmark: it never
fails on a number.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import statistics
import time
from pathlib import Path

import uvloop

from bench.llm_read import _read, simulator
from server.app.config import LLMSettings
from server.generation.llm import LLM


async def _rounds(url: str, calls: int, rounds: int, profile: str | None) -> list[float]:
    llm = LLM(LLMSettings(), url)
    try:
        for _ in range(20):
            await _read(llm, 1)  # connect and warm up before measuring
        per_call = []
        profiler = cProfile.Profile(time.thread_time) if profile else None
        for _ in range(rounds):
            if profiler:
                profiler.enable()
            cpu = time.thread_time()
            for _ in range(calls):
                await _read(llm, 1)
            per_call.append((time.thread_time() - cpu) * 1e6 / calls)
            if profiler:
                profiler.disable()
        if profiler and profile:
            profiler.dump_stats(profile)
        return per_call
    finally:
        await llm.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile")
    args = parser.parse_args()
    with simulator("100000", first_token_delay="0") as (_, url):
        per_call = uvloop.run(_rounds(url, args.calls, args.rounds, args.profile))
    print(
        json.dumps(
            {
                "calls": args.calls,
                "rounds": [round(x, 1) for x in per_call],
                "min_us_per_call": round(min(per_call), 1),
                "median_us_per_call": round(statistics.median(per_call), 1),
                "loadavg": Path("/proc/loadavg").read_text().split()[:3],
            }
        )
    )


if __name__ == "__main__":
    main()
