"""A real MCP server for the tools tests, built on the `mcp` SDK's server side (MCPServer, the
former FastMCP), run as its own process:

    python -m tests.helpers.mcp_server http PORT     # streamable HTTP on 127.0.0.1:PORT/mcp
    python -m tests.helpers.mcp_server stdio

Tools: `echo`, `add`, `whoami` (the `x-user` header it was called with), `hang` (sleeps),
`big` (a text of N bytes), `die` (the process exits mid-call) and `grow` (adds the tool
`extra` and says the list changed).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

from mcp.server.mcpserver import Context, MCPServer

server: MCPServer = MCPServer("parley-tests")


@server.tool()
def echo(text: str) -> str:
    """Return the text as it came."""
    return text


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def whoami(ctx: Context) -> str:
    """The x-user header of the request (empty over stdio)."""
    headers = ctx.headers or {}
    return headers.get("x-user", "")


@server.tool()
async def hang(seconds: float) -> str:
    """Sleep, then answer."""
    await asyncio.sleep(seconds)
    return "woke"


@server.tool()
def big(size: int) -> str:
    """A text of `size` bytes."""
    return "x" * size


@server.tool()
def die() -> str:
    """End the server's process in the middle of the call."""
    os._exit(3)


def extra() -> str:
    """A tool that exists once `grow` was called."""
    return "extra"


@server.tool()
async def grow(ctx: Context) -> str:
    """Add the tool `extra` and tell the client the list changed."""
    server.add_tool(extra)
    with contextlib.suppress(Exception):
        await ctx.session.send_tool_list_changed()
    with contextlib.suppress(Exception):
        await ctx.notify_tools_changed()
    return "grown"


def main() -> None:
    if sys.argv[1] == "http":
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run("stdio")


if __name__ == "__main__":
    main()
