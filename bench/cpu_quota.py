"""Exact CPU quotas for the processes a benchmark started, through Linux cgroups: each process
in a group of its own, allowed `share` of one core (`share` times the period of CPU time every
period), so that a Redis process is "one small core" and a 2-core machine's clients can
saturate several at once.

Works with the cgroup v1 `cpu` controller (`cpu.cfs_quota_us`, `cpu.cfs_period_us`) or a
cgroup v2 hierarchy whose `cpu` controller is available (`cpu.max`); `CpuQuotas.found()`
tries them in that order and says why neither works. The groups are named after the
benchmark's own PID (`parley-bench-<pid>/<name>`) and removed by `close()`; only the PIDs
given to `limit` are ever moved.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

V1_ROOTS = (Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/cpu,cpuacct"))
V2_ROOTS = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))
MIN_QUOTA_US = 1000
"""The kernel refuses a quota below 1 ms a period."""


@dataclass(frozen=True)
class Throttling:
    """A group's `cpu.stat` counters: periods in which it ran, periods in which it used its
    whole quota and was stopped, and for how long in all."""

    periods: int
    throttled: int
    throttled_us: int

    def since(self, before: Throttling) -> Throttling:
        return Throttling(
            self.periods - before.periods,
            self.throttled - before.throttled,
            self.throttled_us - before.throttled_us,
        )

    @property
    def throttled_share(self) -> float:
        """Of the periods it ran in, the share in which it used its whole quota (≈ 1: it was
        saturated, it always had more work than its quota allowed)."""
        return self.throttled / self.periods if self.periods else 0.0


@dataclass
class Group:
    path: Path
    pid: int
    v2: bool

    def stat(self) -> Throttling:
        fields = dict(
            line.split() for line in (self.path / "cpu.stat").read_text().splitlines() if line
        )
        throttled_us = (
            int(fields.get("throttled_usec", 0))
            if self.v2
            else int(fields.get("throttled_time", 0)) // 1000
        )
        return Throttling(int(fields["nr_periods"]), int(fields["nr_throttled"]), throttled_us)


class CpuQuotas:
    """The groups of one benchmark under `root/parley-bench-<pid>`."""

    def __init__(self, root: Path, v2: bool, period_us: int) -> None:
        self.root = root
        self.v2 = v2
        self.period_us = period_us
        self.parent = root / f"parley-bench-{os.getpid()}"
        self.groups: list[Group] = []

    @classmethod
    def found(cls, period_us: int = 100_000) -> tuple[CpuQuotas | None, str]:
        """A working hierarchy (made and checked by creating the parent group), else None and
        why not."""
        reasons = []
        for root in V1_ROOTS:
            if (root / "cpu.cfs_quota_us").exists():
                quotas = cls(root, False, period_us)
                try:
                    quotas.parent.mkdir()
                    return quotas, f"cgroup v1 cpu controller at {root}"
                except OSError as error:
                    reasons.append(f"{root}: {error}")
        for root in V2_ROOTS:
            controllers = root / "cgroup.controllers"
            if not controllers.exists():
                continue
            if "cpu" not in controllers.read_text().split():
                reasons.append(f"{root}: cgroup v2 without its cpu controller")
                continue
            quotas = cls(root, True, period_us)
            try:
                (root / "cgroup.subtree_control").write_text("+cpu")
                quotas.parent.mkdir()
                (quotas.parent / "cgroup.subtree_control").write_text("+cpu")
                return quotas, f"cgroup v2 cpu.max at {root}"
            except OSError as error:
                with contextlib.suppress(OSError):
                    quotas.parent.rmdir()
                reasons.append(f"{root}: {error}")
        return None, "; ".join(reasons) or "no cgroup cpu controller mounted"

    def limit(self, name: str, pid: int, share: float) -> Group:
        """Put the process `pid` (every thread of it) in a group of its own allowed `share`
        of a core."""
        quota = max(round(share * self.period_us), MIN_QUOTA_US)
        path = self.parent / name
        path.mkdir()
        if self.v2:
            (path / "cpu.max").write_text(f"{quota} {self.period_us}")
        else:
            (path / "cpu.cfs_period_us").write_text(str(self.period_us))
            (path / "cpu.cfs_quota_us").write_text(str(quota))
        group = Group(path, pid, self.v2)
        self.groups.append(group)
        (path / "cgroup.procs").write_text(str(pid))
        return group

    def release(self) -> None:
        """Every group removed; a process of ours still in one goes back to the root."""
        for group in self.groups:
            with contextlib.suppress(OSError):
                if str(group.pid) in (group.path / "cgroup.procs").read_text().split():
                    (self.root / "cgroup.procs").write_text(str(group.pid))
            with contextlib.suppress(OSError):
                group.path.rmdir()
        self.groups.clear()

    def close(self) -> None:
        self.release()
        with contextlib.suppress(OSError):
            self.parent.rmdir()
