"""What one generation worker and Redis spend per relayed token.

    .venv/bin/python -m bench.worker_cost [--conversations 200] [--tokens 200] [--tps 50]
        [--tabs 1] [--duration S] [--profile worker.pstats] [--append-interval S] [--nice N]

Starts its own Redis and PostgreSQL and, each its own process, the simulated model
(`parley model`), one `parley web` and one `parley worker`, then runs `parley load fanout`
(`--tabs` per conversation, one turn after another for `--duration` seconds) and reads,
around the run, the worker's and the model's CPU time (/proc) and Redis's (`INFO cpu`) and
its EVALSHA count. Prints µs per token for each, the tokens per event and per script call,
what the tabs received (turns finished, events lost, time to first token and Parley's share
of it, `added`, measured by the load generator on its own clock), Parley's share stage by
stage as the web and the worker measured it (`stages_ms`: p50/p99 of
`parley_first_token_stage_seconds` and its neighbours over the run, from their /metrics), and
the load generator's summary; and, to tell a loop stalling from a process waiting for a CPU,
each process's CPU and run-queue wait in ms per second of the run (`cpu_wait`: /proc schedstat,
summed over threads; the machine's run-queue wait and hypervisor steal beside them, and
/proc/loadavg) and the web's and the worker's `parley_event_loop_lag_seconds` p50/p99
(`loop_lag_ms`). A benchmark: it never fails on a number; the
machine may be shared, so per-token costs are what to compare.
With `--profile FILE` the worker runs under cProfile during the load (`bench.profiling`): the
report says where its time goes, but its CPU figures then include the profiler's own cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from bench import profiling
from server.dev import embedded
from tests.helpers import procfs
from tests.helpers.processes import ROOT, bench_cluster, start_all


async def _redis_cpu(url: str) -> tuple[float, int]:
    redis = Redis.from_url(url)
    try:
        cpu = await redis.info("cpu")
        stats = await redis.info("commandstats")
    finally:
        await redis.aclose()
    calls = int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), calls


def _chunks(port: int) -> int:
    """`parley_model_chunks_total` from the worker's GET /metrics."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("parley_model_chunks_total "):
                return int(float(line.split()[1]))
    return 0


STAGE = "parley_first_token_stage_seconds"
STAGES: tuple[tuple[str, str, str, str], ...] = (
    # (the name in the report, the process, the histogram, its `stage` label or "")
    ("accept", "web", STAGE, "accept"),
    ("claim", "worker", STAGE, "claim"),
    ("start", "worker", STAGE, "start"),
    ("model", "worker", "parley_model_time_to_first_chunk_seconds", ""),
    ("append", "worker", STAGE, "append"),
    ("bus", "web", "parley_bus_delivery_lag_seconds", ""),
    ("write", "web", STAGE, "write"),
    ("ttft", "web", "gen_ai_server_time_to_first_token_seconds", ""),
)
"""Parley's share of the time to first token, in the order a turn goes through it: `bus`
(a user message's pub/sub delivery, sampled per turn) stands for the first token's, which
carries no stamp; `ttft` is the whole, as the web process sees it."""

Buckets = dict[tuple[str, str], dict[float, float]]


def _buckets(url: str) -> Buckets:
    """Every histogram's cumulative buckets on `url`/metrics, by (name, `stage` label)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        text = response.read().decode()
    found: Buckets = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                key = (sample.name.removesuffix("_bucket"), sample.labels.get("stage", ""))
                bound = float(sample.labels["le"])
                counts = found.setdefault(key, {})
                counts[bound] = counts.get(bound, 0.0) + sample.value  # summed over models
    return found


def quantile(q: float, cumulative: dict[float, float]) -> float | None:
    """As Prometheus's histogram_quantile: linear within the bucket the rank falls in (the
    largest finite bound when it falls in +Inf); None for no samples."""
    bounds = sorted(cumulative)
    total = cumulative[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return lower


def over_run(then: dict[float, float], now: dict[float, float]) -> dict[str, Any]:
    """One histogram's count, p50 and p99 (ms) over the run: the difference of two scrapes."""
    delta = {bound: count - then.get(bound, 0.0) for bound, count in now.items()}
    p50, p99 = quantile(0.5, delta), quantile(0.99, delta)
    return {
        "count": int(max(delta.values(), default=0)),
        "p50_ms": None if p50 is None else round(p50 * 1000, 2),
        "p99_ms": None if p99 is None else round(p99 * 1000, 2),
    }


