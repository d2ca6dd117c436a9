"""Parley's benchmark: fixed workloads with their targets, on this machine.

    .venv/bin/python -m bench.run            # the full run (~4 minutes), writes docs/benchmarks.md
    .venv/bin/python -m bench.run --smoke    # <= 30 s, small numbers, writes nothing to docs/
    .venv/bin/python -m bench.run --only idle --token-alg RS256 --doc /tmp/rs256.md
                                             # the idle row with RS256 tokens from a JWKS
    .venv/bin/python -m bench.run --only generation   # the generation path, model apart
    .venv/bin/python -m bench.run --only sse  # SSE next to the WebSocket: memory, CPU per event

(from the repository root: `-m` puts it on the import path, for `tests.helpers`).

It starts its own Redis and PostgreSQL (server.dev.embedded) in a temporary directory, `parley
web` pinned to CPU 0, and `parley worker`, Redis, PostgreSQL and the load generator (`parley
load`) pinned to CPU 1, then runs each workload with `parley load` and writes the results
table, the machine, the versions and the exact commands to docs/benchmarks.md (between the
`bench:results` markers). It is a benchmark, not a test: it never fails on a number.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.dev import embedded
from tests.helpers import procfs
from tests.helpers.idp import LocalIdP, Signer
from tests.helpers.processes import ROOT, ParleyProcess

WEB_CPU = 0
OTHER_CPU = 1
START = "<!-- bench:results:start -->"
END = "<!-- bench:results:end -->"

TARGETS = {
    "rss": "≤ 20 KiB",
    "connect": "≥ 1,500 /s",
    "fanout": "≥ 40,000 frames/s",
    "latency": "p99 ≤ 5 ms",
}


@dataclass
class Sizes:
    idle_sockets: int = 10_000
    connect_concurrency: int = 50
    fanout_conversations: int = 200
    fanout_tabs: int = 3
    fanout_steps: tuple[int, ...] = (
        3_000,
        6_000,
        12_000,
        18_000,
        24_000,
        32_000,
        40_000,
        44_000,
        48_000,
        56_000,
        64_000,
    )
    step_seconds: float = 10.0
    latency_rate: int = 12_000
    latency_seconds: float = 15.0
    model_tokens: int = 200
    model_tps: float = 20.0
    model_seconds: float = 20.0
    chat_conversations: int = 50
    chat_seconds: float = 20.0
    hold_seconds: float = 10.0

    @classmethod
    def smoke(cls) -> Sizes:
        return cls(
            idle_sockets=200,
            connect_concurrency=50,
            fanout_conversations=20,
            fanout_tabs=3,
            fanout_steps=(3_000,),
            step_seconds=2.0,
            latency_rate=1_200,
            latency_seconds=2.0,
            model_tokens=40,
            model_tps=100.0,
            model_seconds=2.0,
            chat_conversations=4,
            chat_seconds=2.0,
            hold_seconds=1.0,
        )


# --------------------------------------------------------------------------- processes


NICE = 0
"""Niceness for every process the bench starts (`--nice`); negative needs root."""


def _boost(pid: int) -> None:
    """Apply NICE to a process and to its scheduling autogroup: with autogroups on (Linux's
    default for desktop-like setups), CPU is shared between sessions first, and a process's
    own nice value counts only inside its session."""
    if not NICE:
        return
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, pid, NICE)
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/autogroup").write_text(str(NICE))


def _pin(cpu: int, die_with_parent: bool = True) -> Callable[[], None]:
    parent = os.getpid()
    nice = NICE

    def preexec() -> None:
        os.sched_setaffinity(0, {cpu})
        if nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if die_with_parent and sys.platform == "linux":
            ctypes.CDLL(None).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
            if os.getppid() != parent:
                os._exit(1)

    return preexec


def _pin_tree(pid: int, cpu: int) -> None:
    """Pin a running process and its children (PostgreSQL's backends) to one CPU."""
    for p in procfs.descendants(pid):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(p, {cpu})
        _boost(p)


def parley(role: str, env: dict[str, str], cpu: int, log: Path) -> ParleyProcess:
    """`parley <role>` pinned to `cpu`, started and ready (a web process on a free port)."""
    port = embedded.free_port() if role == "web" else 0
    proc = ParleyProcess(role, env, port, log, preexec=_pin(cpu))
    proc.start(wait=False)
    proc.wait_ready(timeout=60)
    return proc


# --------------------------------------------------------------------------- the bench


@dataclass
class Bench:
    sizes: Sizes
    work: Path
    out_dir: Path
    env: dict[str, str]
    redis_url: str
    smoke: bool = False
    tokens_file: Path | None = None
    """The idle row's tokens (RS256 from a JWKS); None: `parley load` mints HS256 ones."""
    worker: ParleyProcess | None = None
    web: ParleyProcess | None = None
    commands: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)

    @contextmanager
    def fresh_web(self) -> Iterator[ParleyProcess]:
        """A new `parley web` for each workload, so one's leftovers cannot skew the next
        (the smoke run keeps one for all, to stay short)."""
        if self.smoke and self.web is not None:
            yield self.web
            return
        web = parley("web", self.env, WEB_CPU, self.work / "web.log")
        self.web = web
        try:
            time.sleep(1.0)  # let start-up allocations settle before RSS is sampled
            yield web
        finally:
            if not self.smoke:
                web.stop(timeout=20)

    def load(self, name: str, workload: str, *args: str) -> dict[str, Any]:
        """Run `parley load` pinned to CPU 1 against the current web process."""
        assert self.web is not None
        out = self.out_dir / f"{name}.json"
        argv = [
            "server.app.cli",
            "load",
            workload,
            "--url",
            f"ws://127.0.0.1:{self.web.port}/ws",
            "--server-pid",
            str(self.web.pid),
            "--out",
            str(out),
            "--no-progress",
            *(["--no-charts"] if self.smoke else []),
            *args,
        ]
        shown = " ".join(
            shlex.quote(a)
            for a in ["parley", *argv[1:]]
            if not a.startswith(("--out", "--server-pid", str(out), str(self.web.pid)))
        )
        self.commands.append(
            f"{name}: taskset -c {OTHER_CPU} "
            + shown.replace(str(self.web.port), "PORT").replace(self.redis_url, "$REDIS_URL")
        )
        print(f"\n=== {name}: {shown}", flush=True)
        started = time.monotonic()
        before = _cpu_snapshot()
        children_before = _children_cpu()
        proc = subprocess.run(
            [sys.executable, "-m", *argv],
            cwd=ROOT,
            env=self.env,
            preexec_fn=_pin(OTHER_CPU),
            timeout=600,
            check=False,
        )
        if proc.returncode not in (0, 3) or not out.exists():
            print(f"    parley load exited {proc.returncode}", flush=True)
            return {}
        result: dict[str, Any] = json.loads(out.read_text())
        result["wall_seconds"] = round(time.monotonic() - started, 1)
        result["machine_busy"] = _others(
            before,
            _cpu_snapshot(),
            procfs.descendants(os.getpid()),  # processes that exited are nobody's
            _children_cpu() - children_before,  # the load generator, exited by now
        )
        return result

    # ------------------------------------------------------------------ workloads

    def idle_and_connect(self) -> None:
        s = self.sizes
        with self.fresh_web():
            r = self.load(
                "idle",
                "idle",
                "--sockets",
                str(s.idle_sockets),
                "--tabs",
                "1",
                "--duration",
                str(s.hold_seconds),
                "--concurrency",
                str(s.connect_concurrency),
                "--connect-timeout",
                "30",
                *(["--tokens-file", str(self.tokens_file)] if self.tokens_file else []),
            )
        self.results["idle"] = r

    def fanout_saturation(self) -> None:
        s = self.sizes
        steps: list[dict[str, Any]] = []
        with self.fresh_web():
            for delivered in s.fanout_steps:
                published = delivered / s.fanout_tabs
                r = self.load(
                    f"fanout-{delivered}",
                    "publish",
                    "--conversations",
                    str(s.fanout_conversations),
                    "--tabs",
                    str(s.fanout_tabs),
                    "--rate",
                    f"{published:.0f}",
                    "--duration",
                    str(s.step_seconds),
                    "--redis-url",
                    self.redis_url,
                )
                if not r:
                    break
                step = _step(delivered, r)
                steps.append(step)
                print(f"    step {delivered}: {step}", flush=True)
                if not step["ok"]:
                    break
        self.results["fanout_steps"] = steps

    def latency(self) -> None:
        s = self.sizes
        with self.fresh_web():
            r = self.load(
                "latency",
                "publish",
                "--conversations",
                str(s.fanout_conversations),
                "--tabs",
                str(s.fanout_tabs),
                "--rate",
                f"{s.latency_rate / s.fanout_tabs:.0f}",
                "--duration",
                str(s.latency_seconds),
                "--redis-url",
                self.redis_url,
            )
        self.results["latency"] = r

    def model_fanout(self) -> None:
        """End to end through the worker and the simulated model (the worker shares CPU 1).

        Also the worker's CPU per relayed delta: its CPU time over the run (the simulated
        model's streaming, served by the worker process, included) per token it published."""
        s = self.sizes
        assert self.worker is not None
        worker_before = procfs.cpu_seconds(self.worker.pid)
        with self.fresh_web():
            r = self.load(
                "model-fanout",
                "fanout",
                "--conversations",
                str(s.fanout_conversations),
                "--tabs",
                str(s.fanout_tabs),
                "--tokens",
                str(s.model_tokens),
                "--tps",
                f"{s.model_tps:g}",
                "--rate",
                "1",
                "--duration",
                str(s.model_seconds),
            )
        relayed = r.get("throughput", {}).get("tokens", 0) / s.fanout_tabs
        if relayed:
            cpu = procfs.cpu_seconds(self.worker.pid) - worker_before
            r["worker_cpu_us_per_delta"] = round(cpu / relayed * 1e6, 2)
        self.results["model_fanout"] = r

    def chat_churn(self) -> None:
        s = self.sizes
        with self.fresh_web():
            r = self.load(
                "chat-churn",
                "chat",
                "--conversations",
                str(s.chat_conversations),
                "--tabs",
                "3",
                "--rate",
                "0.5",
                "--churn",
                "0.05",
                "--duration",
                str(s.chat_seconds),
            )
        self.results["chat_churn"] = r

    def generation_path(self) -> None:
        """`bench/worker_cost.py` (the simulated model, web and worker each their own
        process): 400 conversations x 3 tabs, 200-token replies at 20 tokens/s; worker,
        model and Redis CPU per token, turns finished, time to first token and Parley's
        share of it."""
        conversations, tabs, tokens = (20, 3, 40) if self.smoke else (400, 3, 200)
        sized = ["--conversations", str(conversations), "--tabs", str(tabs)]
        self.apart(
            "generation", ["bench.worker_cost", *sized, "--tokens", str(tokens), "--tps", "20"]
        )

    def reconnect_storm(self) -> None:
        """`bench/reconnect_storm.py` (two web processes): the tabs of one web process,
        SIGKILLed, rejoin the other with `after`."""
        tabs = 200 if self.smoke else self.sizes.idle_sockets
        argv = ["bench.reconnect_storm", "--tabs", str(tabs), "--conversations", str(tabs // 10)]
        self.apart("storm", argv)

    def sse_next_to_websocket(self) -> None:
        """`bench/sse_numbers.py` (two web processes, one for SSE streams, one for sockets):
        RSS per idle joined client and web CPU per delivered event, SSE next to WebSocket."""
        idle, readers, tokens = (100, 10, 200) if self.smoke else (500, 50, 2000)
        argv = ["bench.sse_numbers", "--idle", str(idle), "--readers", str(readers)]
        self.apart("sse", [*argv, "--tokens", str(tokens)])

    def apart(self, name: str, argv: list[str]) -> None:
        """A benchmark module that starts its own services and processes, its JSON result
        kept under `name`."""
        out = self.out_dir / f"{name}.json"
        self.commands.append(f"{name}: python -m " + " ".join(argv))
        print(f"\n=== {name}: {' '.join(argv)}", flush=True)
        subprocess.run(
            [sys.executable, "-m", *argv, "--out", str(out)], cwd=ROOT, timeout=1200, check=False
        )
        if out.exists():
            self.results[name] = json.loads(out.read_text())


def _cpu_snapshot() -> tuple[float, dict[int, float]]:
    """(now, {0: machine busy CPU-seconds, pid: CPU-seconds}) from /proc."""
    per: dict[int, float] = {}
    for pid in procfs.pids():
        with contextlib.suppress(OSError, ValueError, IndexError):
            per[pid] = procfs.cpu_seconds(pid)
    return time.monotonic(), {0: procfs.machine_busy_seconds(), **per}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _others(
    before: tuple[float, dict[int, float]],
    after: tuple[float, dict[int, float]],
    own: set[int],
    exited: float,
) -> dict[str, float]:
    """How much of the machine other people's processes used during a workload (the bench
    cannot stop them; a busy machine makes rates and latencies worse, not CPU costs)."""
    wall = max(after[0] - before[0], 1e-6)
    total = after[1][0] - before[1][0]
    ours = exited + sum(after[1].get(p, 0.0) - before[1].get(p, 0.0) for p in own if p in after[1])
    cpus = os.cpu_count() or 1
    return {
        "machine_cpu_percent": round(100 * total / wall / cpus, 1),
        "others_cpu_percent": round(100 * max(total - ours, 0.0) / wall / cpus, 1),
        "loadavg_1m": float(Path("/proc/loadavg").read_text().split()[0]),
    }


def _step(delivered: int, r: dict[str, Any]) -> dict[str, Any]:
    lat = r.get("latency_ms", {}).get("latency", {})
    fps = r["throughput"]["frames_per_second"] or 0.0
    p99 = lat.get("p99_ms")
    lost = r["integrity"]["lost"] + r["integrity"]["duplicated"]
    ok = p99 is not None and p99 <= 100 and lost == 0 and fps >= 0.9 * delivered
    return {
        "offered": delivered,
        "delivered": fps,
        "p50_ms": lat.get("p50_ms"),
        "p99_ms": p99,
        "lost": lost,
        "server_cpu": r.get("server", {}).get("cpu_percent_run"),
        "generator_cpu": r.get("generator", {}).get("cpu_percent_run"),
        "cpu_us_per_frame": r.get("server", {}).get("cpu_us_per_frame"),
        "others": (r.get("machine_busy") or {}).get("others_cpu_percent"),
        "publish_errors": r.get("publish", {}).get("errors", 0),
        "ok": ok,
    }


# --------------------------------------------------------------------------- machine, versions


def machine() -> dict[str, str]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "cpus": str(os.cpu_count()),
        "cpu": model,
        "ram": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "nofile": f"{soft}/{hard}",
    }


def versions(redis_port: int) -> dict[str, str]:
    import msgspec
    import uvicorn
    import websockets

    sha = os.environ.get("BENCH_REVISION") or _git("rev-parse", "--short", "HEAD")
    dirty = " (with uncommitted changes)" if _git("status", "--porcelain") else ""
    redis_version = "?"
    try:
        with socket.create_connection(("127.0.0.1", redis_port), timeout=2) as sock:
            sock.sendall(b"INFO server\r\n")
            data = sock.recv(65536).decode(errors="replace")
        for line in data.splitlines():
            if line.startswith("redis_version:"):
                redis_version = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "parley": f"{sha}{dirty}",
        "uvicorn": f"{uvicorn.__version__} (HTTP; sockets are Parley's own protocol)",
        "uvloop": _version("uvloop"),
        "websockets": getattr(websockets, "__version__", "?"),
        "httptools": _version("httptools"),
        "msgspec": msgspec.__version__,
        "redis": redis_version,
    }


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        return ""


