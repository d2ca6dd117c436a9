"""Tool calls waiting for a person's approval, in Redis: they survive a refresh, another web
process, a killed worker and a restart of everything (docs/tools.md).

One hash per call (`keys.approval`) holds the call, its owner and its expiry on Redis's
clock; `settle_approval.lua` applies an answer atomically with the rules of
`protocol/approvals.py`, so the first answer wins whichever process or tab sends it. Both
scripts append their conversation event in the same atomic step — `approval_request` when
the call is first opened, `approval_resolved` when it is settled — so every tab, on any web
process, sees each exactly once and in seq order, and a rejoin replays them. A worker
waiting for the answer polls the record (`wait`), bounded by the expiry, at which it
settles the call as expired itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Final, cast

from redis.asyncio import Redis

from protocol import frames as f
from protocol.approvals import MAX_REASON_CHARS, Answered, Approval, Decision, Outcome, State
from server.redis import keys, scripts
from server.redis.eventlog import encode, event_keys

OPEN: Final = scripts.load("open_approval", functions=["lib_now", "lib_append_event"])
SETTLE: Final = scripts.load("settle_approval", functions=["lib_now", "lib_append_event"])
RETAIN_SECONDS: Final = 86_400.0
"""How long a record stays after its expiry, for a turn resumed late to read its outcome."""
SETTLED_BY: Final[dict[str, f.ApprovalState]] = {
    "approve": "approved",
    "deny": "denied",
    "withdraw": "cancelled",
    "expire": "expired",
}
POLL_FIRST: Final = 0.05
POLL_MAX: Final = 0.5


class Approvals:
    def __init__(
        self,
        redis: Redis,
        timeout: float,
        retain: float = RETAIN_SECONDS,
        *,
        log_max_events: int = 2000,
        log_ttl: int = 604_800,
    ) -> None:
        """`log_max_events` and `log_ttl` are the event log's (`redis.log_max_events`,
        `redis.ttl_seconds`)."""
        self.redis = redis
        self.timeout_ms = max(int(timeout * 1000), 1)
        self.retain_ms = max(int(retain * 1000), 1)
        self.log_max_events = log_max_events
        self.log_ttl = log_ttl
        self._open = OPEN.register(redis)
        self._settle = SETTLE.register(redis)

    async def open(
        self, conversation: str, call_id: str, owner: str, tool: str, arguments: str,
        message_id: str,
    ) -> float:  # fmt: skip
        """Record the pending call and tell the conversation's tabs (once: opened again, it
        keeps its expiry and tells nobody); its expiry in Unix seconds of Redis's clock."""
        request = f.ApprovalRequest(
            conversation=uuid.UUID(conversation),
            message_id=uuid.UUID(message_id),
            call_id=call_id,
            tool=tool,
            arguments=arguments,
        )
        expires_ms, _ = await self._open(
            approval_key=keys.approval(conversation, call_id),
            **event_keys(conversation),
            owner=owner,
            tool=tool,
            arguments=arguments,
            message_id=message_id,
            timeout_ms=self.timeout_ms,
            retain_ms=self.retain_ms,
            request=encode(request),
            maxlen=self.log_max_events,
            ttl=self.log_ttl,
        )
        return int(expires_ms) / 1000

    async def answer(
        self,
        conversation: str,
        call_id: str,
        user: str,
        decision: Decision,
        reason: str | None = None,
    ) -> Answered:
        """One person's answer: `settled` for the first, `already` for later ones."""
        return await self._apply(conversation, call_id, user, decision, reason)

    async def expire(self, conversation: str, call_id: str) -> Answered:
        """Settle the call as expired when its time is up (`pending` before, `already` once
        settled otherwise)."""
        return await self._apply(conversation, call_id, "", "expire", None)

    async def withdraw(self, conversation: str, call_id: str) -> Answered:
        """The turn was cancelled: a call still pending is settled `cancelled` (a later
        answer learns that; nothing runs)."""
        return await self._apply(conversation, call_id, "", "withdraw", None)

    async def get(self, conversation: str, call_id: str) -> Approval | None:
        raw = await self.redis.hgetall(keys.approval(conversation, call_id))
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        return Approval(
            call_id=call_id,
            owner=fields["owner"],
            tool=fields["tool"],
            arguments=fields["arguments"],
            expires_at=int(fields["expires_at"]) / 1000,
            state=cast(State, fields["state"]),
            by=fields.get("by") or None,
            reason=fields.get("reason") or None,
        )

    async def wait(
        self, conversation: str, call_id: str, wake: asyncio.Event | None = None
    ) -> Approval | None:
        """The call once settled — by an answer, or as expired when its time is up; None if
        there is no such call. Reads the record from 50 ms to every 0.5 s, and at once when
        `wake` is set (by whoever sees the conversation's `approval_resolved`)."""
        delay = POLL_FIRST
        wake = wake or asyncio.Event()
        task = asyncio.current_task()
        while True:
            if task is not None and task.cancelling():
                raise asyncio.CancelledError  # a cancel a Redis call swallowed, honoured here
            wake.clear()
            approval = await self.get(conversation, call_id)
            if approval is None or approval.state != "pending":
                return approval
            expired = await self.expire(conversation, call_id)
            if expired.outcome in ("settled", "already"):
                return await self.get(conversation, call_id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), delay)
            delay = min(delay * 2, POLL_MAX)

    async def _apply(
        self, conversation: str, call_id: str, user: str, decision: str, reason: str | None
    ) -> Answered:
        reason = (reason or "")[:MAX_REASON_CHARS]
        conversation_id = uuid.UUID(conversation)
        resolved = f.ApprovalResolved(
            conversation=conversation_id,
            call_id=call_id,
            state=SETTLED_BY[decision],
            by=user or None,
            reason=reason or None,
        )
        expired = f.ApprovalResolved(conversation=conversation_id, call_id=call_id, state="expired")
        outcome, _, _, _ = await self._settle(
            approval_key=keys.approval(conversation, call_id),
            **event_keys(conversation),
            user=user,
            decision=decision,
            reason=reason,
            resolved=encode(resolved),
            expired=encode(expired),
            maxlen=self.log_max_events,
            ttl=self.log_ttl,
        )
        approval = await self.get(conversation, call_id)
        return Answered(cast(Outcome, _text(outcome)), approval)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
