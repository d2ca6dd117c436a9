"""Reasoning written inline between `<think>` and `</think>` in a model's text.

Models served without a reasoning parser (llama.cpp, Ollama and vLLM in their default setups
for DeepSeek-R1 or Qwen3) stream their thinking as ordinary content wrapped in these tags. A
tag may arrive cut anywhere across two or more chunks (`<thi` then `nk>`), so the splitter
holds back the end of a chunk that could be the start of a tag until the next chunk says
whether it is one. Everything it is given comes out exactly once, in order, minus the tags.
"""

from __future__ import annotations

from typing import Final, Literal

OPEN: Final = "<think>"
CLOSE: Final = "</think>"

Kind = Literal["text", "reasoning"]


def _held_back(text: str, tag: str) -> int:
    """How many characters at the end of `text` could be the start of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class ThinkSplitter:
    """Splits a stream of content pieces into text and reasoning pieces."""

    __slots__ = ("_held", "inside")

    def __init__(self) -> None:
        self.inside = False
        self._held = ""

    @property
    def kind(self) -> Kind:
        return "reasoning" if self.inside else "text"

    def feed(self, piece: str) -> list[tuple[Kind, str]]:
        """The text and reasoning this piece completes, in order (empty pieces left out)."""
        rest = self._held + piece
        self._held = ""
        out: list[tuple[Kind, str]] = []
        while rest:
            tag = CLOSE if self.inside else OPEN
            at = rest.find(tag)
            if at < 0:
                keep = _held_back(rest, tag)
                if keep:
                    rest, self._held = rest[:-keep], rest[-keep:]
                if rest:
                    out.append((self.kind, rest))
                break
            if at:
                out.append((self.kind, rest[:at]))
            self.inside = not self.inside
            rest = rest[at + len(tag) :]
        return out

    def finish(self) -> list[tuple[Kind, str]]:
        """What is still held back when the stream ends: it was not a tag after all."""
        held, self._held = self._held, ""
        return [(self.kind, held)] if held else []