# --------------------------------------------------------------------------- the table


def _busy(r: dict[str, Any]) -> str:
    busy = r.get("machine_busy") or {}
    return f"{busy.get('others_cpu_percent', '?')} %" if busy else "?"


def table(results: dict[str, Any]) -> list[str]:
    """The target table, plus the web process's CPU cost per unit of work (which a
    busy machine does not distort the way it distorts rates and latencies) and how much of
    the machine other people's processes took meanwhile."""
    sizes = results["sizes"]
    rows = [
        "| workload | target | measured | web CPU cost | others' CPU | notes |",
        "|---|---|---|---|---|---|",
    ]
    idle = results.get("idle") or {}
    if idle:
        server = idle.get("server", {})
        conn = idle["connections"]
        failed = sum(conn["failed"].values())
        rows.append(
            f"| RSS per idle joined socket at {conn['sockets']:,} sockets | {TARGETS['rss']} | "
            f"**{server.get('rss_per_socket_kib', '?')} KiB** | "
            f"{server.get('cpu_us_per_join', '?')} µs per create+join | {_busy(idle)} | "
            f"RSS {server.get('rss_kib_before', 0) / 1024:.1f} → "
            f"{server.get('rss_kib_joined', 0) / 1024:.1f} MiB; {conn['joined']:,} joined, "
            f"{failed} failed |"
        )
        conn_ms = idle["latency_ms"].get("connect", {})
        cost = server.get("cpu_us_per_connection")
        rows.append(
            f"| connection set-up incl. JWT check ({results.get('token_alg', 'HS256')}) | "
            f"{TARGETS['connect']} | "
            f"**{conn['per_second']:,} /s** | {cost} µs per connection "
            f"(≈ {1e6 / cost if cost else 0:,.0f} /s per core) | {_busy(idle)} | "
            f"{conn['opened']:,} sockets, {idle['plan']['concurrency']} handshakes in flight; "
            f"connect→ready p50 {conn_ms.get('p50_ms')} ms, p99 {conn_ms.get('p99_ms')} ms; "
            f"web CPU {server.get('cpu_percent_ramp', '?')} % |"
        )
    steps = results.get("fanout_steps") or []
    if steps:
        passing = [s for s in steps if s["ok"]]
        best = max(passing, key=lambda s: s["delivered"], default=None)
        trail = "; ".join(
            f"{s['offered'] // 1000}k→{s['delivered']:,.0f} (p99 {s['p99_ms']} ms, web "
            f"{s['server_cpu']} %, generator {s['generator_cpu']} %"
            + (
                f", {s['publish_errors']} appends refused by Redis"
                if s.get("publish_errors")
                else ""
            )
            + f"){'' if s['ok'] else ' ✗'}"
            for s in steps
        )
        measured = f"**{best['delivered']:,.0f} frames/s**" if best else "**no step passed**"
        cost = (best or steps[-1]).get("cpu_us_per_frame")
        rows.append(
            f"| fan-out saturation, {sizes['fanout_conversations']} conversations × "
            f"{sizes['fanout_tabs']} tabs, p99 ≤ 100 ms, nothing lost | {TARGETS['fanout']} | "
            f"{measured} | {cost} µs per frame "
            f"(≈ {1e6 / cost if cost else 0:,.0f} frames/s per core) | "
            f"{(best or steps[-1]).get('others', '?')} % | offered→delivered: {trail} |"
        )
    lat = results.get("latency") or {}
    if lat:
        pl = lat["latency_ms"].get("latency", {})
        server = lat.get("server", {})
        rows.append(
            f"| latency publish → tab at {sizes['latency_rate']:,} frames/s | "
            f"{TARGETS['latency']} | **p99 {pl.get('p99_ms')} ms** | "
            f"{server.get('cpu_us_per_frame')} µs per frame | {_busy(lat)} | "
            f"p50 {pl.get('p50_ms')} ms, delivered "
            f"{lat['throughput']['frames_per_second']:,} frames/s, lost "
            f"{lat['integrity']['lost']}, web CPU {server.get('cpu_percent_run')} % |"
        )
    model = results.get("model_fanout") or {}
    if model:
        tt = model["latency_ms"].get("ttft", {})
        gap = model["latency_ms"].get("gap", {})
        server = model.get("server", {})
        rows.append(
            f"| end to end through worker + simulated model, {model['plan']['conversations']} × "
            f"{model['plan']['tabs']}, {model['plan']['sim_tokens']}-token replies at "
            f"{model['plan']['sim_tps']} tokens/s | — | "
            f"{model['throughput']['frames_per_second']:,} frames/s | "
            f"{server.get('cpu_us_per_frame')} µs per frame | {_busy(model)} | "
            f"TTFT p50 {tt.get('p50_ms')} / p99 {tt.get('p99_ms')} ms, "
            f"token gap p99 {gap.get('p99_ms')} ms, worker CPU "
            f"{model.get('worker_cpu_us_per_delta')} µs per relayed delta, lost "
            f"{model['integrity']['lost']}, dup {model['integrity']['duplicated']} |"
        )
    rows += _generation_rows(results.get("generation") or {})
    rows += _storm_rows(results.get("storm") or {})
    rows += _sse_rows(results.get("sse") or {})
    chat = results.get("chat_churn") or {}
    if chat:
        i = chat["integrity"]
        tt = chat["latency_ms"].get("ttft", {})
        rows.append(
            f"| chat with churn, {chat['plan']['conversations']} × {chat['plan']['tabs']}, "
            f"5 %/s of tabs drop and rejoin with `after` | lost = dup = 0 | lost {i['lost']}, "
            f"dup {i['duplicated']}; {i['rejoins']} rejoins, {i['rejoins_filled']} filled | — | "
            f"{_busy(chat)} | TTFT p50 {tt.get('p50_ms')} / p99 {tt.get('p99_ms')} ms |"
        )
    return rows


