"""What the model sees: the system prompt and as many of the latest turns as the budget allows."""

from __future__ import annotations

from collections.abc import Sequence

from protocol.frames import Message

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD = 4


def estimate_tokens(text: str) -> int:
    """A cheap, model-agnostic estimate; the budget is a guard, not an exact count."""
    return len(text) // CHARS_PER_TOKEN + MESSAGE_OVERHEAD


def build_prompt(system: str, history: Sequence[Message], budget: int) -> list[dict[str, str]]:
    """Newest turns kept first; the last message is always sent, cut to fit if it must be."""
    budget -= estimate_tokens(system) if system else 0
    kept: list[dict[str, str]] = []
    for message in reversed(history):
        if not message.content:
            continue
        cost = estimate_tokens(message.content)
        if kept and cost > budget:
            break
        content = message.content
        if not kept and cost > budget:
            content = content[-max(budget, 1) * CHARS_PER_TOKEN :]
        kept.append({"role": message.role, "content": content})
        budget -= cost
    kept.reverse()
    return ([{"role": "system", "content": system}] if system else []) + kept
