"""What Parley's own outgoing HTTP calls share (identity providers' key sets, the host
application's hooks): reading a reply without letting the other side decide how much memory
it takes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx


class BodyTooLarge(ValueError):
    """A reply's body went past the limit its reader set."""


class BadStatus(Exception):
    """A reply whose status the caller does not accept (its body is not read)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def _success(status: int) -> bool:
    return 200 <= status < 300


async def fetch_capped(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    limit: int,
    deadline: float,
    accept: Callable[[int], bool] = _success,
    **request: Any,
) -> tuple[httpx.Headers, bytes]:
    """A request's headers and body (at most `limit` bytes, else BodyTooLarge), the whole
    answer within `deadline` seconds, from connecting to the body's last byte (else
    TimeoutError): httpx's own timeout is per read, so a trickle of bytes would never trip
    it. A status `accept` refuses is BadStatus."""
    async with (
        asyncio.timeout(deadline),
        client.stream(method, url, **request) as response,
    ):
        if not accept(response.status_code):
            raise BadStatus(response.status_code)
        return response.headers, await read_capped(response, limit)


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
