"""How a generation's end reason becomes the finished message's status."""

from __future__ import annotations

from protocol import frames as f


def status_of(reason: f.DoneReason) -> f.MessageStatus:
    if reason == "cancelled":
        return "cancelled"
    if reason == "error":
        return "error"
    return "complete"
