"""Every metric Parley exports, defined here and nowhere else, and `/metrics` itself.

One scrape target per process: each process serves its own registry (no multiprocess
directory). Series carry no `process`/`role` label of their own: the scrape target already is
the process, so Prometheus adds them as target labels (see docs/observability.md), and
`parley_process_info{process, role}` says the same from inside for a scrape config that does
not. Constant labels on every series would repeat what the target says, and clash with the
target labels of the same name.

Names follow the OpenTelemetry GenAI semantic conventions where one fits (with their
recommended buckets), `parley_` otherwise. Labels are bounded: never a user, conversation or
message id; a model name only when configured in `metrics.models` (else `other`).

The per-frame counts (frames and bytes written, events received, pieces merged) are plain
ints on `TALLY`, folded into counters when Prometheus scrapes: the fan-out path pays an
integer addition, no lock and no allocation.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from storage.db import QUERIES

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
OTHER_MODEL: Final = "other"

# Buckets recommended by the OpenTelemetry GenAI semantic conventions.
TTFT_BUCKETS: Final = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
TPOT_BUCKETS: Final = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
DURATION_BUCKETS: Final = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
TOKEN_BUCKETS: Final = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip
COUNT_BUCKETS: Final = (0, 1, 5, 10, 50, 100, 500, 1000, 2000, 5000)
BYTES_BUCKETS: Final = (0, 1024, 16_384, 65_536, 262_144, 524_288, 1_048_576, 4_194_304)
STAGE_BUCKETS: Final = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
    0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
LAG_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03,
    0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
SECONDS_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

MODEL: Final = "gen_ai_request_model"

# ---------------------------------------------------------------------- the process

PROCESS_INFO = Gauge(
    "parley_process_info",
    "Always 1: this process's role (web, worker or serve) and name (host-pid).",
    ["process", "role"],
)

LOOP_LAG = Histogram(
    "parley_event_loop_lag_seconds",
    "How late this process's event loop ran a timer callback due every "
    "`metrics.loop_lag_interval` (up to ~1 ms is the poll's rounding): time nothing else on "
    "the loop could run, from a long synchronous step here or from the process waiting for a CPU.",
    buckets=LAG_BUCKETS,
)

# ---------------------------------------------------------------------- sockets (web)

SOCKETS_OPEN = Gauge("parley_ws_sockets_open", "WebSocket connections open in this process.")
SSE_STREAMS_OPEN = Gauge(
    "parley_sse_streams_open",
    "Server-Sent Events responses open in this process (a conversation's or the user's), "
    "counted like sockets against `limits.max_connections_per_user`.",
)
HANDSHAKES = Counter(
    "parley_ws_handshakes_total",
    "WebSocket opening handshakes by outcome: `101` accepted, the HTTP status of a refusal, "
    "or `timeout` (no complete upgrade request in time).",
    ["outcome"],
)
AUTH_FAILURES = Counter(
    "parley_ws_auth_failures_total",
    "Tokens refused on a socket, by reason (expired, invalid).",
    ["reason"],
)
CLOSES = Counter(
    "parley_ws_closes_total",
    "Sockets closed, by close code and by the side whose close frame came first (`none`, "
    "`none`: the TCP connection ended or was cut without one; code `other`: a code Parley "
    "does not define).",
    ["code", "by"],
)
OUTBOX_AT_CLOSE = Histogram(
    "parley_ws_outbox_bytes_at_close",
    "Bytes waiting in a socket's outbox when it closed (0 for a socket that kept up).",
    buckets=BYTES_BUCKETS,
)
JOINS = Counter("parley_joins_total", "`join` commands answered with `joined`.")
REJOINS = Counter("parley_rejoins_total", "Joins with `after` (a client resuming).")
REPLAYED = Histogram(
    "parley_rejoin_replayed_events",
    "Events replayed from the log to a socket that joined with `after`.",
    buckets=COUNT_BUCKETS,
)
RESETS = Counter(
    "parley_resets_total",
    "`joined` with `reset`: the log no longer held what a socket missed; full history sent.",
)

# ---------------------------------------------------------------------- the bus (web)

BUS_LAG = Histogram(
    "parley_bus_delivery_lag_seconds",
    "From a user turn's acceptance (its `message` event's created_at) to that event reaching "
    "this process's pub/sub connection: the say script's round trip plus pub/sub delivery.",
    buckets=SECONDS_BUCKETS,
)
BUS_RECONNECTS = Counter(
    "parley_bus_reconnects_total", "Times the pub/sub connection was re-established."
)
BUS_RESYNCS = Counter(
    "parley_bus_resyncs_total",
    "Listeners told to read the log again after the pub/sub connection was re-established.",
)
TTFT = Histogram(
    "gen_ai_server_time_to_first_token_seconds",
    "Tab-observed time to first token: from the `say` (or `regenerate`) being accepted to the "
    "reply's first token reaching this process's sockets. Observed by every web process with "
    "a socket watching the conversation.",
    [MODEL],
    buckets=TTFT_BUCKETS,
)

# ---------------------------------------------------------------------- turns and generation

FIRST_TOKEN_STAGE = Histogram(
    "parley_first_token_stage_seconds",
    "Parley's own share of a turn's time to first token, stage by stage, one sample per turn "
    "(the model's own share is parley_model_time_to_first_chunk_seconds). Web: `accept` "
    "(a say/regenerate accepted → its turn queued in Redis), `write` (the reply's first token "
    "read from the bus → written to this process's sockets). Worker: `claim` (the turn in the "
    "turns stream → claimed by this worker; from the entry id, millisecond resolution), "
    "`start` (claimed → the request sent to the model), `append` (the model's first chunk → "
    "its piece appended and published by Redis).",
    ["stage"],
    buckets=STAGE_BUCKETS,
)

TURNS = Counter(
    "parley_turns_total",
    "Turns (say/regenerate) by outcome: ok, dup (a repeated say id), busy, rate, nothing "
    "(no reply to regenerate), unloaded (Redis lost the conversation).",
    ["outcome"],
)
CANCELS = Counter("parley_cancels_total", "`cancel` commands accepted by web processes.")
HOOK_CALLS = Histogram(
    "parley_hook_call_seconds",
    "Calls to the host application's hooks (`connect`, `turn`, `finish`) and how long each "
    "took, by outcome (`ok`, `failed`: a timeout, an error status, an unusable answer). A "
    "turn hook's time is added to the turn's time to first token, a connect hook's to the "
    "socket's sign-in.",
    ["hook", "outcome"],
    buckets=SECONDS_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "parley_turn_queue_wait_seconds",
    "From a turn's acceptance to a worker starting it (the fair queue and the turns stream).",
    buckets=SECONDS_BUCKETS,
)
REQUEST_DURATION = Histogram(
    "gen_ai_server_request_duration_seconds",
    "A generation, from a worker starting it to its `done` being appended.",
    [MODEL],
    buckets=DURATION_BUCKETS,
)
MODEL_TTFT = Histogram(
    "parley_model_time_to_first_chunk_seconds",
    "From the request to the model to its first text chunk (the model's own TTFT as the "
    "worker sees it).",
    [MODEL],
    buckets=TTFT_BUCKETS,
)
TPOT = Histogram(
    "gen_ai_server_time_per_output_token_seconds",
    "Mean gap between the model's text chunks after the first, one sample per generation.",
    [MODEL],
    buckets=TPOT_BUCKETS,
)
MAX_GAP = Histogram(
    "parley_model_max_chunk_gap_seconds",
    "The longest gap between two text chunks of one generation (stalls).",
    [MODEL],
    buckets=TPOT_BUCKETS,
)
TOKEN_USAGE = Histogram(
    "gen_ai_client_token_usage",
    "Tokens per generation as the model reported them, by type (input: the prompt, "
    "output: the reply).",
    [MODEL, "gen_ai_token_type"],
    buckets=TOKEN_BUCKETS,
)
FINISHED = Counter(
    "parley_generations_finished_total",
    "Generations ended, by `done` reason (stop, length, cancelled, error).",
    ["reason"],
)
CANCEL_LATENCY = Histogram(
    "parley_cancel_latency_seconds",
    "From a worker receiving a cancel to the generation's `done` being appended.",
    buckets=SECONDS_BUCKETS,
)
TAKEOVERS = Counter(
    "parley_worker_takeovers_total", "Turns taken over from a worker whose heartbeat expired."
)
RUNNING = Gauge("parley_generations_running", "Generations running in this worker.")

# ---------------------------------------------------------------------- persistence, backends

PERSIST_LAG = Histogram(
    "parley_persister_lag_seconds",
    "From a turn finishing (its `done`) to its PostgreSQL commit.",
    buckets=SECONDS_BUCKETS,
)
PERSISTED = Counter("parley_persisted_turns_total", "Finished turns committed to PostgreSQL.")
PERSIST_UNREPLICATED = Counter(
    "parley_persist_unreplicated_total",
    "Finished turns written to PostgreSQL before their Redis node's replicas acknowledged "
    "them (redis.persist_wait_ms ran out, or the wait failed).",
)
REDIS_ERRORS = Counter(
    "parley_redis_errors_total",
    "Redis commands that failed (connection lost, timeout, error reply), by component.",
    ["component"],
)
POSTGRES_ERRORS = Counter(
    "parley_postgres_errors_total",
    "PostgreSQL operations that failed, by component.",
    ["component"],
)
RETRIES = Counter(
    "parley_retries_total",
    "Operations tried again after a Redis or PostgreSQL failure, by component.",
    ["component"],
)


# ---------------------------------------------------------------------- batched counters


class Tally:
    """Per-frame counts as plain ints; `TallyCollector` reports them at scrape time."""

    __slots__ = (
        "bytes_written",
        "coalesced",
        "events_received",
        "frames_written",
        "pieces",
        "pieces_merged",
    )

    def __init__(self) -> None:
        self.frames_written = 0
        self.bytes_written = 0
        self.events_received = 0
        self.pieces_merged = 0
        self.pieces = 0
        self.coalesced = 0


TALLY: Final = Tally()

_TALLIED: Final = (
    ("parley_ws_frames_written", "Frames written to sockets' transports.", "frames_written"),
    ("parley_ws_bytes_written", "Bytes of frames written to sockets' transports.", "bytes_written"),
    (
        "parley_bus_events_received",
        "Events received on the pub/sub connection for channels watched here.",
        "events_received",
    ),
    (
        "parley_outbox_pieces_merged",
        "Token pieces merged into the previous frame for a socket that lags.",
        "pieces_merged",
    ),
    ("parley_model_chunks", "Text chunks received from the model.", "pieces"),
    (
        "parley_model_chunks_coalesced",
        "Text chunks joined to their generation's event still waiting to go to Redis.",
        "coalesced",
    ),
)


class TallyCollector(Collector):
    def collect(self) -> Iterable[Metric]:
        for name, documentation, attribute in _TALLIED:
            yield CounterMetricFamily(name, documentation, value=getattr(TALLY, attribute))
        yield CounterMetricFamily(
            "parley_postgres_queries",
            "Statements sent to PostgreSQL by this process (connection resets included).",
            value=QUERIES.sent,
        )


REGISTRY.register(TallyCollector())


# ---------------------------------------------------------------------- helpers


class Models:
    """The model names that may appear as a label value; any other is `other`."""

    def __init__(self) -> None:
        self.allowed: frozenset[str] = frozenset()

    def configure(self, names: Iterable[str]) -> None:
        self.allowed = frozenset(names)

    def label(self, model: str) -> str:
        return model if model in self.allowed else OTHER_MODEL


MODELS: Final = Models()

KNOWN_CLOSE_CODES: Final = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 1012, 1013, 4400, 4401, 4403, 4408, 4429}
)


def close_code_label(code: int | None) -> str:
    if code is None:
        return "none"
    return str(code) if code in KNOWN_CLOSE_CODES else "other"


def process_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def start_process(role: str, models: Iterable[str]) -> None:
    """Say what this process is and which model names may be labels."""
    PROCESS_INFO.labels(process=process_name(), role=role).set(1)
    MODELS.configure(models)
    _zero_alerted_series()


def _zero_alerted_series() -> None:
    """Series the alert rules divide by exist from the start, at 0, so that `rate()` sees
    their first increase."""
    for code in ("1000", "1001", "1011", "1012", "1013"):
        CLOSES.labels(code, "server")
    for outcome in ("ok", "busy", "rate"):
        TURNS.labels(outcome)
    for reason in ("stop", "length", "cancelled", "error"):
        FINISHED.labels(reason)


def serve(host: str, port: int) -> None:
    """Serve `/metrics` on its own port from a daemon thread (a worker has no web port);
    what it reads — counters and plain ints — is safe to read from another thread."""
    start_http_server(port, addr=host, registry=REGISTRY)


def exposition() -> bytes:
    """This process's metrics in the Prometheus text format."""
    return generate_latest(REGISTRY)


def samples(families: Iterable[Metric]) -> dict[str, float]:
    """Flatten parsed metric families to `name{labels}` → value (tests, `parley load`)."""
    flat: dict[str, float] = {}
    for family in families:
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            flat[f"{sample.name}{{{labels}}}"] = sample.value
    return flat
