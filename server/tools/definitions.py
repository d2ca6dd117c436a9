"""What a tool is to the model, and what one call of it gives back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

from protocol.text import scrub
from server.app.config import Approval, ToolsSettings

Status = Literal["ok", "error", "timeout", "cancelled"]
"""`ok`: the tool answered; `error`: it failed or could not be called (the content says why,
for the model); `timeout`: it did not answer in time; `cancelled`: the turn was stopped."""

MAX_ERROR_CHARS: Final = 1_000


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    """As the model sees it (an MCP tool's after its server's `prefix`)."""
    description: str
    parameters: dict[str, Any]
    approval: Approval
    timeout: float
    source: str
    """`http` or the MCP server's configured name."""
    remote_name: str
    """As its MCP server knows it (an HTTP tool's: its name)."""

    def openai(self) -> dict[str, Any]:
        """The entry of the request's `tools` list."""
        function = {"name": self.name, "parameters": self.parameters}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class Result:
    """One call's outcome: `content` is what the model reads (JSON text when `ok`)."""

    call_id: str
    tool: str
    status: Status
    content: str
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True, slots=True)
class CallContext:
    """Who a call is made for: templated into MCP headers, sent to HTTP tools."""

    user: str
    conversation: str
    message_id: str = ""


class ToolError(Exception):
    """A call that failed in a way the model should be told about (the message says how)."""

    def __init__(self, message: str, status: Status = "error") -> None:
        super().__init__(message[:MAX_ERROR_CHARS])
        self.status: Status = status


def error(call_id: str, tool: str, message: str, status: Status = "error") -> Result:
    return Result(call_id, tool, status, scrub(message[:MAX_ERROR_CHARS]))


def known_tools(settings: ToolsSettings) -> list[str]:
    """The tool names a conversation may choose, as told to a client: each HTTP tool's, and
    `PREFIX*` for each MCP server (its tools are known only once listed, by the workers)."""
    return [t.name for t in settings.http] + [f"{s.prefix}*" for s in settings.mcp]


def unknown_tools(settings: ToolsSettings, names: list[str]) -> list[str]:
    """The names that can be no configured tool: neither an HTTP tool's nor under an MCP
    server's `prefix` (a server without one may list any name)."""
    http = {t.name for t in settings.http}
    prefixes = [s.prefix for s in settings.mcp]
    return [n for n in names if n not in http and not any(n.startswith(p) for p in prefixes)]
