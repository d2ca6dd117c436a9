"""`parley load`: open many authenticated sockets against a running Parley and drive a workload.

    parley load idle    --conversations 5000 --tabs 2 --duration 30
    parley load chat    --conversations 20 --tabs 3 --rate 0.2 --churn 0.05 --duration 60
    parley load fanout  --conversations 200 --tabs 3 --tokens 400 --tps 50 --duration 60
    parley load publish --conversations 200 --tabs 3 --rate 12000 --redis-url redis://...
    parley load idle    --transport sse --conversations 500 --server-pid PID
    parley load fanout  --url ws://10.0.0.2:8000/ws --url ws://10.0.0.3:8000/ws --tabs 2

Workloads:

- `idle`: every tab connects, joins its conversation and stays, for `--duration`.
- `chat`: each conversation sends a turn every 1/`--rate` seconds (a turn waits for the
  previous reply to finish); `--churn P` makes each tab drop its connection with probability P
  per second and rejoin with `after` = the last seq it holds.
- `fanout`: the same with long replies (400 tokens unless `--tokens` says otherwise).
- `publish`: no model at all: the generator appends token events straight into the
  conversations' Redis logs, as the worker does, at `--rate` frames/s in total, each stamped
  with its publish time, and the tabs measure publish -> tab latency. Needs `--redis-url`
  (default: the configured REDIS_URL) and the same host (CLOCK_MONOTONIC).

`--transport sse` runs the same workloads with every tab following its conversation over
Server-Sent Events (`GET /api/conversations/{id}/events`, resumed with `?after=`) and sending
over REST (`POST …/messages`), with the bearer token, or with a single-use stream ticket per
stream (`--sse-tickets`, what a browser's EventSource uses). The figures are the same: RSS
per idle client (`--server-pid`), frames/s delivered, seq integrity.

The simulated model's speed is set from the command line: `--tokens N`, `--tps R` and
`--delay S` put the controls `[sim:tokens=N]`, `[sim:tps=R]` and `[sim:delay=S]` into every
user turn's text, and the simulated model honours them (a real model ignores them). Its
defaults come from the server's `[simulator]` configuration (PARLEY_SIMULATOR_*).

Several `--url`s spread the sockets round-robin over several web processes (socket k of the
run goes to URL k modulo their number), so that a conversation's tabs sit on different ones
and its events cross Redis between them; the server-side figures are summed over them all.
Over SSE likewise: tab k's stream and its REST requests go to URL k's web process.

Tokens are minted from `--secret` (default: the configured secret, or the one generated into
the data directory), one user per conversation, or read from `--tokens-file` (one JWT per
line; conversation i uses line i modulo their number).
"""

from __future__ import annotations

import argparse
import json
import resource
import secrets
import sys
from pathlib import Path

from server.app.config import Settings
from server.load.workload import TRANSPORTS, WORKLOADS, Plan