def _generation_rows(g: dict[str, Any]) -> list[str]:
    """The generation path's row: worker CPU per token (goal ≤ 40 µs) and Parley's share of
    the time to first token (goal p50 ≤ 5 ms, p99 ≤ 20 ms)."""
    if not g:
        return []
    added, ttft, turns = g.get("added_ms") or {}, g.get("ttft_ms") or {}, g.get("turns") or {}
    return [
        f"| generation path, model apart: {g['conversations']} × {g['tabs']}, "
        f"{g['tokens_per_reply']}-token replies at {g['tps']:g} tokens/s | worker ≤ 40 µs per "
        f"token; added TTFT p50 ≤ 5 / p99 ≤ 20 ms | **worker {g['worker_us_per_token']} µs per "
        f"token**; added TTFT p50 {added.get('p50_ms')} / p99 {added.get('p99_ms')} ms | — | — | "
        f"model {g['model_us_per_token']} µs and Redis {g['redis_us_per_token']} µs per token, "
        f"{g['tokens_per_script_call']} tokens per append; TTFT p50 {ttft.get('p50_ms')} / p99 "
        f"{ttft.get('p99_ms')} ms; {turns.get('done')} turns done of {turns.get('sent')} sent; "
        f"lost {g.get('lost')}, dup "
        f"{g.get('duplicated')}; Parley's share by stage, p50 / p99 ms: {_stage_list(g)} |"
    ]