def _stages(before: dict[str, Buckets], after: dict[str, Buckets]) -> dict[str, Any]:
    """Each stage's count, p50 and p99 (ms) over the run."""
    return {
        name: over_run(
            before[process].get((metric, stage), {}), after[process].get((metric, stage), {})
        )
        for name, process, metric, stage in STAGES
    }


LOOP_LAG = ("parley_event_loop_lag_seconds", "")
LAG_INTERVAL = 0.02
"""Seconds between loop lag samples in the bench (0.1 by default): enough samples in a short
run for a p99."""


def loop_lag_buckets(url: str) -> dict[float, float]:
    """The cumulative buckets of `parley_event_loop_lag_seconds` on `url`/metrics."""
    return _buckets(url).get(LOOP_LAG, {})


def _loop_lag(before: dict[str, Buckets], after: dict[str, Buckets]) -> dict[str, Any]:
    """The web's and the worker's event loop lag over the run."""
    return {
        process: over_run(before[process].get(LOOP_LAG, {}), after[process].get(LOOP_LAG, {}))
        for process in after
    }


Usage = dict[str, tuple[float, float, int]]
"""{process: (CPU seconds, seconds waiting for a CPU, timeslices run)} at one moment."""


def _usage(pids: dict[str, list[int]]) -> Usage:
    """Each named process's (summed over its pids) CPU and run-queue wait so far."""
    found: Usage = {}
    for name, group in pids.items():
        cpu = wait = 0.0
        slices = 0
        for pid in group:
            try:
                cpu += procfs.cpu_seconds(pid)
                waited, ran = procfs.run_queue_wait(pid)
            except OSError:
                continue  # a PostgreSQL backend that ended
            wait, slices = wait + waited, slices + ran
        found[name] = (cpu, wait, slices)
    return found


def _renice(pid: int, niceness: int) -> None:
    """Set every thread of the process to `niceness` (Linux nice values are per thread)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.setpriority(os.PRIO_PROCESS, int(task.name), niceness)


def _machine() -> tuple[float, float]:
    """The machine's busy and stolen CPU seconds so far."""
    return procfs.machine_busy_seconds(), procfs.machine_steal_seconds()


def _per_second(before: Usage, after: Usage, seconds: float) -> dict[str, dict[str, float]]:
    """Each process's CPU and run-queue wait in ms per second of `seconds`, and its mean
    wait per timeslice (from being woken, or preempted, to running again)."""
    report: dict[str, dict[str, float]] = {}
    for name, (cpu_now, wait_now, slices_now) in after.items():
        cpu_then, wait_then, slices_then = before.get(name, (0.0, 0.0, 0))
        cpu, wait, slices = cpu_now - cpu_then, wait_now - wait_then, slices_now - slices_then
        report[name] = {
            "cpu_ms_per_s": round(cpu * 1000 / seconds, 1),
            "wait_ms_per_s": round(wait * 1000 / seconds, 1),
            "wait_us_per_slice": round(wait * 1e6 / slices, 1) if slices else 0.0,
        }
    return report


