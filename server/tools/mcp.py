"""MCP servers' tools, through the official `mcp` SDK as a client (docs/tools.md).

Each configured server is an `McpServer`: its tools are listed when Parley starts (through a
session whose header templates render with an empty user), listed again when the server says
`notifications/tools/list_changed`, and after its session broke (the server restarted or
died): the next use opens a new session and lists again. Calls go through a session per
rendered header set — with `{user}` in a header, one per user — kept in a small LRU.

A session is held open by a task of its own (`_Session`): the SDK's transports are context
managers that must be entered and left by one task. A session whose server dies mid-call
ends that call at once with a `ToolError` ("the MCP server ... closed the connection"), not
at its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import string
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import Any, Final

import httpx2
import mcp_types
import msgspec
from mcp.client.session import ClientSession, IncomingMessage
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from server.app.config import McpServerSettings
from server.tools.definitions import CallContext, Tool, ToolError
from server.tools.validation import BadSchema, checker

log = logging.getLogger("parley.tools.mcp")

MAX_SESSIONS: Final = 32
"""Sessions per server (one per rendered header set); the least recently used is closed."""
CONNECT_TIMEOUT: Final = 10.0
RELIST_AFTER: Final = 5.0
"""Seconds between attempts to reach a server whose tools could not be listed."""
_LISTING: Final = CallContext(user="", conversation="")


def render(templates: dict[str, str], context: CallContext) -> dict[str, str]:
    """Headers with `{user}` and `{conversation}` filled in (other braces are kept)."""
    values = {"user": context.user, "conversation": context.conversation}
    return {name: _fill(value, values) for name, value in templates.items()}


def _fill(template: str, values: dict[str, str]) -> str:
    parts = []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(literal)
        if field is not None:
            parts.append(values.get(field, "{" + field + "}"))
    return "".join(parts)


def _safe_render(templates: dict[str, str], context: CallContext) -> dict[str, str]:
    try:
        return render(templates, context)
    except ValueError:  # an unbalanced brace: sent as written
        return dict(templates)


class McpServer:
    """One configured MCP server: its tools and the sessions that call them."""

    def __init__(
        self, settings: McpServerSettings, default_timeout: float, max_result_bytes: int
    ) -> None:
        self.settings = settings
        self.default_timeout = default_timeout
        self.max_event_bytes = 4 * max_result_bytes + 65_536
        """What one message of the server may hold (a result's text and its structured copy,
        escaped, in a JSON-RPC envelope): the SDK refuses a larger one as it arrives."""
        self.tools: dict[str, Tool] = {}
        self._sessions: OrderedDict[tuple[tuple[str, str], ...], _Session] = OrderedDict()
        self._listing: asyncio.Task[None] | None = None
        self._listed_at = float("-inf")
        self._stale = True

    @property
    def name(self) -> str:
        return self.settings.name

    async def start(self) -> None:
        """List the tools once; a server that cannot be reached is logged and tried later."""
        await self.refresh()

    async def refresh(self) -> None:
        """List the tools again if they may have changed (or could not be listed yet)."""
        loop = asyncio.get_running_loop()
        if not self._stale or loop.time() - self._listed_at < RELIST_AFTER:
            return
        if self._listing is None or self._listing.done():
            self._listing = asyncio.create_task(self._list())
        await asyncio.shield(self._listing)

    async def call(self, tool: Tool, arguments: dict[str, Any], context: CallContext) -> str:
        """The tool's result as text for the model, or ToolError. The caller bounds the time."""
        session = await self._session(context)
        try:
            result = await session.call(tool.remote_name, arguments, tool.timeout + 1.0)
        except ToolError as exc:
            if exc.status != "timeout":  # the session may be gone (a restarted server)
                self._forget(session)
            raise
        return _result_text(result)

    def _forget(self, session: _Session) -> None:
        """Open a new session next time, and list the tools again through it."""
        for key, held in list(self._sessions.items()):
            if held is session:
                del self._sessions[key]
        asyncio.get_running_loop().create_task(session.close())
        self._stale = True
        self._listed_at = float("-inf")

    async def close(self) -> None:
        sessions = list(self._sessions.values())
        self._sessions.clear()
        for session in sessions:
            await session.close()
        if self._listing is not None:
            self._listing.cancel()

    async def _list(self) -> None:
        self._listed_at = asyncio.get_running_loop().time()
        try:
            session = await self._session(_LISTING)
            listed = await session.list_tools()
        except ToolError as exc:
            log.warning("MCP server %s: cannot list its tools (%s)", self.name, exc)
            return
        self.tools = self._tools_of(listed)
        self._stale = False
        log.info("MCP server %s: %d tools", self.name, len(self.tools))

    def _tools_of(self, listed: list[mcp_types.Tool]) -> dict[str, Tool]:
        tools: dict[str, Tool] = {}
        for entry in listed:
            try:
                checker(entry.input_schema)
            except BadSchema as exc:
                log.warning("MCP server %s: tool %s skipped: %s", self.name, entry.name, exc)
                continue
            tool = self._tool(entry)
            tools[tool.name] = tool
        return tools

    def _tool(self, entry: mcp_types.Tool) -> Tool:
        settings = self.settings
        return Tool(
            name=settings.prefix + entry.name,
            description=entry.description or "",
            parameters=entry.input_schema,
            approval=settings.approvals.get(entry.name, settings.approval),
            timeout=settings.timeout if settings.timeout is not None else self.default_timeout,
            source=self.name,
            remote_name=entry.name,
        )

    async def _session(self, context: CallContext) -> _Session:
        headers = _safe_render(self.settings.headers, context) if self.settings.url else {}
        key = tuple(sorted(headers.items()))
        session = self._sessions.get(key)
        if session is not None and session.alive:
            self._sessions.move_to_end(key)
            return session
        if session is not None:
            del self._sessions[key]
        session = _Session(self.settings, headers, self._changed, self.max_event_bytes)
        await session.open()
        self._sessions[key] = session
        while len(self._sessions) > MAX_SESSIONS:
            _, oldest = self._sessions.popitem(last=False)
            asyncio.get_running_loop().create_task(oldest.close())
        return session

    def _changed(self) -> None:
        """The server said its tools changed: list them again (now, in the background)."""
        self._stale = True
        self._listed_at = float("-inf")
        if self._listing is None or self._listing.done():
            self._listing = asyncio.get_running_loop().create_task(self._list())


