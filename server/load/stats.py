"""What a load run measures: counters, latency histograms, per-second series, process samples.

Everything here is plain data (dicts of ints) so that generator processes can send it to the
parent through a pipe and the parent can merge it, and so that it goes into the JSON result
as it is.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

RESOLUTION: Final = 100.0
"""Histogram buckets per e-fold of microseconds: each bucket is ~1 % wide."""

LATENCIES: Final = ("connect", "ttft", "added", "gap", "latency")
"""connect: TCP connect to `ready`; ttft: `say` to the first `token`; added: ttft less the
model's own time to first token (`done.usage.first_token_ms`), Parley's share; gap: between
two tokens of one message on one tab; latency: publish to arrival on a tab (the `publish`
workload)."""


class Hist:
    """A log-bucketed latency histogram (~1 % precision), mergeable and JSON-friendly."""

    __slots__ = ("buckets", "count", "max", "total")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def add(self, seconds: float) -> None:
        key = int(_log1p(seconds * 1e6) * RESOLUTION) if seconds > 0 else 0
        buckets = self.buckets
        buckets[key] = buckets.get(key, 0) + 1
        self.count += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds

    def merge(self, other: Hist) -> None:
        for key, n in other.buckets.items():
            self.buckets[key] = self.buckets.get(key, 0) + n
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)

    def percentile(self, p: float) -> float | None:
        """The value (seconds) below which `p` percent of the samples fall."""
        if not self.count:
            return None
        rank = max(1, math.ceil(self.count * p / 100))
        seen = 0
        for key in sorted(self.buckets):
            seen += self.buckets[key]
            if seen >= rank:
                return min(_upper(key), self.max)
        return self.max

    def summary(self) -> dict[str, float | int | None]:
        ms = _ms
        return {
            "count": self.count,
            "mean_ms": ms(self.total / self.count) if self.count else None,
            "p50_ms": ms(self.percentile(50)),
            "p95_ms": ms(self.percentile(95)),
            "p99_ms": ms(self.percentile(99)),
            "max_ms": ms(self.max) if self.count else None,
        }

    def bins(self) -> list[tuple[float, int]]:
        """(bucket upper bound in seconds, count), ascending: what a histogram chart draws."""
        return [(_upper(key), self.buckets[key]) for key in sorted(self.buckets)]

    def to_json(self) -> dict[str, Any]:
        return {"b": self.buckets, "n": self.count, "t": self.total, "m": self.max}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Hist:
        hist = cls()
        hist.buckets = {int(k): int(v) for k, v in data["b"].items()}
        hist.count = int(data["n"])
        hist.total = float(data["t"])
        hist.max = float(data["m"])
        return hist


_log1p = math.log1p


def _upper(key: int) -> float:
    return math.expm1((key + 1) / RESOLUTION) / 1e6


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


@dataclass
class Stats:
    """Everything one generator process measured. `t0` is its CLOCK_MONOTONIC start, so that
    seconds line up across processes on one host."""

    t0: float = field(default_factory=time.monotonic)
    counters: Counter[str] = field(default_factory=Counter)
    per_second: dict[str, dict[int, Hist]] = field(
        default_factory=lambda: {k: {} for k in LATENCIES}
    )
    """Latency histograms per metric and per second since t0; `hists` adds them up."""
    frames_per_second: dict[int, int] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)
    """Phase name -> seconds since t0 when it began (ramp, join, run, drain, done)."""
    extra: dict[str, Any] = field(default_factory=dict)

    _second: int = -1
    _now: dict[str, Hist] = field(default_factory=dict)

    def record(self, metric: str, seconds: float, now: float) -> None:
        """One latency sample (the hot path: a frame may record two)."""
        second = int(now - self.t0)
        if second != self._second:
            self._second = second
            self._now = {}
        hist = self._now.get(metric)
        if hist is None:
            hist = self._now[metric] = self.per_second[metric].setdefault(second, Hist())
        hist.add(seconds)

    @property
    def hists(self) -> dict[str, Hist]:
        totals = {name: Hist() for name in LATENCIES}
        for name, series in self.per_second.items():
            for hist in series.values():
                totals.setdefault(name, Hist()).merge(hist)
        return totals

    def frames(self, n: int, now: float) -> None:
        second = int(now - self.t0)
        self.frames_per_second[second] = self.frames_per_second.get(second, 0) + n

    def phase(self, name: str) -> None:
        self.phases[name] = time.monotonic() - self.t0

    # ------------------------------------------------------------------ transport and merge

    def to_json(self) -> dict[str, Any]:
        return {
            "t0": self.t0,
            "counters": dict(self.counters),
            "per_second": {
                k: {str(s): h.to_json() for s, h in series.items()}
                for k, series in self.per_second.items()
            },
            "frames_per_second": {str(s): n for s, n in self.frames_per_second.items()},
            "phases": self.phases,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Stats:
        stats = cls(t0=float(data["t0"]))
        stats.counters = Counter({k: int(v) for k, v in data["counters"].items()})
        stats.per_second = {
            k: {int(s): Hist.from_json(h) for s, h in series.items()}
            for k, series in data["per_second"].items()
        }
        stats.frames_per_second = {int(s): int(n) for s, n in data["frames_per_second"].items()}
        stats.phases = {k: float(v) for k, v in data["phases"].items()}
        stats.extra = dict(data["extra"])
        return stats

    def merge(self, other: Stats) -> None:
        """Fold another process's stats in, re-basing its seconds on this one's `t0`."""
        shift = round(other.t0 - self.t0)
        self.counters.update(other.counters)
        for name, series in other.per_second.items():
            mine = self.per_second.setdefault(name, {})
            for second, hist in series.items():
                mine.setdefault(second + shift, Hist()).merge(hist)
        for second, n in other.frames_per_second.items():
            key = second + shift
            self.frames_per_second[key] = self.frames_per_second.get(key, 0) + n
        for name, at in other.phases.items():
            at += other.t0 - self.t0
            # a phase began for the whole run when the last process began it
            self.phases[name] = max(self.phases.get(name, at), at)
        for name, value in other.extra.items():
            current = self.extra.get(name)
            if isinstance(value, int | float) and isinstance(current, int | float):
                # durations overlap across processes: the longest; counts add up
                longest = name.endswith("_seconds")
                self.extra[name] = max(current, value) if longest else current + value
            else:
                self.extra.setdefault(name, value)


# --------------------------------------------------------------------------- /proc sampling


CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


@dataclass
class ProcSample:
    at: float
    rss_kib: int
    cpu_seconds: float


def sample_process(pid: int) -> ProcSample | None:
    """RSS (VmRSS) and user+system CPU time of a process, from /proc (Linux)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rss = 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
            break
    # fields after the command name, which is in parentheses and may contain spaces
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return ProcSample(time.monotonic(), rss, (utime + stime) / CLOCK_TICKS)


def cpu_percent(before: ProcSample, after: ProcSample) -> float:
    wall = after.at - before.at
    return 100.0 * (after.cpu_seconds - before.cpu_seconds) / wall if wall > 0 else 0.0