def _stage_list(g: dict[str, Any]) -> str:
    """`bench/worker_cost.py`'s `stages_ms` as `accept 1.2 / 9.8, claim ...`."""
    stages: dict[str, dict[str, Any]] = g.get("stages_ms") or {}
    return ", ".join(f"{name} {s.get('p50_ms')} / {s.get('p99_ms')}" for name, s in stages.items())


def _storm_rows(st: dict[str, Any]) -> list[str]:
    """The reconnect storm's row: the tabs of a killed web process rejoining another with
    `after` (goal: 10,000 in ≤ 5 s, p99 ≤ 1 s, no PostgreSQL statement, nothing lost)."""
    if not st:
        return []
    return [
        f"| reconnect storm: {st['tabs']:,} tabs of a killed web process rejoin another with "
        f"`after` | ≤ 5 s, p99 ≤ 1 s, 0 PostgreSQL statements, nothing lost | "
        f"**{st['storm_seconds']} s**, rejoin p50 {st['rejoin_ms_p50']} / p99 "
        f"{st['rejoin_ms_p99']} ms; {st['postgres_queries_during_storm']} PostgreSQL "
        f"statements | {st['web_b_cpu_us_per_setup']} µs per set-up incl. `join` "
        f"(≈ {st['setups_with_join_per_web_core_s']:,} /s per core) | — | "
        f"{st['failed_rejoin']} failed; {st['tabs_with_a_gap_or_reset']} with a gap or reset, "
        f"{st['tabs_behind_the_head']} behind; {st['events_appended']} events appended "
        f"meanwhile |"
    ]


