"""A tool call that needs a person's approval, as the worker waits for it.

The call is opened in Redis (`server/redis/approvals.py`), which appends its
`approval_request` event once; the worker then waits — no model call, no tool run — until an
`approve` or `deny` from any tab settles it, or its expiry (`tools.approval_timeout`, on
Redis's clock) does. A worker that resumes the turn after the first one died opens the same
call again: the record keeps its first expiry and the tabs get no second request, and if the
call was answered meanwhile the answer is read at once. Nothing waits longer than the expiry.

While it waits the worker listens on the conversation's channel: the `approval_resolved`
that the settle script publishes wakes it at once (the record is read every 0.5 s anyway,
so a lost message or a pub/sub outage only delays it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final

from protocol import frames as f
from protocol.approvals import Approval, model_result
from protocol.text import scrub
from protocol.toolcalls import ToolCall
from server.edge.bus import BusUnavailable
from server.edge.shardbus import Fanout
from server.redis import keys
from server.redis.approvals import Approvals
from server.redis.client import UNREACHABLE
from server.redis.turns import Job
from server.tools.definitions import Result, Tool, error

LOST = "the call's approval was lost (Redis lost its data); it did not run"
RESOLVED = b'"type":"approval_resolved"'

log = logging.getLogger("parley.worker")


class _Wake:
    """Sets `event` when the conversation's channel carries an `approval_resolved`."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def on_event(self, seq: int, frame: bytes) -> None:
        if RESOLVED in frame:
            self.event.set()

    def resync(self) -> None:
        self.event.set()


def needs_approval(tool: Tool | None) -> bool:
    return tool is not None and tool.approval == "always"


Answered = tuple[f.ToolApproval | None, Result | None]
"""How the call's approval ended (None when its record was lost), and None when the call may
run, else the result the model reads instead of the tool's."""

WITHDRAWN: Final = f.ToolApproval(state="cancelled")


def outcome(approval: Approval) -> f.ToolApproval:
    """A settled approval as its `tool_result` part keeps it."""
    if approval.state == "pending":
        raise ValueError("the approval is still pending")
    return f.ToolApproval(state=approval.state, by=approval.by, reason=approval.reason)


async def approved(approvals: Approvals, bus: Fanout, job: Job, call: ToolCall) -> Answered:
    """How a person answered the call: once approved, it may run; otherwise the model reads
    the denial and its reason, or the expiry, instead of the tool's result."""
    channel, wake = keys.channel(job.conversation), _Wake()
    try:
        await bus.subscribe(channel, wake)
    except BusUnavailable as exc:
        log.warning("waiting for an approval without pub/sub (%s): reading every 0.5 s", exc)
    try:
        return await _settled(approvals, job, call, wake.event)
    finally:
        with contextlib.suppress(BusUnavailable):
            bus.unsubscribe(channel, wake)


async def withdrawn(approvals: Approvals, job: Job, call: ToolCall) -> None:
    """The turn was cancelled while the call waited: settle it `cancelled`, so every tab
    sees that and a later answer learns it (a failure to say so is only logged)."""
    try:
        await approvals.withdraw(str(job.conversation), call.id)
    except UNREACHABLE as exc:
        log.warning("could not mark the call %s cancelled: %s", call.id, exc)


async def _settled(approvals: Approvals, job: Job, call: ToolCall, wake: asyncio.Event) -> Answered:
    conversation = str(job.conversation)
    await approvals.open(
        conversation,
        call.id,
        job.user,
        scrub(call.name),
        scrub(call.arguments),
        str(job.message_id),
    )
    approval = await approvals.wait(conversation, call.id, wake)
    if approval is None:
        return None, error(call.id, call.name, LOST)
    refusal = model_result(approval)
    return outcome(approval), None if refusal is None else error(call.id, call.name, refusal)