class _Session:
    """One MCP session, opened and closed by a task of its own."""

    def __init__(
        self,
        settings: McpServerSettings,
        headers: dict[str, str],
        changed: Callable[[], None],
        max_event_bytes: int,
    ) -> None:
        self.settings = settings
        self.headers = headers
        self.max_event_bytes = max_event_bytes
        self._changed = changed
        self._client: ClientSession | None = None
        self._ready = asyncio.Event()
        self._closing = asyncio.Event()
        self._dead = asyncio.Event()
        self._failure: BaseException | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self._client is not None and not self._dead.is_set()

    async def open(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._hold())
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await self._ready.wait()
        except TimeoutError:
            await self.close()
            raise ToolError(f"the MCP server {self.settings.name} did not answer in time") from None
        if not self.alive:
            raise ToolError(f"the MCP server {self.settings.name} is unreachable: {self._why()}")

    async def list_tools(self) -> list[mcp_types.Tool]:
        tools: list[mcp_types.Tool] = []
        cursor: str | None = None
        for _ in range(100):  # pages; a server that never ends its list cannot hang us
            params = mcp_types.PaginatedRequestParams(cursor=cursor) if cursor else None
            page = await self._request(self._live().list_tools(params=params), CONNECT_TIMEOUT)
            tools += page.tools
            cursor = page.next_cursor
            if not cursor:
                break
        return tools

    async def call(
        self, name: str, arguments: dict[str, Any], timeout: float
    ) -> mcp_types.CallToolResult:
        result = await self._request(
            self._live().call_tool(name, arguments, read_timeout_seconds=timeout), timeout
        )
        if not isinstance(result, mcp_types.CallToolResult):
            raise ToolError(f"the MCP server {self.settings.name} answered something else")
        return result

    async def close(self) -> None:
        self._closing.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(self._task), 5.0)
            if not self._task.done():
                self._task.cancel()

    def _live(self) -> ClientSession:
        if self._client is None or self._dead.is_set():
            raise ToolError(f"the MCP server {self.settings.name} closed the connection")
        return self._client

    async def _request(self, request: Any, timeout: float) -> Any:
        """The request's answer; ToolError if it fails, or the session dies before it."""
        answer = asyncio.ensure_future(request)
        dead = asyncio.ensure_future(self._dead.wait())
        try:
            await asyncio.wait({answer, dead}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the call was cancelled or timed out: so is the request
            answer.cancel()
            raise
        finally:
            dead.cancel()
        if not answer.done():
            answer.cancel()
            name = self.settings.name
            raise ToolError(f"the MCP server {name} closed the connection during the call")
        try:
            return answer.result()
        except MCPError as exc:
            raise ToolError(f"the MCP server {self.settings.name} failed the call: {exc}") from None
        except TimeoutError as exc:
            raise ToolError(f"the MCP server did not answer in time: {exc}", "timeout") from None
        except Exception as exc:
            raise ToolError(f"the MCP call failed: {type(exc).__name__}: {exc}") from None

    async def _hold(self) -> None:
        try:
            async with AsyncExitStack() as stack:
                read, write = await stack.enter_async_context(self._transport())
                client = ClientSession(read, write, message_handler=self._on_message)
                await stack.enter_async_context(client)
                await client.initialize()
                self._client = client
                self._ready.set()
                await self._closing.wait()
        except Exception as exc:  # the server went away, or never came: the session is over
            self._failure = exc
            if self._client is not None:
                log.warning("MCP server %s: session ended: %s", self.settings.name, self._why())
        finally:
            self._dead.set()
            self._ready.set()

    def _transport(self) -> AbstractAsyncContextManager[Any]:
        if self.settings.url:
            return _http(self.settings.url, self.headers, self.max_event_bytes)
        command, *args = self.settings.command
        env = dict(self.settings.env) or None
        return stdio_client(StdioServerParameters(command=command, args=args, env=env))

    async def _on_message(self, message: IncomingMessage) -> None:
        if isinstance(message, Exception):
            log.debug("MCP server %s: transport: %s", self.settings.name, message)
            return
        if isinstance(message, mcp_types.ToolListChangedNotification):
            self._changed()

    def _why(self) -> str:
        failure = self._failure
        while isinstance(failure, BaseExceptionGroup) and failure.exceptions:
            failure = failure.exceptions[0]
        return f"{type(failure).__name__}: {failure}" if failure else "no session"


@contextlib.asynccontextmanager
async def _http(url: str, headers: dict[str, str], max_event_bytes: int) -> AsyncIterator[Any]:
    timeout = httpx2.Timeout(CONNECT_TIMEOUT, read=300.0)
    async with (
        httpx2.AsyncClient(headers=headers, timeout=timeout, trust_env=False) as client,
        streamable_http_client(
            url, http_client=client, max_sse_event_size=max_event_bytes
        ) as streams,
    ):
        yield streams


def _result_text(result: mcp_types.CallToolResult) -> str:
    """The model's view of a result: its content blocks' text (which the spec says carries the
    structured content too), else the structured content as JSON; an MCP error result
    (`isError`) is a ToolError carrying the same text."""
    text = "\n".join(_block_text(block) for block in result.content)
    if not result.content and result.structured_content is not None:
        text = msgspec.json.encode(result.structured_content).decode()
    if result.is_error:
        raise ToolError(text or "the tool failed")
    return text


def _block_text(block: Any) -> str:
    if isinstance(block, mcp_types.TextContent):
        return block.text
    kind = getattr(block, "type", "content")
    return f"[{kind} content omitted]"