def _sse_rows(sse: dict[str, Any]) -> list[str]:
    """Server-Sent Events next to the WebSocket (`bench/sse_numbers.py`): memory per idle
    joined client and web CPU per delivered event, each on its own web process."""
    if not sse:
        return []
    idle, fan = sse["idle"], sse["fan_out"]
    rss = idle["rss_kib_per_idle_client"]
    ev_sse, ev_ws = fan["sse"], fan["websocket"]
    return [
        f"| RSS per idle joined client, SSE stream vs WebSocket ({idle['clients']:,} each) | — "
        f"| **SSE {rss['sse']} KiB**, WebSocket {rss['websocket']} KiB | — | — | one "
        f"conversation, each kind on its own `parley web` |",
        f"| web CPU per delivered event, SSE vs WebSocket (one {fan['tokens']:,}-token reply "
        f"to {fan['readers']} clients of each) | — | **SSE {ev_sse['cpu_us_per_event']} µs**, "
        f"WebSocket {ev_ws['cpu_us_per_event']} µs | — | — | {ev_sse['events']:,} SSE "
        f"events ({ev_sse['cpu_seconds']} s CPU), {ev_ws['events']:,} WebSocket events "
        f"({ev_ws['cpu_seconds']} s CPU); a lagging stream's merged tokens are one event |",
    ]


