"""Profiling a Parley process during a benchmark's measured window (cProfile, stdlib).

    env = profiling.env(Path("worker.pstats"))   # the process's extra environment
    profiling.start(pid) ... profiling.stop(pid)  # around the measured window
    profiling.report(Path("worker.pstats"))       # the top functions by own and total time

The process loads `bench/profile_site/sitecustomize.py`, which toggles cProfile on SIGUSR1 and
SIGUSR2. cProfile adds its own cost to every Python call, so the profile says where the time
goes, not how much there is: CPU per token is measured with the profiler off.
"""

from __future__ import annotations

import io
import os
import pstats
import signal
import time
from pathlib import Path

SITE = Path(__file__).parent / "profile_site"


def env(out: Path) -> dict[str, str]:
    """The environment that makes a Parley process profilable into `out`."""
    path = os.pathsep.join(p for p in (str(SITE), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "BENCH_PROFILE_OUT": str(out)}


def start(pid: int) -> None:
    os.kill(pid, signal.SIGUSR1)


def stop(pid: int, out: Path, limit: float = 30) -> None:
    """Stop the profiler and wait (at most `limit` seconds) until its file is written."""
    before = out.stat().st_mtime if out.exists() else 0.0
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if out.exists() and out.stat().st_mtime != before and out.stat().st_size:
            time.sleep(0.2)  # written in one go, but let it finish
            return
        time.sleep(0.1)


def report(out: Path, lines: int = 45) -> str:
    """The functions that cost most, by own time and by total time."""
    text = io.StringIO()
    stats = pstats.Stats(str(out), stream=text)
    stats.strip_dirs()
    stats.sort_stats("tottime").print_stats(lines)
    stats.sort_stats("cumulative").print_stats(lines)
    collections = out.with_name(out.name + ".gc.json")
    if collections.exists():
        text.write(f"cyclic collector in the window (per generation): {collections.read_text()}\n")
    return text.getvalue()