def _load_generator(command: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run `parley load`, sampling its CPU and run-queue wait (and its forked generators')
    until it exits: the last sample, taken at most 0.5 s before, stands for the whole run."""
    started = time.monotonic()
    proc = subprocess.Popen(command, cwd=ROOT, env=env)
    last: Usage = {}
    seconds = 0.0
    while proc.poll() is None and time.monotonic() - started < timeout:
        now = _usage({"load": sorted(procfs.descendants(proc.pid))})
        last, seconds = now, time.monotonic() - started
        time.sleep(0.5)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    return _per_second({}, last, seconds) if last and seconds else {}


def _settle(pid: int, limit: float = 120) -> None:
    """Wait until the process uses less than 5 % of a core (at most `limit` seconds)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = procfs.cpu_seconds(pid)
        time.sleep(1.0)
        if procfs.cpu_seconds(pid) - before < 0.05:
            return


def _received(load: dict[str, Any]) -> dict[str, Any]:
    """What the tabs got: turns sent and finished (their `done` seen), events lost or repeated,
    and the time to first token (`added`: less the model's own, Parley's share)."""
    latency = load.get("latency_ms", {})
    integrity = load.get("integrity", {})
    return {
        "turns": load.get("turns"),
        "lost": integrity.get("lost"),
        "duplicated": integrity.get("duplicated"),
        "ttft_ms": {k: latency.get("ttft", {}).get(k) for k in ("count", "p50_ms", "p99_ms")},
        "added_ms": {k: latency.get("added", {}).get(k) for k in ("count", "p50_ms", "p99_ms")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--tps", type=float, default=50)
    parser.add_argument("--tabs", type=int, default=1)
    parser.add_argument("--duration", type=float, help="seconds of turns (tokens/tps + 5)")
    parser.add_argument(
        "--nice",
        type=int,
        help="renice web, worker, model and Redis (every thread; below 0 needs root): with "
        "the load generator and the machine's other processes at 0, a tail that shrinks was "
        "waiting for a CPU",
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--profile", type=Path, help="write the worker's cProfile stats here")
    parser.add_argument(
        "--append-interval", type=float, help="the worker's worker.append_interval (seconds)"
    )
    args = parser.parse_args()
    profile = args.profile.resolve() if args.profile else None
    with tempfile.TemporaryDirectory() as tmp, bench_cluster(Path(tmp)) as cluster:
        model = cluster.model()
        env = {
            "OPENAI_BASE_URL": f"{model.url}/v1",
            "OPENAI_API_KEY": "sim",
            "PARLEY_WORKER_CONCURRENCY": str(args.conversations * 2),
            "PARLEY_LIMITS_MAX_CONNECTIONS_PER_USER": "100000",
            "PARLEY_LIMITS_TURNS_PER_MINUTE": "100000",
            "PARLEY_SIMULATOR_MAX_TOKENS": str(args.tokens * 2),
            "PARLEY_METRICS_LOOP_LAG_INTERVAL": f"{LAG_INTERVAL:g}",
        }
        web = cluster.process("web", start=False, **env)
        metrics_port = embedded.free_port()
        worker_env = env | (profiling.env(profile) if profile else {})
        if args.append_interval is not None:
            worker_env["PARLEY_WORKER_APPEND_INTERVAL"] = f"{args.append_interval:g}"
        worker = cluster.process(
            "worker", start=False, **worker_env, PARLEY_WORKER_METRICS_PORT=str(metrics_port)
        )
        start_all([model, web, worker])
        redis_url = cluster.services.redis_url
        redis_before = asyncio.run(_redis_cpu(redis_url))
        chunks_before = _chunks(metrics_port)
        worker_url = f"http://127.0.0.1:{metrics_port}"
        buckets_before = {"web": _buckets(web.url), "worker": _buckets(worker_url)}
        worker_before = procfs.cpu_seconds(worker.pid)
        model_before = procfs.cpu_seconds(model.pid)
        web_before = procfs.cpu_seconds(web.pid)
        postgres = sorted(procfs.descendants(cluster.services.postgres.pid))
        watched = {
            "web": [web.pid],
            "worker": [worker.pid],
            "model": [model.pid],
            "redis": [cluster.services.redis.pid],
            "postgres": postgres,
        }
        if args.nice is not None:
            for pid in (web.pid, worker.pid, model.pid, cluster.services.redis.pid):
                _renice(pid, args.nice)
        loadavg_before = Path("/proc/loadavg").read_text().split()[:3]
        usage_before, machine_before, clock_before = _usage(watched), _machine(), time.monotonic()
        out = Path(tmp) / "load.json"
        duration = args.duration or args.tokens / args.tps + 5
        if profile:
            profiling.start(worker.pid)
        load_usage = _load_generator(
            [
                sys.executable,
                "-m",
                "server.app.cli",
                "load",
                "fanout",
                "--url",
                web.ws_url,
                "--conversations",
                str(args.conversations),
                "--tabs",
                str(args.tabs),
                "--tokens",
                str(args.tokens),
                "--tps",
                f"{args.tps:g}",
                "--rate",
                "1",
                "--duration",
                f"{duration:g}",
                "--no-progress",
                "--no-charts",
                "--out",
                str(out),
            ],
            web.env,
            600 + duration,
        )
        usage_after, machine_after = _usage(watched), _machine()
        lag_after = {"web": _buckets(web.url), "worker": _buckets(worker_url)}
        seconds = time.monotonic() - clock_before
        loadavg_after = Path("/proc/loadavg").read_text().split()[:3]
        _settle(worker.pid)  # a saturated worker is still relaying what it has read
        if profile:
            profiling.stop(worker.pid, profile)
        chunks = _chunks(metrics_port) - chunks_before
        buckets_after = {"web": _buckets(web.url), "worker": _buckets(worker_url)}
        worker_cpu = procfs.cpu_seconds(worker.pid) - worker_before
        model_cpu = procfs.cpu_seconds(model.pid) - model_before
        web_cpu = procfs.cpu_seconds(web.pid) - web_before
        redis_after = asyncio.run(_redis_cpu(redis_url))
        load: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    tokens = chunks  # the text chunks the worker read from the model: one token each
    frames = int(load.get("counters", {}).get("tokens", 0))
    appends = redis_after[1] - redis_before[1]
    result = {
        "conversations": args.conversations,
        "tabs": args.tabs,
        "tokens_per_reply": args.tokens,
        "tps": args.tps,
        "append_interval": args.append_interval,
        "nice": args.nice,
        "tokens": tokens,
        "token_frames_received": frames,
        "worker_cpu_s": round(worker_cpu, 2),
        "model_cpu_s": round(model_cpu, 2),
        "redis_cpu_s": round(redis_after[0] - redis_before[0], 2),
        "web_cpu_s": round(web_cpu, 2),
        "evalsha_calls": appends,
        "worker_us_per_token": round(worker_cpu * 1e6 / tokens, 1) if tokens else None,
        "model_us_per_token": round(model_cpu * 1e6 / tokens, 1) if tokens else None,
        "redis_us_per_token": round((redis_after[0] - redis_before[0]) * 1e6 / tokens, 1)
        if tokens
        else None,
        "tokens_per_script_call": round(tokens / appends, 2) if appends else None,
        # each token event reaches every tab once: the events appended, however many per call
        "tokens_per_event": round(tokens * args.tabs / frames, 2) if frames else None,
    } | _received(load)
    result["stages_ms"] = _stages(buckets_before, buckets_after)
    result["loop_lag_ms"] = _loop_lag(buckets_before, lag_after)
    result["cpu_wait"] = _per_second(usage_before, usage_after, seconds) | load_usage
    result["machine"] = {
        "seconds": round(seconds, 1),
        "busy_ms_per_s": round((machine_after[0] - machine_before[0]) * 1000 / seconds, 1),
        "steal_ms_per_s": round((machine_after[1] - machine_before[1]) * 1000 / seconds, 1),
        "loadavg_before": " ".join(loadavg_before),
        "loadavg_after": " ".join(loadavg_after),
    }
    print(json.dumps(result, indent=1))
    if profile and profile.exists():
        print(profiling.report(profile))
    if args.out:
        args.out.write_text(json.dumps(result | {"load": load}, indent=1, default=str))


if __name__ == "__main__":
    main()
