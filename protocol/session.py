"""One connection's protocol state machine, free of I/O (the python-websockets sans-I/O shape).

The I/O layer feeds it what arrives (`receive_text`, `receive_binary`), what it learned
(`authenticated`, `auth_failed`) and the passing of time (`tick`), then drains `actions()`
and carries each one out: `Reply` sends a frame, `Close` closes the socket, `Verify` checks a
token and reports back, `Command` is a valid request for the server to execute.

Time is passed in as plain monotonic and wall-clock seconds so that tests can drive it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from protocol import frames as f
from protocol import text


class State(enum.Enum):
    AWAITING_AUTH = "awaiting_auth"
    READY = "ready"
    CLOSED = "closed"


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    TOO_LARGE = 1009
    INTERNAL = 1011
    RESTART = 1012
    TRY_AGAIN_LATER = 1013
    PROTOCOL = 4400
    UNAUTHORIZED = 4401
    FORBIDDEN_ORIGIN = 4403
    REFUSED = 4403  # the same code: forbidden, by the Origin check or the connect hook
    AUTH_TIMEOUT = 4408
    TOO_MANY = 4429


CLOSE_MEANINGS: Final[Mapping[CloseCode, str]] = {
    CloseCode.NORMAL: "normal closure",
    CloseCode.GOING_AWAY: "server going away: reconnect and rejoin with `after`",
    CloseCode.TOO_LARGE: "frame larger than `limits.max_frame_bytes` (256 KiB)",
    CloseCode.INTERNAL: "internal error",
    CloseCode.RESTART: (
        "service restart (a draining web process): reconnect and rejoin with `after`"
    ),
    CloseCode.TRY_AGAIN_LATER: (
        "try again later: the client read too slowly (its outbox passed "
        "`limits.outbox_bytes`), or Redis is unavailable at sign-in"
    ),
    CloseCode.PROTOCOL: "`limits.bad_frames_before_close` bad frames in a row",
    CloseCode.UNAUTHORIZED: (
        "missing, invalid or expired token (closed `auth.refresh_grace` after expiry); "
        "a frame before `auth`"
    ),
    CloseCode.FORBIDDEN_ORIGIN: (
        "forbidden: Origin not allowed (sent as HTTP 403 on the upgrade), or the host "
        "application's connect hook refused the socket (the reason is its message)"
    ),
    CloseCode.AUTH_TIMEOUT: "no `auth` frame within `auth.auth_timeout`",
    CloseCode.TOO_MANY: (
        "more than `limits.max_connections_per_user` sockets for the user, or a frame flood"
    ),
}
"""What each close code means: the one source of the close-code lists in docs/protocol.md,
docs/asyncapi.json and server/static/protocol.js."""


@dataclass(frozen=True, slots=True)
class Reply:
    frame: f.ServerFrame


@dataclass(frozen=True, slots=True)
class Close:
    code: CloseCode
    reason: str


@dataclass(frozen=True, slots=True)
class Verify:
    token: str
    ref: str | None


@dataclass(frozen=True, slots=True)
class Command:
    """A valid client request (create, join, leave, say, cancel, regenerate) to execute."""

    frame: f.ClientFrame


Action = Reply | Close | Verify | Command

FIRST_FRAME_AUTH = "the first frame must be `auth`"


@dataclass(frozen=True, slots=True)
class SessionLimits:
    max_text_chars: int
    frames_per_second: float
    frame_burst: int
    bad_frames_before_close: int
    auth_timeout: float
    refresh_hint: float = 0.0
    """Seconds before the token's expiry that the socket gets a `refresh` hint (0: never)."""
    refresh_grace: float = 0.0
    """Seconds past the token's expiry that the socket stays open waiting for a new one."""


