"""An HTTP endpoint of the host application on 127.0.0.1 (its hooks, its tools): records each
POST, checks its Standard Webhooks signature and answers as the test says, per path."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from protocol import webhooks
from server.dev import embedded

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@dataclass(frozen=True)
class Slowly:
    """A 200 whose headers come at once and whose body trickles, a byte per `every` s."""

    body: bytes
    every: float = 0.1


Answer = Callable[[str, dict[str, Any]], tuple[int, bytes] | Slowly | None]
"""Per path: status and body, a `Slowly`, or None to hang (for `hang` seconds, then close)."""


@dataclass
class Receiver:
    port: int
    secret: str = SECRET
    hang: float = 6.0
    keep_alive: bool = False
    """HTTP/1.1 with connections kept (what a benchmark wants); else one request each."""
    answers: dict[str, Answer] = field(default_factory=dict)
    calls: list[tuple[str, dict[str, Any], dict[str, str]]] = field(default_factory=list)
    bad_signatures: int = 0
    server: ThreadingHTTPServer | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def of(self, path: str) -> list[dict[str, Any]]:
        return [body for p, body, _ in self.calls if p == path]

    def reset(self) -> None:
        """Forget the answers, calls and bad signatures of the test before."""
        self.answers.clear()
        self.calls.clear()
        self.bad_signatures = 0

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if receiver.keep_alive else "HTTP/1.0"
            wbufsize = 65536  # the reply in one write: headers then body would meet delayed ACKs
            disable_nagle_algorithm = True

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["content-length"]))
                h = {k.lower(): v for k, v in self.headers.items()}
                if not webhooks.verify(
                    receiver.secret, h["webhook-id"], h["webhook-timestamp"],
                    h["webhook-signature"], raw, time.time(),
                ):  # fmt: skip
                    receiver.bad_signatures += 1
                body = json.loads(raw)
                receiver.calls.append((self.path, body, h))
                answer = receiver.answers.get(self.path, lambda p, b: (200, b"{}"))
                reply = answer(self.path, body)
                if reply is None:
                    time.sleep(receiver.hang)
                    self.close_connection = True
                    return
                if isinstance(reply, Slowly):
                    self._trickle(reply)
                    return
                status, payload = reply
                self.send_response(status)
                self.send_header("content-length", str(len(payload)))
                if 300 <= status < 400:
                    self.send_header("location", "/followed")
                self.end_headers()
                self.wfile.write(payload)

            def _trickle(self, reply: Slowly) -> None:
                self.send_response(200)
                self.send_header("content-length", str(len(reply.body)))
                self.end_headers()
                self.close_connection = True
                try:
                    for i in range(len(reply.body)):
                        self.wfile.write(reply.body[i : i + 1])
                        self.wfile.flush()
                        time.sleep(reply.every)
                except OSError:  # the caller gave up
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@contextlib.contextmanager
def receiving() -> Iterator[Receiver]:
    """A receiver on a free port, for the duration of a `with`."""
    receiver = Receiver(embedded.free_port())
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()
