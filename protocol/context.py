"""What the model sees: the system prompt and as many of the latest turns as the budget allows.

A reply that called tools goes back to the model as it happened: per step, an assistant
message with its text and `tool_calls`, then one `tool` message per call with the result,
then the final answer. Reasoning never goes back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from protocol.frames import Message, Part
from protocol.toolcalls import ToolCall, assistant_message, tool_message

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD = 4

ModelMessage = dict[str, Any]
"""One message of a chat completion request (OpenAI's shape)."""


def estimate_tokens(text: str) -> int:
    """A cheap, model-agnostic estimate; the budget is a guard, not an exact count."""
    return len(text) // CHARS_PER_TOKEN + MESSAGE_OVERHEAD


def reply_messages(parts: Sequence[Part]) -> list[ModelMessage]:
    """An assistant reply's parts as the model messages of its steps. A call without a
    recorded result (none should be) gets one saying so: the model requires an answer to
    every call it made."""
    messages: list[ModelMessage] = []
    texts: list[str] = []
    calls: list[ToolCall] = []
    results: dict[str, str] = {}

    def flush() -> None:
        if calls:
            messages.append(assistant_message("".join(texts), calls))
            missing = "the call has no result"
            messages.extend(tool_message(c.id, results.get(c.id, missing)) for c in calls)
        elif texts:
            messages.append({"role": "assistant", "content": "".join(texts)})
        texts.clear()
        calls.clear()
        results.clear()

    for part in parts:
        if part.kind == "reasoning":
            continue
        if results and part.kind != "tool_result":
            flush()  # the step's results are in: what follows is the next step
        if part.kind == "text":
            texts.append(part.text)
        elif part.kind == "tool_call":
            calls.append(ToolCall(len(calls), part.call_id or "", part.name or "", part.text))
        else:
            results[part.call_id or ""] = part.text
    flush()
    return messages


def _messages_of(message: Message) -> list[ModelMessage]:
    if message.parts is not None and any(p.kind == "tool_call" for p in message.parts):
        return reply_messages(message.parts)
    if not message.content:
        return []
    return [{"role": message.role, "content": message.content}]


def _cost(messages: list[ModelMessage]) -> int:
    return sum(estimate_tokens(_text_of(m)) for m in messages)


def _text_of(message: ModelMessage) -> str:
    calls = message.get("tool_calls") or ()
    return (message.get("content") or "") + "".join(
        c["function"]["name"] + c["function"]["arguments"] for c in calls
    )


def build_prompt(system: str, history: Sequence[Message], budget: int) -> list[ModelMessage]:
    """Newest turns kept first; the last message is always sent, cut to fit if it must be.
    A reply's steps are kept or left out together (a tool result without its call, or a call
    without its result, is not a valid request)."""
    budget -= estimate_tokens(system) if system else 0
    kept: list[ModelMessage] = []
    for message in reversed(history):
        messages = _messages_of(message)
        if not messages:
            continue
        cost = _cost(messages)
        if kept and cost > budget:
            break
        if not kept and cost > budget and len(messages) == 1:
            content = messages[0]["content"]
            messages = [{**messages[0], "content": content[-max(budget, 1) * CHARS_PER_TOKEN :]}]
        kept[:0] = messages
        budget -= cost
    return ([{"role": "system", "content": system}] if system else []) + kept
