"""Turn what a run measured into the JSON result, a table on the terminal, and two charts."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path
from typing import Any

from server.load.runner import Measured, Watched
from server.load.stats import LATENCIES, Hist, Stats, cpu_percent
from server.load.workload import Plan

TITLES = {
    "connect": "connect → ready",
    "ttft": "say → first token",
    "added": "ttft less the model's",
    "gap": "gap between tokens",
    "latency": "publish → tab",
}


def summarize(plan: Plan, procs: int, measured: Measured) -> dict[str, Any]:
    stats = measured.stats
    c = stats.counters
    ramp = float(stats.extra.get("ramp_seconds", 0.0))
    run_seconds = float(stats.extra.get("run_seconds", 0.0))
    plan_json = dataclasses.asdict(plan)
    plan_json["tokens"] = f"<{len(plan.tokens)} tokens>"
    result: dict[str, Any] = {
        "workload": plan.workload,
        "transport": plan.transport,
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "interrupted": measured.interrupted,
        "plan": plan_json,
        "procs": procs,
        "connections": {
            "sockets": c["sockets"],
            "opened": c["connections.ok"],
            "reopened": c["connections.reopened"],
            "failed": _prefixed(c, "connections.failed."),
            "ramp_seconds": round(ramp, 3),
            "per_second": round(c["connections.ok"] / ramp, 1) if ramp > 0 else None,
            "joined": c["tabs.joined"],
        },
        "latency_ms": {name: hist.summary() for name, hist in stats.hists.items() if hist.count},
        "throughput": {
            "run_seconds": round(run_seconds, 3),
            "frames_per_second": _rate(c["run.frames"], run_seconds),
            "tokens_per_second": _rate(c["run.tokens"], run_seconds),
            "published_per_second": _rate(c["publish.sent"], run_seconds),
            "frames": c["frames"],
            "tokens": c["tokens"],
            "published": c["published"],
        },
        "integrity": {
            "lost": c["lost"],
            "lost_at_end": c["lost.at_end"],
            "duplicated": c["duplicated"],
            "rejoins": c["rejoins"],
            "rejoins_filled": c["rejoins.filled"],
            "rejoins_reset": c["rejoins.reset"],
            "rejoins_unfilled": c["rejoins.unfilled"],
            "rejoins_failed": sum(_prefixed(c, "rejoins.failed").values()),
            "events_before_joined": c["events.before_joined"],
        },
        "turns": _prefixed(c, "turns."),
        "errors": _prefixed(c, "errors."),
        "closes": _prefixed(c, "closed."),
        "publish": {"errors": c["publish.errors"], "backlogged": c["publish.backlogged_ticks"]},
        "phases_s": {k: round(v, 3) for k, v in stats.phases.items()},
        "counters": dict(sorted(c.items())),
        "series": _series(stats),
    }
    if measured.server is not None:
        result["server"] = _server(measured.server, stats, c["tabs.joined"] or c["connections.ok"])
    result["generator"] = _generators(measured.generators, stats)
    return result


def _prefixed(counters: Any, prefix: str) -> dict[str, int]:
    return {
        k[len(prefix) :].lstrip("."): v for k, v in sorted(counters.items()) if k.startswith(prefix)
    }


def _rate(n: int, seconds: float) -> float | None:
    return round(n / seconds, 1) if seconds > 0 else None


def _phase_window(stats: Stats, begin: str = "run", end: str = "drain") -> tuple[float, float]:
    start = stats.t0 + stats.phases.get(begin, 0.0)
    stop = stats.t0 + stats.phases.get(end, stats.phases.get("done", 1e9))
    return start, stop


def _server(server: Watched, stats: Stats, sockets: int) -> dict[str, Any]:
    out: dict[str, Any] = {"pid": server.pid}
    if not server.samples:
        return out
    before = server.samples[0]
    start, end = _phase_window(stats)
    in_run = [s for s in server.samples if start <= s.at <= end]
    out["rss_kib_before"] = before.rss_kib
    out["rss_kib_peak"] = max(s.rss_kib for s in server.samples)
    if in_run:
        joined = in_run[-1].rss_kib
        out["rss_kib_joined"] = joined
        if sockets:
            out["rss_per_socket_kib"] = round((joined - before.rss_kib) / sockets, 2)
    window = server.between(start, end)
    if window is not None:
        out["cpu_percent_run"] = round(cpu_percent(*window), 1)
    window = server.between(*_phase_window(stats, "ramp", "join"))
    if window is not None:
        out["cpu_percent_ramp"] = round(cpu_percent(*window), 1)
    out.update(_costs(stats))
    out["samples"] = server.series(stats.t0)
    return out


def _costs(stats: Stats) -> dict[str, Any]:
    """The server's CPU time per phase (sampled exactly at each phase change) and what it
    comes to per connection and per delivered frame: figures that hold even when other work
    shares the machine, unlike rates."""
    at: dict[str, list[float]] = stats.extra.get("server_at_phase", {})
    out: dict[str, Any] = {}

    def spent(begin: str, end: str) -> tuple[float, float] | None:
        if begin in at and end in at:
            return at[end][0] - at[begin][0], at[end][1] - at[begin][1]
        return None

    c = stats.counters
    ramp = spent("ramp", "join")
    if ramp is not None and c["connections.ok"]:
        wall, cpu = ramp
        out["cpu_seconds_ramp"] = round(cpu, 3)
        out["cpu_us_per_connection"] = round(cpu / c["connections.ok"] * 1e6, 1)
        out["cpu_percent_ramp"] = round(100 * cpu / wall, 1) if wall > 0 else None
    join = spent("join", "run")
    if join is not None and c["tabs.joined"]:
        out["cpu_us_per_join"] = round(join[1] / c["tabs.joined"] * 1e6, 1)
    run = spent("run", "drain")
    if run is not None:
        wall, cpu = run
        out["cpu_seconds_run"] = round(cpu, 3)
        out["cpu_percent_run"] = round(100 * cpu / wall, 1) if wall > 0 else None
        if c["run.frames"]:
            out["cpu_us_per_frame"] = round(cpu / c["run.frames"] * 1e6, 2)
    if "run" in at and "ramp" in at:
        out["rss_kib_at_run"] = int(at["run"][2])
    return out


def _generators(generators: list[Watched], stats: Stats) -> dict[str, Any]:
    out: dict[str, Any] = {"processes": len(generators)}
    for name, window in (
        ("run", _phase_window(stats)),
        ("ramp", _phase_window(stats, "ramp", "join")),
    ):
        pairs = [w.between(*window) for w in generators]
        out[f"cpu_percent_{name}"] = round(sum(cpu_percent(*p) for p in pairs if p), 1)
    return out


def _series(stats: Stats) -> dict[str, Any]:
    seconds = sorted(
        set(stats.frames_per_second) | {s for series in stats.per_second.values() for s in series}
    )
    out: dict[str, Any] = {
        "second": seconds,
        "frames": [stats.frames_per_second.get(s, 0) for s in seconds],
    }
    for name, series in stats.per_second.items():
        if not series:
            continue
        for p in (50, 99):
            out[f"{name}_p{p}_ms"] = [
                _ms(series[s].percentile(p)) if s in series else None for s in seconds
            ]
    return out


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


# --------------------------------------------------------------------------- terminal


def _client(result: dict[str, Any]) -> str:
    return "SSE client" if result.get("transport") == "sse" else "socket"


def print_summary(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False)
    table = Table(
        title=f"parley load {result['workload']}"
        + (" over SSE" if result.get("transport") == "sse" else "")
        + (" (interrupted)" if result["interrupted"] else ""),
        show_header=False,
    )
    table.add_column("what", style="bold")
    table.add_column("value")
    conn = result["connections"]
    failed = ", ".join(f"{k}: {v}" for k, v in conn["failed"].items()) or "none"
    table.add_row(
        "sockets",
        f"{conn['opened']} opened of {conn['sockets']}, "
        f"{conn['joined']} joined; failures: {failed}",
    )
    if result.get("transport") != "sse":  # an SSE tab opens nothing before its stream (join)
        table.add_row("connections/s", f"{conn['per_second']} (ramp {conn['ramp_seconds']} s)")
    for name, s in result["latency_ms"].items():
        table.add_row(
            TITLES[name],
            f"p50 {s['p50_ms']} ms  p95 {s['p95_ms']} ms  "
            f"p99 {s['p99_ms']} ms  max {s['max_ms']} ms  (n={s['count']})",
        )
    server = result.get("server_metrics")
    if server is not None:
        client = result["latency_ms"].get("ttft", {})
        table.add_row(
            "TTFT server vs client",
            f"server p50 {server['ttft_p50_ms']} ms  p99 {server['ttft_p99_ms']} ms "
            f"(n={server['ttft_count']}, GET /metrics) | client p50 {client.get('p50_ms')} ms  "
            f"p99 {client.get('p99_ms')} ms",
        )
        closes = ", ".join(f"{code}: {n}" for code, n in server["closes"].items()) or "none"
        table.add_row("server closes", closes)
    tp = result["throughput"]
    table.add_row(
        "delivered",
        f"{tp['frames_per_second']} frames/s, "
        f"{tp['tokens_per_second']} tokens/s over {tp['run_seconds']} s",
    )
    if tp["published"]:
        table.add_row("published", f"{tp['published_per_second']} frames/s")
    integ = result["integrity"]
    ok = integ["lost"] == 0 and integ["duplicated"] == 0
    table.add_row(
        "lost / duplicated",
        f"[{'green' if ok else 'red'}]{integ['lost']} / {integ['duplicated']}[/]",
    )
    if integ["rejoins"]:
        table.add_row(
            "rejoins",
            f"{integ['rejoins']}: {integ['rejoins_filled']} filled, "
            f"{integ['rejoins_reset']} reset, {integ['rejoins_unfilled']} unfilled, "
            f"{integ['rejoins_failed']} failed",
        )
    if result["turns"]:
        table.add_row("turns", ", ".join(f"{k}: {v}" for k, v in result["turns"].items()))
    problems = {
        **{f"error {k}": v for k, v in result["errors"].items()},
        **{f"close {k}": v for k, v in result["closes"].items()},
    }
    table.add_row("errors / closes", ", ".join(f"{k}: {v}" for k, v in problems.items()) or "none")
    server = result.get("server")
    if server and "rss_kib_before" in server:
        per = server.get("rss_per_socket_kib")
        table.add_row(
            "server RSS",
            f"{server['rss_kib_before'] / 1024:.1f} MiB before, "
            f"{server.get('rss_kib_joined', 0) / 1024:.1f} MiB loaded"
            + (f" ({per} KiB per {_client(result)})" if per is not None else ""),
        )
        table.add_row("server CPU", f"{server.get('cpu_percent_run')} % during the run")
        costs = [
            f"{server[key]} µs {label}"
            for key, label in (
                ("cpu_us_per_connection", "per connection"),
                ("cpu_us_per_join", "per create+join"),
                ("cpu_us_per_frame", "per delivered frame"),
            )
            if server.get(key) is not None
            and not (key == "cpu_us_per_connection" and result.get("transport") == "sse")
        ]
        if costs:
            table.add_row("server CPU cost", ", ".join(costs))
    gen = result["generator"]
    table.add_row("generator CPU", f"{gen['cpu_percent_run']} % ({gen['processes']} process(es))")
    console.print(table)


def live_display(enabled: bool) -> tuple[Any, Any]:
    """(callback for Progress, context manager): a rich Live panel on a terminal, else a
    plain line every 5 s on stderr."""
    import sys

    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    console = Console(stderr=True)
    if enabled and console.is_terminal:
        live = Live(console=console, refresh_per_second=4, transient=False)
        last: dict[str, Any] = {}

        def show(p: dict[str, Any], elapsed: float) -> None:
            table = Table(show_header=False, box=None)
            rate = (p.get("frames", 0) - last.get("frames", p.get("frames", 0))) / 0.5
            last.update(p)
            table.add_row("elapsed", f"{elapsed:6.1f} s   phase: {p.get('phase')}")
            table.add_row(
                "sockets",
                f"{p.get('open_now', 0)} open / {p.get('sockets', 0)}"
                f"   opened {p.get('opened', 0)}  failed {p.get('failed', 0)}",
            )
            table.add_row(
                "frames",
                f"{p.get('frames', 0):,} (~{rate:,.0f}/s)   tokens "
                f"{p.get('tokens', 0):,}   published {p.get('published', 0):,}",
            )
            table.add_row(
                "p99 last second",
                "   ".join(
                    f"{TITLES.get(k, k)} {v * 1000:.1f} ms" for k, v in p.get("p99", {}).items()
                ),
            )
            table.add_row(
                "integrity",
                f"lost {p.get('lost', 0)}  duplicated "
                f"{p.get('duplicated', 0)}  rejoins {p.get('rejoins', 0)}  "
                f"errors {p.get('errors', 0)}",
            )
            if "server_rss_kib" in p:
                table.add_row(
                    "server",
                    f"RSS {p['server_rss_kib'] / 1024:.1f} MiB  CPU {p['server_cpu']:.0f} %",
                )
            live.update(table)

        return show, live

    state = {"next": 5.0}

    def plain(p: dict[str, Any], elapsed: float) -> None:
        if elapsed >= state["next"]:
            state["next"] += 5.0
            print(
                f"[{elapsed:5.0f} s] {p.get('phase')}: open {p.get('open_now', 0)}/"
                f"{p.get('sockets', 0)} frames {p.get('frames', 0)} lost {p.get('lost', 0)} "
                f"dup {p.get('duplicated', 0)} errors {p.get('errors', 0)}",
                file=sys.stderr,
                flush=True,
            )

    import contextlib

    return plain, contextlib.nullcontext()


# --------------------------------------------------------------------------- charts


def charts(result: dict[str, Any], stats: Stats, prefix: Path) -> list[Path]:
    """`<prefix>-timeline.png` (p50/p99 per second and delivered frames/s) and
    `<prefix>-histogram.png` (every latency measured)."""
    import logging

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    written: list[Path] = []
    series = result["series"]
    totals = stats.hists
    measured = [name for name in LATENCIES if totals[name].count]
    prefix.parent.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(10, 5))
    for name in measured:
        for p, style in ((50, "-"), (99, "--")):
            values = series.get(f"{name}_p{p}_ms")
            if values:
                points = [
                    (s, v) for s, v in zip(series["second"], values, strict=True) if v is not None
                ]
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, style, label=f"{TITLES[name]} p{p}")
    for phase, at in result.get("phases_s", {}).items():
        if phase in ("join", "run", "drain"):
            ax.axvline(at, color="black", linestyle=":", linewidth=0.8)
            ax.annotate(
                phase,
                (at, 1.0),
                xycoords=("data", "axes fraction"),
                fontsize=7,
                xytext=(2, -10),
                textcoords="offset points",
            )
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("latency (ms)")
    if measured:
        ax.set_yscale("log")
    frames_axis = ax.twinx()
    frames_axis.fill_between(
        series["second"],
        series["frames"],
        step="mid",
        alpha=0.15,
        color="gray",
        label="frames/s delivered",
    )
    frames_axis.set_ylabel("frames/s delivered")
    handles = ax.get_legend_handles_labels()
    extra = frames_axis.get_legend_handles_labels()
    ax.legend(handles[0] + extra[0], handles[1] + extra[1], loc="best", fontsize=7)
    ax.set_title(f"parley load {result['workload']}: latency over time")
    fig.tight_layout()
    path = prefix.with_name(prefix.name + "-timeline.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    if measured:
        fig, axes = plt.subplots(1, len(measured), figsize=(4.5 * len(measured), 4), squeeze=False)
        for ax, name in zip(axes[0], measured, strict=True):
            hist: Hist = totals[name]
            bins = hist.bins()
            values = [max(b * 1000, 1e-3) for b, _ in bins]
            weights = [n for _, n in bins]
            low, high = min(values), max(values)
            edges = [low * (high * 1.01 / low) ** (i / 60) for i in range(61)]
            ax.hist(values, bins=edges, weights=weights)
            ax.set_xscale("log")
            ax.set_xlabel("ms")
            ax.set_ylabel("samples")
            summary = hist.summary()
            ax.set_title(
                f"{TITLES[name]}\np50 {summary['p50_ms']} · p99 {summary['p99_ms']} ms",
                fontsize=9,
            )
            for key, color in (("p50_ms", "green"), ("p99_ms", "red")):
                marker = summary[key]
                if marker:
                    ax.axvline(float(marker), color=color, linestyle=":")
        fig.tight_layout()
        path = prefix.with_name(prefix.name + "-histogram.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
