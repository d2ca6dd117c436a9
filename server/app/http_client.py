"""What Parley's own outgoing HTTP calls share (identity providers' key sets, the host
application's hooks): reading a reply without letting the other side decide how much memory
it takes."""

from __future__ import annotations

import httpx


class BodyTooLarge(ValueError):
    """A reply's body went past the limit its reader set."""


async def read_capped(response: httpx.Response, limit: int) -> bytes:
    """The response's body, or BodyTooLarge as soon as more than `limit` bytes arrived."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
