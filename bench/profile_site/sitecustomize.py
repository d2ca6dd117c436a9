"""cProfile inside a Parley process started by a benchmark, switched on by the environment.

With this directory on PYTHONPATH and `BENCH_PROFILE_OUT` naming a file, the process
profiles its main thread's CPU time (the event loop) between SIGUSR1 (start) and SIGUSR2 (stop, and
write the pstats file), so a benchmark profiles only its measured window. Used by
`bench.profiling`; never loaded by Parley itself.
"""

from __future__ import annotations

import cProfile
import os
import signal
import time
from types import FrameType


def _install(out: str) -> None:
    profiler = cProfile.Profile(time.thread_time)  # CPU time: a shared machine's waits left out

    def start(signum: int, frame: FrameType | None) -> None:
        profiler.enable()

    def stop(signum: int, frame: FrameType | None) -> None:
        profiler.disable()
        profiler.dump_stats(out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)


if os.environ.get("BENCH_PROFILE_OUT"):
    _install(os.environ["BENCH_PROFILE_OUT"])