def write_doc(doc: Path, results: dict[str, Any], commands: list[str]) -> None:
    m, v = results["machine"], results["versions"]
    lines = [
        START,
        f"Measured {results['finished_at']} by `python -m bench.run` "
        f"({'smoke' if results['smoke'] else 'full'} run, {results['wall_seconds']:.0f} s).",
        "",
        f"- Machine: {m['cpus']} CPUs ({m['cpu']}), {m['ram']} RAM, Linux {m['kernel']}, "
        f"open files {m['nofile']}.",
        f"- Placement: `parley web` on CPU {WEB_CPU}; `parley worker`, Redis, PostgreSQL and "
        f"the load generator on CPU {OTHER_CPU}"
        + (f"; all at nice {results['nice']}." if results.get("nice") else "."),
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        f"- Run as: `{' '.join(shlex.quote(a) for a in results['argv'])}`.",
        "",
        *table(results),
        "",
        "Commands (each `parley load` ran with `PARLEY_JWT_SECRET` and `REDIS_URL` of the "
        "bench's services, `--server-pid` of the web process and `--out`):",
        "",
        "```",
        *commands,
        "```",
        END,
    ]
    text = doc.read_text() if doc.exists() else ""
    block = "\n".join(lines)
    if START in text and END in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        text = (text.rstrip() + "\n\n" if text else "# Benchmarks\n\n") + block + "\n"
    doc.write_text(text)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="<= 30 s, small numbers")
    parser.add_argument(
        "--doc",
        type=Path,
        help="results go here (default: docs/benchmarks.md; "
        "a smoke run writes no doc unless given one)",
    )
    parser.add_argument(
        "--out-dir", type=Path, help="JSON results and charts (default: a new directory under /tmp)"
    )
    parser.add_argument(
        "--only",
        nargs="*",
        choices=["idle", "fanout", "latency", "model", "chat", "storm", "generation", "sse"],
        help="run only these workloads",
    )
    parser.add_argument("--sockets", type=int, help="idle sockets (default 10,000)")
    parser.add_argument(
        "--token-alg",
        choices=["HS256", "RS256"],
        default="HS256",
        help="the idle row's tokens: HS256 with the local secret, or RS256 verified through a "
        "JWKS a local HTTP server publishes (its key fetched once, then cached)",
    )
    parser.add_argument("--concurrency", type=int, help="connection handshakes in flight")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness of every process the bench starts (e.g. -10 on a shared machine; "
        "negative values need root)",
    )
    args = parser.parse_args()
    global NICE
    NICE = args.nice
    _boost(os.getpid())  # this session's autogroup: web, worker and load generators

    if os.cpu_count() and os.cpu_count() < 2:  # type: ignore[operator]
        sys.exit("bench: needs at least 2 CPUs (web on one, everything else on the other)")
    sizes = Sizes.smoke() if args.smoke else Sizes()
    if args.sockets:
        sizes.idle_sockets = args.sockets
    if args.concurrency:
        sizes.connect_concurrency = args.concurrency
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < sizes.idle_sockets + 2048:
        print(
            f"bench: warning: the open-file hard limit ({hard}) leaves little room for "
            f"{sizes.idle_sockets} sockets per process",
            file=sys.stderr,
        )
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="parley-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        work = Path(tmp)
        # results outlive the run's temporary directory (services' data goes with it)
        out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="parley-bench-results-"))
        out_dir.mkdir(parents=True, exist_ok=True)
        redis = embedded.start_redis(work, persist=False)
        postgres = embedded.start_postgres(work, fast=True)
        try:
            _pin_tree(redis.pid, OTHER_CPU)
            _pin_tree(postgres.pid, OTHER_CPU)
            env = _env(redis.url, postgres.url, work)
            bench = Bench(sizes, work, out_dir, env, redis.url, smoke=args.smoke)
            if args.token_alg == "RS256":
                bench.tokens_file = rs256_tokens(work, env, sizes, stack)
            # the worker says "worker ready" at info level
            worker_env = {**env, "PARLEY_SERVER_LOG_LEVEL": "info"}
            worker = parley("worker", worker_env, OTHER_CPU, work / "worker.log")
            bench.worker = worker
            _pin_tree(postgres.pid, OTHER_CPU)  # backends forked since
            try:
                chosen = set(args.only or ["idle", "fanout", "latency", "model", "chat"])
                if "idle" in chosen:
                    bench.idle_and_connect()
                if "fanout" in chosen:
                    bench.fanout_saturation()
                if "latency" in chosen:
                    bench.latency()
                if "model" in chosen and not args.smoke:  # the chat row covers it briefly
                    bench.model_fanout()
                if "chat" in chosen:
                    bench.chat_churn()
                if "storm" in chosen:  # only when asked for: it starts its own services
                    bench.reconnect_storm()
                if "generation" in chosen:  # likewise
                    bench.generation_path()
                if "sse" in chosen:  # likewise
                    bench.sse_next_to_websocket()
            finally:
                if bench.web is not None:
                    bench.web.stop(timeout=20)
                worker.stop(timeout=20)
            port = int(redis.url.rsplit(":", 1)[1].split("/")[0])
            results = bench.results
            results.update(
                argv=["python", "-m", "bench.run", *sys.argv[1:]],
                token_alg=args.token_alg,
                nice=args.nice,
                smoke=args.smoke,
                sizes=sizes.__dict__,
                machine=machine(),
                versions=versions(port),
                finished_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                wall_seconds=time.monotonic() - started,
            )
        finally:
            redis.stop()
            postgres.stop()
        (out_dir / "bench.json").write_text(json.dumps(results, indent=1, default=str))
        print("\n" + "\n".join(table(results)))
        doc = args.doc or (None if args.smoke else ROOT / "docs" / "benchmarks.md")
        if doc is not None:
            write_doc(doc, results, bench.commands)
            print(f"\nwritten: {doc}")
        print(f"results: {out_dir}  ({time.monotonic() - started:.0f} s)")


