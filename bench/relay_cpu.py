"""The worker's CPU per relayed chunk of text, without the network: 20,000 chunks' JSON (or, in
trees before the stream was read raw, the `openai` client's chunk objects) are read
(`server.generation.llm.read_chunk`), made into a piece and its event, and encoded, as
`LLM.stream` and the worker's pump do for each chunk.

    .venv/bin/python -m bench.relay_cpu

Run the same file from an export of a tree before message parts (`git archive <commit> |
tar -x -C DIR`, then `cd DIR && PYTHONPATH=DIR python <this file>`) to compare: it takes the
older path (a `token` per piece, no parts) when `server.generation.llm` has no `Stalled`.
Prints the best of 7 runs, in CPU microseconds per chunk.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from openai.types.chat import ChatCompletionChunk

import server.generation.llm as llm
from protocol import frames as f
from protocol.text import scrub
from server.redis.eventlog import encode

PARTS = hasattr(llm, "Stalled")
RAW = hasattr(llm, "MAX_EVENT_BYTES")  # chunks read from their bytes
WIRE = [
    {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": f" word{i}"}, "finish_reason": None}],
    }
    for i in range(20_000)
]
CHUNKS: list[Any] = (
    [json.dumps(chunk).encode() for chunk in WIRE]
    if RAW
    else [ChatCompletionChunk.model_validate(chunk) for chunk in WIRE]
)
CONVERSATION, MESSAGE = uuid.uuid4(), uuid.uuid4()


def tokens_only() -> None:
    pieces = []
    for raw in CHUNKS:
        for choice in llm.read_chunk(raw).choices or ():
            if choice.delta is not None and choice.delta.content:
                piece = llm.Piece(scrub(choice.delta.content))  # as the older worker's pump:
                time.monotonic()  # a piece, its arrival time, kept and published as a token
                pieces.append(piece.text)
                encode(f.Token(conversation=CONVERSATION, message_id=MESSAGE, text=piece.text))


def with_parts() -> None:
    from protocol.parts import PartsBuilder  # here: older trees have no protocol.parts

    parts = PartsBuilder(CONVERSATION, MESSAGE)
    for raw in CHUNKS:
        for choice in llm.read_chunk(raw).choices or ():
            delta: Any = choice.delta
            if delta is None or not delta.content or getattr(delta, "model_extra", None):
                continue
            piece = llm.Piece(scrub(delta.content))
            now = time.monotonic()
            if piece.kind != parts.kind:
                for event in parts.switch(piece.kind, now):
                    encode(event)
            encode(parts.add(piece.text))


def best_of(run: Callable[[], None], times: int = 7) -> float:
    best = float("inf")
    for _ in range(times):
        began = time.process_time()
        run()
        best = min(best, time.process_time() - began)
    return best


def main() -> None:
    run = with_parts if PARTS else tokens_only
    per_chunk = best_of(run) / len(CHUNKS) * 1e6
    print(f"{'parts' if PARTS else 'tokens only'}: {per_chunk:.2f} µs CPU per chunk (best of 7)")


if __name__ == "__main__":
    main()
