"""Logging: text (the default) or one JSON object per line, with the ids in scope.

The ids are context variables, set where they become known — a socket's command task (the
session, the conversation), a worker's generation (worker, conversation, message), the
persister's turn — so every line logged within carries them without being passed along.
A context variable set in a task stays in that task. Logs never carry a token, a secret or
message text: the ids say which conversation, not what was said.
"""

from __future__ import annotations

import contextvars
import logging
import time
from typing import Final

import msgspec

CONVERSATION: Final = contextvars.ContextVar[str | None]("conversation", default=None)
MESSAGE: Final = contextvars.ContextVar[str | None]("message", default=None)
SESSION: Final = contextvars.ContextVar[str | None]("session", default=None)
WORKER: Final = contextvars.ContextVar[str | None]("worker", default=None)
_IDS: Final = (
    ("conversation", CONVERSATION),
    ("message_id", MESSAGE),
    ("session", SESSION),
    ("worker", WORKER),
)
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET: Final = ("httpx", "httpx2", "httpcore", "httpcore2", "openai")


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message", ids in scope…, "exception"?}` per line; the
    ids are `conversation`, `message_id`, `session` and `worker`."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, var in _IDS:
            value = var.get()
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return msgspec.json.encode(line).decode()


def configure(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for noisy in QUIET:
        logging.getLogger(noisy).setLevel(logging.WARNING)
