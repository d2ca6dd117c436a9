"""What a client is told when a request fails: its own fault, an outage, or a bug.

One classification for the WebSocket (`error` frame codes) and the REST API (HTTP status):

- `invalid` / 400: Redis or PostgreSQL refused the request's own data (a bad argument, a
  value out of range, a character the database cannot store). Logged at info: nothing is
  wrong with the service.
- `unavailable` / 503: a backing service cannot be reached, is overloaded, read-only,
  loading or shutting down; trying again later can succeed. Logged as a warning.
- `internal` / 500: anything else is a bug in Parley, logged with its traceback.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime
from typing import Final

import asyncpg
from asyncpg.exceptions._base import DataError as PgArgumentError
from redis import exceptions as redis_errors

from protocol import frames as f
from server.edge.bus import BusUnavailable

log = logging.getLogger("parley.failures")


class Refused(Exception):
    """A request the user cannot have now; becomes an `error` frame or an HTTP error."""

    def __init__(
        self,
        code: f.ErrorCode,
        message: str,
        retry_after: float | None = None,
        *,
        resets_at: datetime | None = None,
        remaining: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code: f.ErrorCode = code
        self.message = message
        self.retry_after = retry_after
        self.resets_at = resets_at
        """With `quota_exceeded`: when the budget resets, and what remains of it (0)."""
        self.remaining = remaining


HTTP_STATUS: Final[dict[f.ErrorCode, int]] = {
    "bad_frame": 400,
    "invalid": 400,
    "too_large": 413,
    "unauthorized": 401,
    "not_found": 404,
    "busy": 409,
    "rate_limited": 429,
    "quota_exceeded": 429,
    "forbidden_model": 403,
    "unavailable": 503,
    "internal": 500,
}

REDIS_OUTAGE_PREFIXES: Final = ("BUSY", "LOADING", "MASTERDOWN", "OOM", "READONLY", "TRYAGAIN")
"""Error replies by which Redis says it cannot serve anyone right now."""
REDIS_BUG_PREFIXES: Final = ("WRONGTYPE", "NOSCRIPT", "NOPERM")
"""Error replies no request can cause: Parley's keys or scripts are wrong."""
_PIPELINED: Final = re.compile(r"^Command # \d+ \(.*?\) of pipeline caused error: ", re.S)
"""How redis-py introduces a pipelined command's error reply (the reply follows)."""
PG_INVALID_CLASSES: Final = ("22", "23")
"""SQLSTATE classes for data exceptions and integrity violations: the request's values."""
PG_OUTAGE_CLASSES: Final = ("08", "25", "40", "53", "54", "55", "57", "58")
"""Connection, read-only, rollback, resources, limits, state, operator intervention, system."""


def classify(exc: BaseException) -> f.ErrorCode:
    """`invalid`, `unavailable` or `internal` for an exception a request ended in."""
    if isinstance(exc, Refused):
        return exc.code
    if isinstance(exc, redis_errors.RedisError):
        return _redis(exc)
    if isinstance(exc, PgArgumentError):  # asyncpg cannot encode an argument
        return "invalid"
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        if state.startswith(PG_INVALID_CLASSES):
            return "invalid"
        return "unavailable" if state.startswith(PG_OUTAGE_CLASSES) else "internal"
    if isinstance(exc, UnicodeEncodeError):  # text with a lone surrogate reached a client
        return "invalid"
    if isinstance(exc, asyncpg.InterfaceError | BusUnavailable | OSError):
        return "unavailable"
    return "internal"


def _redis(exc: redis_errors.RedisError) -> f.ErrorCode:
    if isinstance(exc, redis_errors.DataError):  # redis-py refused an argument's type
        return "invalid"
    if not isinstance(exc, redis_errors.ResponseError):
        return "unavailable"  # connection, timeout, cluster down
    reply = _PIPELINED.sub("", str(exc)).lstrip(" ('\"")
    if isinstance(exc, redis_errors.NoScriptError):
        return "internal"
    if reply.startswith(REDIS_OUTAGE_PREFIXES):
        return "unavailable"
    if reply.startswith(REDIS_BUG_PREFIXES):
        return "internal"
    return "invalid"


def refusal(exc: BaseException, doing: str) -> Refused:
    """The Refused to answer a request with, logged as its class deserves; `doing` says
    what failed, for the log ("join", "POST /api/conversations")."""
    if isinstance(exc, Refused):
        return exc
    code = classify(exc)
    if code == "invalid":
        detail = _first_line(exc)
        log.info("%s refused: %s: %s", doing, type(exc).__name__, detail)
        return Refused("invalid", f"the request was refused: {detail}")
    if code == "unavailable":
        log.warning("%s: a backing service is unavailable: %s: %s", doing, type(exc).__name__, exc)
        return Refused("unavailable", "a backing service is unavailable; try again")
    log.error("%s failed", doing, exc_info=exc)
    return Refused("internal", "internal error")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