def rs256_tokens(
    work: Path, env: dict[str, str], sizes: Sizes, stack: contextlib.ExitStack
) -> Path:
    """Point `env` at a JWKS served on 127.0.0.1 (stopped with `stack`) and write one RS256
    token per idle socket, signed with its key: each is verified once, a new token each."""
    signer = Signer.rsa()
    idp = LocalIdP([signer]).start()
    stack.callback(idp.stop)
    env["PARLEY_AUTH_JWKS_URL"] = f"{idp.base}/bench/jwks.json"
    exp = int(time.time()) + sizes.hold_seconds + 3600
    run = secrets.token_hex(3)
    path = work / "rs256-tokens.txt"
    path.write_text(
        "\n".join(
            signer.sign({"sub": f"load-{run}-{i}", "exp": exp}) for i in range(sizes.idle_sockets)
        )
    )
    return path


def _env(redis_url: str, database_url: str, work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PARLEY_", "OPENAI_"))}
    env.pop("PORT", None)
    env.update(
        REDIS_URL=redis_url,
        DATABASE_URL=database_url,
        PARLEY_JWT_SECRET=secrets.token_urlsafe(32),
        PARLEY_DATA_DIR=str(work / "data"),
        PARLEY_CONFIG="/nonexistent",
        PARLEY_SERVER_LOG_LEVEL="warning",
        PARLEY_LIMITS_MAX_CONNECTIONS_PER_USER="1000000",
        PARLEY_LIMITS_TURNS_PER_MINUTE="1000000",
        PARLEY_SIMULATOR_FIRST_TOKEN_DELAY="0.05",
        PARLEY_SIMULATOR_TOKENS_PER_SECOND="100",
        PARLEY_SIMULATOR_MAX_TOKENS="1000",
        PARLEY_WORKER_CONCURRENCY="512",
    )
    return env


if __name__ == "__main__":
    main()
