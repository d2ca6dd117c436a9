"""A person's approval of one tool call (pure): pending until the first answer or the expiry.

    pending ──approve (owner)──▶ approved
       │    ──deny (owner)─────▶ denied
       ├────expiry─────────────▶ expired   (the model is told: denied, no answer in time)
       └────turn cancelled─────▶ cancelled (the call will never run; nobody may answer it)

The first answer wins; a later one, from any tab, learns the state it lost to. Only the
conversation's owner may answer; an answer after the expiry finds the call expired, even
if nothing has marked it yet. `server/redis/approvals.py` holds the same record in Redis and
its Lua script applies these same rules atomically; this module is the reference the tests
compare it with.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Final, Literal

State = Literal["pending", "approved", "denied", "expired", "cancelled"]
Decision = Literal["approve", "deny"]
Outcome = Literal["settled", "already", "forbidden", "unknown", "pending"]
"""What an answer did: settled the call; found it already settled (by an earlier answer or
the expiry); came from someone who is not the owner; named no pending call. `pending` is
only the store's answer to an expiry check made before the expiry."""

SETTLES: Final[dict[Decision, State]] = {"approve": "approved", "deny": "denied"}
MAX_REASON_CHARS: Final = 500


@dataclass(frozen=True, slots=True)
class Approval:
    call_id: str
    owner: str
    tool: str
    arguments: str
    expires_at: float
    """Seconds (the clock of whoever keeps the record: Redis's, for the stored ones)."""
    state: State = "pending"
    by: str | None = None
    reason: str | None = None

    def at(self, now: float) -> Approval:
        """The record as it stands at `now`: a pending one past its expiry is expired."""
        if self.state == "pending" and now >= self.expires_at:
            return replace(self, state="expired")
        return self


@dataclass(frozen=True, slots=True)
class Answered:
    outcome: Outcome
    approval: Approval | None
    """The record after the answer (None for `unknown`, unchanged for `forbidden`)."""


def answer(
    approval: Approval | None,
    user: str,
    decision: Decision,
    now: float,
    reason: str | None = None,
) -> Answered:
    """Apply one person's answer to the record."""
    if approval is None:
        return Answered("unknown", None)
    if user != approval.owner:
        return Answered("forbidden", approval)
    current = approval.at(now)
    if current.state != "pending":
        return Answered("already", current)
    reason = reason[:MAX_REASON_CHARS] if reason else None
    settled = replace(current, state=SETTLES[decision], by=user, reason=reason)
    return Answered("settled", settled)


def model_result(approval: Approval) -> str | None:
    """What the model is told instead of the tool's result: None when the call may run."""
    if approval.state == "approved":
        return None
    if approval.state == "denied":
        why = f": {approval.reason}" if approval.reason else ""
        return f"The user denied this call of {approval.tool}{why}"
    if approval.state == "expired":
        return f"The user did not approve this call of {approval.tool} in time; it did not run"
    if approval.state == "cancelled":
        return f"The turn was stopped before this call of {approval.tool} ran"
    raise ValueError("the approval is still pending")