DEFAULT_URL = "ws://127.0.0.1:8000/ws"
DEFAULTS = {
    # workload: (conversations, tabs, rate, sim_tokens)
    "idle": (100, 1, 0.0, None),
    "chat": (10, 2, 0.2, None),
    "fanout": (50, 3, 0.05, 400),
    "publish": (50, 3, 1000.0, None),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parley load",
        description="Drive a load test against a running Parley.",
        epilog=__doc__.split("Workloads:")[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("workload", choices=WORKLOADS)
    parser.add_argument(
        "--url",
        action="append",
        help="the /ws endpoint (default ws://127.0.0.1:8000/ws); repeat it to spread the "
        "sockets round-robin over several web processes, a conversation's tabs on different ones",
    )
    parser.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="websocket",
        help="websocket tabs, or sse: Server-Sent Events streams plus REST sending",
    )
    parser.add_argument(
        "--sse-tickets",
        action="store_true",
        help="sse: open each stream with a stream ticket instead of the bearer token",
    )
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument("--secret", help="HS* secret to mint tokens with (default: configured)")
    auth.add_argument("--tokens-file", type=Path, help="file of JWTs, one per line")
    parser.add_argument("--conversations", "-c", type=int, help="conversations")
    parser.add_argument("--tabs", "-t", type=int, help="sockets joined to each conversation")
    parser.add_argument(
        "--sockets", "-n", type=int, help="total sockets (sets --conversations = sockets / tabs)"
    )
    parser.add_argument(
        "--duration",
        "-d",
        type=float,
        default=30.0,
        help="seconds the workload runs once every socket has joined",
    )
    parser.add_argument(
        "--rate",
        "-r",
        type=float,
        help="chat/fanout: turns/s per conversation; publish: frames/s in total",
    )
    parser.add_argument(
        "--no-join", action="store_true", help="idle: connect only, create and join nothing"
    )
    parser.add_argument(
        "--churn",
        type=float,
        default=0.0,
        help="probability per second that a tab drops and rejoins with `after`",
    )
    parser.add_argument(
        "--text", default="Tell me something about load testing.", help="the user turn's text"
    )
    parser.add_argument("--tokens", type=int, help="simulated reply length ([sim:tokens=N])")
    parser.add_argument("--tps", type=float, help="simulated tokens per second ([sim:tps=R])")
    parser.add_argument("--delay", type=float, help="simulated first-token delay ([sim:delay=S])")
    parser.add_argument(
        "--concurrency", type=int, default=200, help="connection handshakes in flight at once"
    )
    parser.add_argument(
        "--max-connections", type=int, default=20_000, help="refuse to open more sockets than this"
    )
    parser.add_argument("--connect-timeout", type=float, default=10.0)
    parser.add_argument(
        "--drain",
        type=float,
        default=15.0,
        help="seconds allowed at the end for replies in flight to arrive",
    )
    parser.add_argument(
        "--procs",
        type=int,
        default=1,
        help="generator processes (each drives a share of the conversations)",
    )
    parser.add_argument("--server-pid", type=int, help="sample this process's RSS and CPU")
    parser.add_argument("--redis-url", help="publish: the Redis Parley uses (default: configured)")
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    parser.add_argument(
        "--charts",
        type=Path,
        help="chart file prefix (default: next to --out); writes "
        "PREFIX-timeline.png and PREFIX-histogram.png",
    )
    parser.add_argument("--no-charts", action="store_true", help="write no PNG charts")
    parser.add_argument("--no-progress", action="store_true", help="no live display")
    parser.add_argument("--seed", type=int, default=1)
    return parser


def plan_from(args: argparse.Namespace, settings: Settings) -> Plan:
    conversations, tabs, rate, sim_tokens = DEFAULTS[args.workload]
    tabs = args.tabs or tabs
    if args.sockets:
        conversations = max(1, args.sockets // tabs)
    conversations = args.conversations if args.conversations is not None else conversations
    if conversations < 1 or tabs < 1:
        raise SystemExit("parley load: --conversations and --tabs must be at least 1")
    if conversations * tabs > args.max_connections:
        raise SystemExit(
            f"parley load: {conversations} x {tabs} sockets is more than --max-connections "
            f"{args.max_connections}"
        )
    urls = tuple(args.url or [DEFAULT_URL])
    if args.duration <= 0 or args.duration > 86_400:
        raise SystemExit("parley load: --duration must be between 0 and 86400 seconds")
    return Plan(
        workload=args.workload,
        url=urls[0],
        urls=urls,
        tokens=_tokens(args, settings, conversations),
        conversations=conversations,
        tabs=tabs,
        duration=args.duration,
        rate=args.rate if args.rate is not None else rate,
        churn=max(args.churn, 0.0),
        text=args.text,
        sim_tokens=args.tokens if args.tokens is not None else sim_tokens,
        sim_tps=args.tps,
        sim_delay=args.delay,
        concurrency=max(1, args.concurrency),
        connect_timeout=args.connect_timeout,
        drain=args.drain,
        redis_url=args.redis_url or settings.redis.url,
        server_pid=args.server_pid,
        join=not args.no_join,
        log_max_events=settings.redis.log_max_events,
        log_ttl=settings.redis.ttl_seconds,
        seed=args.seed,
        transport=args.transport,
        sse_tickets=args.sse_tickets,
    )


def _tokens(args: argparse.Namespace, settings: Settings, conversations: int) -> list[str]:
    if args.tokens_file:
        tokens = [line.strip() for line in args.tokens_file.read_text().splitlines()]
        tokens = [t for t in tokens if t and not t.startswith("#")]
        if not tokens:
            raise SystemExit(f"parley load: no tokens in {args.tokens_file}")
        return tokens
    from server.edge.auth import Verifier, load_secret

    secret = args.secret or load_secret(settings.auth, settings.data_path)
    verifier = Verifier(settings.auth, secret)
    run = secrets.token_hex(3)
    ttl = args.duration + 3600
    return [verifier.mint(f"load-{run}-{i}", ttl) for i in range(conversations)]


def raise_fd_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE as far as the hard limit allows; return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def main(argv: list[str], settings: Settings) -> None:
    from server.load import report, runner, serverview

    args = _parser().parse_args(argv)
    plan = plan_from(args, settings)
    sockets = plan.conversations * plan.tabs
    limit = raise_fd_limit(sockets + 1024)
    per_process = sockets // max(args.procs, 1) + 64
    if limit < per_process:
        print(
            f"parley load: warning: the file descriptor limit is {limit}, fewer than the "
            f"{per_process} sockets a generator process needs (ulimit -n)",
            file=sys.stderr,
        )
    show, live = report.live_display(not args.no_progress)
    progress = runner.Progress(show, args.procs)
    endpoints = [serverview.metrics_url(url) for url in plan.urls]
    before = serverview.scrape_all(endpoints)
    with live:
        measured = runner.run(plan, max(args.procs, 1), args.server_pid, progress)
    result = report.summarize(plan, max(args.procs, 1), measured)
    after = serverview.scrape_all(endpoints) if before is not None else None
    if before is not None and after is not None:
        result["server_metrics"] = serverview.summary(serverview.delta(before, after))
    report.print_summary(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"result: {args.out}")
    prefix = args.charts or (args.out.with_suffix("") if args.out else None)
    if prefix is not None and not args.no_charts:
        for path in report.charts(result, measured.stats, prefix):
            print(f"chart: {path}")
    integrity = result["integrity"]
    if integrity["lost"] or integrity["duplicated"]:
        sys.exit(3)
