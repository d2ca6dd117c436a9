"""cProfile inside a Parley process started by a benchmark, switched on by the environment.

With this directory on PYTHONPATH and `BENCH_PROFILE_OUT` naming a file, the process
profiles its main thread's CPU time (the event loop) between SIGUSR1 (start) and SIGUSR2 (stop, and
write the pstats file), so a benchmark profiles only its measured window. The cyclic
collector's runs in the same window, by generation (count and CPU seconds), go to the same
name with `.gc.json` added: cProfile does not see them, it charges them to whatever function
allocated. Used by `bench.profiling`; never loaded by Parley itself.
"""

from __future__ import annotations

import cProfile
import gc
import json
import os
import signal
import time
from types import FrameType
from typing import Any


class _Collections:
    """The collector's runs while `on`: per generation, how many and their CPU seconds."""

    def __init__(self) -> None:
        self.on = False
        self.began = 0.0
        self.runs = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        gc.callbacks.append(self.callback)

    def callback(self, phase: str, info: dict[str, Any]) -> None:
        if not self.on:
            return
        if phase == "start":
            self.began = time.thread_time()
        else:
            generation = info["generation"]
            self.runs[generation] += 1
            self.seconds[generation] += time.thread_time() - self.began

    def write(self, out: str) -> None:
        with open(out + ".gc.json", "w") as file:
            json.dump({"runs": self.runs, "seconds": self.seconds}, file)


def _install(out: str) -> None:
    profiler = cProfile.Profile(time.thread_time)  # CPU time: a shared machine's waits left out
    collections = _Collections()

    def start(signum: int, frame: FrameType | None) -> None:
        collections.on = True
        profiler.enable()

    def stop(signum: int, frame: FrameType | None) -> None:
        profiler.disable()
        collections.on = False
        collections.write(out)
        profiler.dump_stats(out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)


if os.environ.get("BENCH_PROFILE_OUT"):
    _install(os.environ["BENCH_PROFILE_OUT"])
