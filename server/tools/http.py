"""The application's own tools: a signed POST per call (docs/tools.md).

Calls go through the hooks' client (`server.app.hooks.Hooks`: one httpx client, no redirects,
Standard Webhooks signatures, a bounded reply), with the tools' secret. The body names the
tool, the call and who it is for; a 2xx reply's body, which must be JSON, is the result the
model reads. Anything else is a `ToolError` saying what went wrong.
"""

from __future__ import annotations

from typing import Any

import msgspec

from protocol.jsondepth import too_deep
from server.app.config import HooksSettings, HttpToolSettings
from server.app.hooks import HookFailed, Hooks
from server.app.http_client import BodyTooLarge
from server.tools.definitions import CallContext, Tool, ToolError


def definition(settings: HttpToolSettings, default_timeout: float) -> Tool:
    return Tool(
        name=settings.name,
        description=settings.description,
        parameters=settings.parameters,
        approval=settings.approval,
        timeout=settings.timeout if settings.timeout is not None else default_timeout,
        source="http",
        remote_name=settings.name,
    )


class HttpTools:
    """Calls the configured HTTP tools; one client for all of them."""

    def __init__(self, tools: list[HttpToolSettings], secret: str, max_result_bytes: int):
        self.urls = {tool.name: tool.url for tool in tools}
        self.max_result_bytes = max_result_bytes
        self._poster = Hooks(HooksSettings(secret=secret))

    async def call(
        self, tool: Tool, call_id: str, arguments: dict[str, Any], context: CallContext
    ) -> str:
        """The tool's JSON reply as text, or ToolError. The caller bounds the time."""
        payload = {
            "type": "tool_call",
            "tool": tool.name,
            "call_id": call_id,
            "arguments": arguments,
            "user": context.user,
            "conversation": context.conversation,
            "message_id": context.message_id,
        }
        url = self.urls[tool.name]
        try:
            body = await self._poster.post(
                url, payload, call_id, tool.timeout + 1.0, limit=self.max_result_bytes
            )
        except HookFailed as exc:
            if isinstance(exc.__cause__, BodyTooLarge):
                raise ToolError(
                    f"the tool's result is larger than {self.max_result_bytes} bytes"
                ) from None
            raise ToolError(f"the tool failed: {exc}") from None
        return json_result(body)

    async def close(self) -> None:
        await self._poster.close()


def json_result(body: bytes) -> str:
    """The reply as the compact JSON text the model reads, or ToolError when it is not JSON."""
    if too_deep(body):
        raise ToolError("the tool's result nests too deep")
    try:
        return msgspec.json.encode(msgspec.json.decode(body)).decode()
    except (msgspec.DecodeError, UnicodeError):
        raise ToolError("the tool's result is not valid JSON") from None
