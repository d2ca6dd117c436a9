"""Calls to the host application's HTTP hooks (docs/hooks.md), the Centrifugo proxy pattern.

One `httpx.AsyncClient` per process posts JSON signed as Standard Webhooks say
(`protocol.webhooks`). Whatever the endpoint does wrong (hangs, answers 500, garbage, a body
too large or too deep, a redirect) comes back as `HookFailed`, never as another exception:
the caller applies its policy (`hooks.turn_failure`, or the finish queue's retries).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any, Final, Literal

import httpx
import msgspec

from protocol import webhooks
from protocol.jsondepth import too_deep
from server.app import metrics
from server.app.config import ConfigError, HooksSettings
from server.app.http_client import BadStatus, fetch_capped

log = logging.getLogger("parley.hooks")

MAX_REPLY_BYTES: Final = 65_536
FINISH_TIMEOUT: Final = 10.0


class PromptMessage(msgspec.Struct, frozen=True):
    role: Literal["system", "user", "assistant"]
    content: str


class Reply(msgspec.Struct, frozen=True, kw_only=True):
    """What a connect or turn hook answers; every field optional. `data` (connect) is
    carried into the socket's later turn hooks; `messages` and `model` (turn) replace the
    prompt and the model."""

    allow: bool = True
    message: str | None = None
    data: dict[str, Any] | None = None
    messages: list[PromptMessage] | None = None
    model: str | None = None


ALLOW: Final = Reply()

_reply_decoder = msgspec.json.Decoder(Reply)
_encoder = msgspec.json.Encoder()


class HookFailed(Exception):
    """The endpoint did not answer usably."""


class Hooks:
    def __init__(self, settings: HooksSettings) -> None:
        self.settings = settings
        self._client: httpx.AsyncClient | None = None
        if settings.secret:
            try:
                webhooks.secret_bytes(settings.secret)
            except webhooks.BadSecret as exc:
                raise ConfigError(f"hooks.secret: {exc}") from None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(follow_redirects=False, trust_env=False)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def decide(self, url: str, payload: dict[str, Any]) -> Reply:
        """Call a connect or turn hook (the payload's `type`); on failure, what
        `hooks.turn_failure` says."""
        try:
            with timed(payload["type"]):
                body = await self.post(url, payload, uuid.uuid4().hex, self.settings.turn_timeout)
                return _decode(body)
        except HookFailed as exc:
            log.warning("hook %s failed (%s); policy: %s", url, exc, self.settings.turn_failure)
            if self.settings.turn_failure == "allow":
                return ALLOW
            return Reply(allow=False, message="the application is unavailable")

    async def post(
        self, url: str, payload: Any, msg_id: str, timeout: float, limit: int = MAX_REPLY_BYTES
    ) -> bytes:
        """POST the signed payload; the reply's body (at most `limit` bytes) when 2xx, else
        HookFailed. `timeout` bounds the whole call, from connecting to the body's last byte."""
        body = _encoder.encode(payload)
        headers = {"content-type": "application/json"}
        if self.settings.secret:
            headers |= webhooks.headers(self.settings.secret, msg_id, int(time.time()), body)
        else:
            headers["webhook-id"] = msg_id
        try:
            _, reply = await fetch_capped(
                self.client,
                "POST",
                url,
                limit=limit,
                deadline=timeout,
                content=body,
                headers=headers,
                timeout=timeout,
            )
            return reply
        except BadStatus as exc:
            raise HookFailed(str(exc)) from None
        except TimeoutError:
            raise HookFailed(f"no complete answer within {timeout:g} s") from None
        except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:  # a bad URL, a huge reply
            raise HookFailed(f"{type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def timed(hook: str) -> Iterator[None]:
    """Time a call of `hook` into `parley_hook_call_seconds`: `ok` when the block ends
    normally, `failed` when it raises."""
    started = time.monotonic()
    outcome = "failed"
    try:
        yield
        outcome = "ok"
    finally:
        metrics.HOOK_CALLS.labels(hook, outcome).observe(time.monotonic() - started)


def _decode(body: bytes) -> Reply:
    if not body.strip():
        return ALLOW
    if too_deep(body):
        raise HookFailed("reply nested too deep")
    try:
        return _reply_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise HookFailed(f"not a hook reply: {exc}") from exc
