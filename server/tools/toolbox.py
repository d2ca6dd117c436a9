"""Every configured tool under one name: the HTTP tools, then each MCP server's.

A name the model sees belongs to one tool; a later tool with a taken name is skipped and
logged (an MCP server's `prefix` keeps them apart). The toolbox checks each schema once
(a configured one that is not valid JSON Schema stops start-up; a listed one is skipped).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import jsonschema

from server.app.config import ConfigError, ToolsSettings
from server.tools import http, validation
from server.tools.definitions import CallContext, Tool

if TYPE_CHECKING:
    from server.tools.mcp import McpServer

log = logging.getLogger("parley.tools")


class Toolbox:
    def __init__(self, settings: ToolsSettings, hooks_secret: str = "") -> None:
        self.settings = settings
        self._http_tools = [http.definition(t, settings.call_timeout) for t in settings.http]
        for tool in self._http_tools:
            try:
                validation.checker(tool.parameters)
            except validation.BadSchema as exc:
                raise ConfigError(f"tools.http {tool.name}: parameters: {exc}") from None
        self._http = http.HttpTools(
            settings.http, settings.secret or hooks_secret, settings.max_result_bytes
        )
        for server in settings.mcp:
            if bool(server.url) == bool(server.command):
                raise ConfigError(f"tools.mcp {server.name}: set either url or command")
        self.servers: list[McpServer] = []
        if settings.mcp:  # the SDK (pydantic, starlette...) takes seconds to import: only then
            from server.tools.mcp import McpServer

            self.servers = [
                McpServer(s, settings.call_timeout, settings.max_result_bytes) for s in settings.mcp
            ]
        self._checkers: dict[str, tuple[dict[str, Any], jsonschema.protocols.Validator]] = {}
        """Per tool name, the schema a validator was built for (a re-listed tool's may change)."""
        self._warned: set[tuple[str, str]] = set()

    async def start(self) -> None:
        for server in self.servers:
            await server.start()

    async def refresh(self) -> None:
        """List again the tools of servers that changed or could not be reached."""
        for server in self.servers:
            await server.refresh()

    def definitions(self) -> list[Tool]:
        tools: dict[str, Tool] = {}
        for tool in [*self._http_tools, *(t for s in self.servers for t in s.tools.values())]:
            if tool.name in tools:
                self._skipped(tool)
                continue
            tools[tool.name] = tool
        return list(tools.values())

    def _skipped(self, tool: Tool) -> None:
        if (tool.source, tool.name) not in self._warned:
            self._warned.add((tool.source, tool.name))
            log.warning("tool %s of %s skipped: the name is taken", tool.name, tool.source)

    def lookup(self, name: str) -> Tool | None:
        return next((tool for tool in self.definitions() if tool.name == name), None)

    def checker(self, tool: Tool) -> jsonschema.protocols.Validator:
        cached = self._checkers.get(tool.name)
        if cached is None or cached[0] is not tool.parameters:
            cached = (tool.parameters, validation.checker(tool.parameters))
            self._checkers[tool.name] = cached
        return cached[1]

    async def invoke(
        self, tool: Tool, call_id: str, arguments: dict[str, Any], context: CallContext
    ) -> str:
        """The tool's result text, or ToolError."""
        if tool.source == "http":
            return await self._http.call(tool, call_id, arguments, context)
        server = next(s for s in self.servers if s.name == tool.source)
        return await server.call(tool, arguments, context)

    async def close(self) -> None:
        await self._http.close()
        for server in self.servers:
            await server.close()
