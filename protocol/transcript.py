"""Folding conversation events into messages, the way a client shows them.

Used by the worker (to build the finished assistant message), the tests and the load kit
(to compare what every tab ended with), and mirrored by the browser UI.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime

from protocol import frames as f


@dataclass(slots=True)
class Draft:
    """An assistant message still being generated."""

    id: uuid.UUID
    model: str
    created_at: datetime
    pieces: list[str] = field(default_factory=list)

    def finish(self, done: f.Done) -> f.Message:
        return f.Message(
            id=self.id,
            role="assistant",
            content="".join(self.pieces),
            status=status_of(done.reason),
            created_at=self.created_at,
            model=self.model,
            usage=done.usage,
        )


def status_of(reason: f.DoneReason) -> f.MessageStatus:
    if reason == "cancelled":
        return "cancelled"
    if reason == "error":
        return "error"
    return "complete"


class Transcript:
    """The messages of one conversation as the events so far describe them."""

    def __init__(self, history: list[f.Message] | None = None) -> None:
        self.messages: dict[uuid.UUID, f.Message] = {m.id: m for m in history or ()}
        self.drafts: dict[uuid.UUID, Draft] = {}
        self.last_seq = 0

    def apply(self, event: f.ServerFrame) -> None:
        if isinstance(event, f.MessageEvent):
            self.messages[event.message.id] = event.message
        elif isinstance(event, f.Start):
            if event.replaces is not None:
                self.messages.pop(event.replaces, None)
            self.messages.pop(event.message_id, None)
            self.drafts[event.message_id] = Draft(event.message_id, event.model, f.utcnow())
            self.messages[event.message_id] = self._draft_message(event.message_id)
        elif isinstance(event, f.Token):
            draft = self.drafts.get(event.message_id)
            if draft is not None:
                draft.pieces.append(event.text)
        elif isinstance(event, f.Done):
            draft = self.drafts.pop(event.message_id, None)
            if draft is not None:
                self.messages[event.message_id] = draft.finish(event)
        seq = getattr(event, "seq", 0)
        if seq:
            self.last_seq = seq

    def _draft_message(self, message_id: uuid.UUID) -> f.Message:
        draft = self.drafts[message_id]
        return f.Message(
            id=draft.id,
            role="assistant",
            content="",
            status="complete",
            created_at=draft.created_at,
            model=draft.model,
        )

    def contents(self) -> list[tuple[str, str, str]]:
        """(role, text, status) per message, drafts included with their text so far."""
        out: list[tuple[str, str, str]] = []
        for message in self.messages.values():
            draft = self.drafts.get(message.id)
            text = "".join(draft.pieces) if draft else message.content
            out.append((message.role, text, "streaming" if draft else message.status))
        return out
