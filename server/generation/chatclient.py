"""The `openai` client the worker reaches the model through, building less per request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import httpx2
import openai
from openai._models import FinalRequestOptions

UNSENT_KEY: Final = "parley-unsent"
"""The idempotency key of a request whose client sends none (the client makes a uuid4 per
request for one otherwise: with the headers' encoding below, ≈ 11–18 µs a call,
docs/benchmarks.md)."""

MADE_KEPT: Final = 8
"""Requests kept built at most (one per try and key, as a rule: two)."""


@dataclass(frozen=True, slots=True)
class _Made:
    """What the `openai` client built for a request, all but its body."""

    method: str
    url: httpx2.URL
    headers: httpx2.Headers
    extensions: dict[str, Any]


class ChatClient(openai.AsyncOpenAI):
    """The `openai` client, building a request with a body given as bytes (the streamed chat
    completion of `LLM._request`) from the one it built first for the same options, try and
    key: only the body differs from one model call to the next, and building the rest again
    (its URL parsed and merged twice, its headers merged and normalised twice) cost ≈ 0.7 ms
    per call, the worker's largest cost per turn (docs/benchmarks.md); the request is made
    around the body as httpx2 makes one, without encoding it again. Base URL, key,
    headers, timeouts, retries and errors stay the client's own."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._made: dict[tuple[object, ...], _Made] = {}
        self._options: dict[str, tuple[openai.RequestOptions, FinalRequestOptions]] = {}

    @property
    def user_agent(self) -> str:
        """The `openai` client's own (it names the client's class)."""
        return f"{openai.AsyncOpenAI.__name__}/Python {self._version}"

    def _idempotency_key(self) -> str:
        """A key only an idempotency header would send: without one, not a new uuid4."""
        if self._idempotency_header is None:
            return UNSENT_KEY
        return super()._idempotency_key()

    def _build_request(
        self, options: FinalRequestOptions, *, retries_taken: int = 0
    ) -> httpx2.Request:
        content = options.content
        if (
            not isinstance(content, bytes)
            or options.json_data is not None
            or options.extra_json is not None
            or options.files is not None
            or options.params
            or not isinstance(options.timeout, openai.NotGiven)
            or self._idempotency_header is not None
        ):
            return super()._build_request(options, retries_taken=retries_taken)
        given = options.headers if isinstance(options.headers, dict) else {}
        key = (
            retries_taken,
            options.method,
            options.url,
            *given.items(),
            *self._auth_headers(options.security).items(),
        )
        if len(self._made) >= MADE_KEPT:
            self._made.clear()  # (a key that keeps changing, such as a refreshed one, is no leak)
        like = self._made.get(key)
        if like is None:
            request = super()._build_request(options, retries_taken=retries_taken)
            self._made[key] = _Made(
                request.method,
                request.url,
                httpx2.Headers(
                    [h for h in request.headers.raw if h[0].lower() != b"content-length"]
                ),
                request.extensions,
            )
            return request
        request = httpx2.Request(
            like.method,
            like.url,
            headers=like.headers,
            stream=httpx2.ByteStream(content),
            extensions=like.extensions,
        )
        # the headers' encoding is the first request's (a copy's is worked out again at its
        # first read, every header decoded; the client and the transport read them each call)
        request.headers.encoding = like.headers.encoding
        request.headers["Content-Length"] = str(len(content))  # as httpx2 sets it for `content`
        request.read()
        return request

    async def post_bytes(
        self, path: str, content: bytes, options: openai.RequestOptions
    ) -> httpx2.Response:
        """`post(path, cast_to=httpx2.Response, content=content, options=options)`, its
        request options copied from those made for the last call with these `options`
        rather than made again (pydantic's `construct`, ≈ 45 µs a call)."""
        made = self._options.get(path)
        if made is None or made[0] is not options:
            final = FinalRequestOptions.construct(
                method="post", url=path, json_data=None, content=None, files=None, **options
            )
            made = self._options[path] = (options, final)
        final = made[1].model_copy(update={"content": content})
        return await self.request(httpx2.Response, final)
