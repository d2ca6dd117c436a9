"""Sampling processes through /proc (Linux): memory, CPU time and the wait for one, kernel send
queues, trees."""

from __future__ import annotations

import os
from pathlib import Path


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name (which may hold spaces): field 3 (state) on."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used so far."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_queue_wait(pid: int) -> tuple[float, int]:
    """Seconds the process's threads have spent runnable but waiting for a CPU, and the
    timeslices they ran (the second and third fields of /proc/PID/task/TID/schedstat, summed
    over the threads alive now): their quotient is the mean wait from wake-up to running."""
    waited = timeslices = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0.0, 0
    for task in tasks:
        try:
            fields = (task / "schedstat").read_text().split()
            waited += int(fields[1])
            timeslices += int(fields[2])
        except (OSError, IndexError, ValueError):
            continue  # a thread that ended meanwhile
    return waited / 1e9, timeslices


def _machine_ticks() -> list[int]:
    """The `cpu` line of /proc/stat: user, nice, system, idle, iowait, irq, softirq, steal..."""
    return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (neither idle nor waiting on I/O)."""
    ticks = _machine_ticks()
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def machine_steal_seconds() -> float:
    """CPU seconds the hypervisor gave this virtual machine's CPUs to something else while
    they had work (`steal`): a wait for a CPU no process's schedstat shows."""
    ticks = _machine_ticks()
    return ticks[7] / os.sysconf("SC_CLK_TCK") if len(ticks) > 7 else 0.0


def pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def parents() -> dict[int, int]:
    """{pid: parent pid} of every process that can be read now."""
    found: dict[int, int] = {}
    for pid in pids():
        try:
            found[pid] = int(_stat_fields(pid)[1])
        except (OSError, ValueError, IndexError):
            continue
    return found


def descendants(root: int) -> set[int]:
    """`root` and every process under it now."""
    parent = parents()
    found = {root}
    changed = True
    while changed:
        changed = False
        for pid, ppid in parent.items():
            if ppid in found and pid not in found:
                found.add(pid)
                changed = True
    return found


def kernel_send_queue(port: int) -> int:
    """Bytes queued in the kernel on the server side of the port's connections."""
    total = 0
    with open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port:
                total += int(fields[4].split(":")[0], 16)
    return total