class Session:
    """What one socket has said and may say next."""

    __slots__ = (
        "_actions",
        "_auth_deadline",
        "_bad_in_a_row",
        "_bucket",
        "_bucket_at",
        "_hinted",
        "_limited",
        "expires_at",
        "limits",
        "state",
        "user",
        "verifying",
    )

    def __init__(self, limits: SessionLimits, now: float) -> None:
        self.limits = limits
        self.state = State.AWAITING_AUTH
        self.user: str | None = None
        self.expires_at: float | None = None
        self.verifying = False
        self._hinted = False
        self._auth_deadline = now + limits.auth_timeout
        self._bad_in_a_row = 0
        self._limited = 0
        self._bucket = float(limits.frame_burst)
        self._bucket_at = now
        self._actions: list[Action] | None = None  # a list only while actions wait

    # ------------------------------------------------------------------ inputs

    def receive_text(self, data: str | bytes, now: float) -> None:
        if self.state is State.CLOSED:
            return
        if not self._take_token(now):
            self._limited += 1
            if self._limited >= self.limits.bad_frames_before_close:
                self._close(CloseCode.TOO_MANY, "too many frames")
            else:
                self._error(f.FrameError("rate_limited", "too many frames; slow down"), retry=1.0)
            return
        self._limited = 0
        try:
            frame = f.decode_client(data)
        except f.FrameError as exc:
            self._bad(exc)
            return
        self._frame(frame)

    def receive_binary(self, now: float) -> None:
        if self.state is State.CLOSED:
            return
        self._bad(f.FrameError("bad_frame", "binary frames are not supported: send JSON text"))

    def authenticated(self, user: str, expires_at: float | None, ref: str | None) -> bool:
        """Record a verified token; return True the first time (the caller sends `ready`)."""
        self.verifying = False
        if self.state is State.CLOSED:
            return False
        if self.user is not None and user != self.user:
            self._close(CloseCode.UNAUTHORIZED, "token is for another user")
            return False
        first = self.state is State.AWAITING_AUTH
        self.user, self.expires_at, self.state = user, expires_at, State.READY
        self._hinted = False
        if not first:
            self._reply(f.Ack(ref=ref, expires_at=_epoch(expires_at)))
        return first

    def auth_failed(self, reason: str) -> None:
        self.verifying = False
        self._close(CloseCode.UNAUTHORIZED, reason)

    def tick(self, now: float, wall: float) -> None:
        """Close the socket when its auth window runs out. As its token nears expiry, hint
        `refresh` once (`refresh_hint` seconds before); close it `refresh_grace` seconds
        after expiry unless an `auth` frame brought a fresh token meanwhile."""
        if self.state is State.AWAITING_AUTH and not self.verifying and now >= self._auth_deadline:
            self._close(CloseCode.AUTH_TIMEOUT, "no auth frame in time")
        elif self.state is State.READY and self.expires_at is not None:
            if wall >= self.expires_at + self.limits.refresh_grace:
                self._close(CloseCode.UNAUTHORIZED, "token expired")
            elif self._hint_due(wall):
                self._hinted = True
                self._reply(f.Refresh(expires_at=int(self.expires_at)))

    def token_deadline(self) -> float | None:
        """The wall-clock time of the next decision about the token in force (its `refresh`
        hint, then its close), or None when there is none to make: when to `tick` next."""
        if self.state is not State.READY or self.expires_at is None:
            return None
        if self.limits.refresh_hint > 0 and not self._hinted:
            return self.expires_at - self.limits.refresh_hint
        return self.expires_at + self.limits.refresh_grace

    def _hint_due(self, wall: float) -> bool:
        hint = self.limits.refresh_hint
        return (
            hint > 0
            and not self._hinted
            and self.expires_at is not None
            and (wall >= self.expires_at - hint)
        )

    def close(self, code: CloseCode, reason: str) -> None:
        self._close(code, reason)

    def actions(self) -> list[Action]:
        actions, self._actions = self._actions, None
        return actions or []

    # ------------------------------------------------------------------ internals

    def _act(self, action: Action) -> None:
        if self._actions is None:
            self._actions = []
        self._actions.append(action)

    def _frame(self, frame: f.ClientFrame) -> None:
        if isinstance(frame, f.Auth):
            self._bad_in_a_row = 0
            self.verifying = True
            self._act(Verify(frame.token, frame.ref))
            return
        if self.state is not State.READY:
            self._close(CloseCode.UNAUTHORIZED, FIRST_FRAME_AUTH)
            return
        if (unstorable := text.unstorable_field(frame)) is not None:
            ref = None if unstorable[0] == "ref" else frame.ref
            self._error(f.FrameError("invalid", text.describe(*unstorable), ref))
            return
        if isinstance(frame, f.Say) and len(frame.text) > self.limits.max_text_chars:
            self._error(
                f.FrameError(
                    "too_large",
                    f"text is {len(frame.text)} characters; the limit is "
                    f"{self.limits.max_text_chars}",
                    frame.ref,
                )
            )
            return
        if isinstance(frame, f.Say) and not frame.text.strip():
            self._error(f.FrameError("invalid", "`text` is empty", frame.ref))
            return
        self._bad_in_a_row = 0
        if isinstance(frame, f.Ping):
            self._reply(f.Pong(ref=frame.ref))
        else:
            self._act(Command(frame))

    def _bad(self, exc: f.FrameError) -> None:
        """An undecodable or invalid frame: an error, and after too many in a row a close;
        before `ready`, where only `auth` may come, a close at once, as for any other frame."""
        if self.state is not State.READY:
            self._close(CloseCode.UNAUTHORIZED, FIRST_FRAME_AUTH)
            return
        self._bad_in_a_row += 1
        if self._bad_in_a_row >= self.limits.bad_frames_before_close:
            self._close(CloseCode.PROTOCOL, "too many bad frames")
        else:
            self._error(exc)

    def _error(self, exc: f.FrameError, retry: float | None = None) -> None:
        self._reply(f.Error(code=exc.code, message=exc.message, ref=exc.ref, retry_after=retry))

    def _reply(self, frame: f.ServerFrame) -> None:
        self._act(Reply(frame))

    def _close(self, code: CloseCode, reason: str) -> None:
        if self.state is not State.CLOSED:
            self.state = State.CLOSED
            self._act(Close(code, reason))

    def _take_token(self, now: float) -> bool:
        """Token bucket: `frame_burst` frames at once, `frames_per_second` sustained."""
        refill = (now - self._bucket_at) * self.limits.frames_per_second
        self._bucket = min(float(self.limits.frame_burst), self._bucket + refill)
        self._bucket_at = now
        if self._bucket < 1.0:
            return False
        self._bucket -= 1.0
        return True


def _epoch(wall: float | None) -> int | None:
    return None if wall is None else int(wall)
