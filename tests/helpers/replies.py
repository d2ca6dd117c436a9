"""A model's reply read the two ways `LLM` reads one: `stream` (an async iterator the body
is pulled through) and `relay` (pieces handed to a callback, the body pushed where the
transport allows), to the same list of items."""

from __future__ import annotations

from typing import Any, Literal

from protocol.toolcalls import Progress
from server.generation.llm import LLM, Finished, Piece

Way = Literal["stream", "relay"]
WAYS: tuple[Way, ...] = ("stream", "relay")


async def reply_of(
    llm: LLM, way: Way, text: str, tools: list[dict[str, Any]] | None = None
) -> tuple[list[Piece | Progress], Finished]:
    """The reply to one user message `text`: its pieces and progress, then how it finished."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": text}]
    items: list[Piece | Progress] = []
    if way == "relay":
        finished = await llm.relay("m", messages, tools, lambda item: items.append(item))
        return items, finished
    async for item in llm.stream("m", messages, tools):
        if isinstance(item, Finished):
            return items, item
        items.append(item)
    raise AssertionError("no Finished")
