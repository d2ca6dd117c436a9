"""One model step's tool calls, run in parallel, each bounded in time and size.

Every call ends in a `Result` the model can read — never an exception out of the runner:
a call the model garbled or that names no known tool, arguments that are not JSON or miss
the schema, a tool that fails, hangs past its timeout, answers more than
`tools.max_result_bytes` or not JSON — each is an error result saying so. A result's text is
made storable (`protocol.text.scrub`): it goes into the transcript. `Batch.cancel`
abandons the calls still running (a cancelled turn): they come back `cancelled`.
Approval is not the runner's business: the caller runs only the calls that may run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from protocol.text import scrub
from protocol.toolcalls import ToolCall
from server.tools import validation
from server.tools.definitions import CallContext, Result, Tool, ToolError, error
from server.tools.toolbox import Toolbox

log = logging.getLogger("parley.tools")

CANCELLED = "the call was cancelled: the turn was stopped"


class Runner:
    def __init__(self, toolbox: Toolbox, max_result_bytes: int, max_parallel: int) -> None:
        self.toolbox = toolbox
        self.max_result_bytes = max_result_bytes
        self.max_parallel = max_parallel

    def start(self, calls: list[ToolCall], context: CallContext) -> Batch:
        """Start every call now (at most `max_parallel` at once); their results via the Batch."""
        gate = asyncio.Semaphore(self.max_parallel)
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(self._gated(gate, call, context)) for call in calls]
        return Batch(calls, tasks)

    async def run(self, calls: list[ToolCall], context: CallContext) -> list[Result]:
        return await self.start(calls, context).results()

    async def _gated(self, gate: asyncio.Semaphore, call: ToolCall, ctx: CallContext) -> Result:
        async with gate:
            started = time.monotonic()
            result = await self._one(call, ctx)
            return Result(
                result.call_id, result.tool, result.status, result.content,
                time.monotonic() - started,
            )  # fmt: skip

    def prepare(self, call: ToolCall) -> tuple[Tool, dict[str, Any]] | Result:
        """The call's tool and its arguments checked against the tool's schema, or the error
        result of a call that cannot run as the model wrote it (it is not run, nor put to
        a person for approval)."""
        if call.problem is not None:
            return error(call.id, call.name, f"the call could not be read: {call.problem}")
        tool = self.toolbox.lookup(call.name)
        if tool is None:
            known = ", ".join(t.name for t in self.toolbox.definitions()) or "none"
            return error(call.id, call.name, f"there is no tool {call.name!r} (tools: {known})")
        try:
            arguments = validation.parse(call.arguments)
            validation.validate(self.toolbox.checker(tool), arguments)
        except ToolError as exc:
            return error(call.id, tool.name, str(exc), exc.status)
        return tool, arguments

    async def _one(self, call: ToolCall, context: CallContext) -> Result:
        prepared = self.prepare(call)
        if isinstance(prepared, Result):
            return prepared
        tool, arguments = prepared
        try:
            async with asyncio.timeout(tool.timeout):
                content = await self.toolbox.invoke(tool, call.id, arguments, context)
        except ToolError as exc:
            return error(call.id, tool.name, str(exc), exc.status)
        except TimeoutError:
            return error(call.id, tool.name, f"the tool did not answer within {tool.timeout:g} s",
                         "timeout")  # fmt: skip
        except Exception as exc:  # a tool must not end the turn, whatever it does
            log.warning("tool %s failed unexpectedly: %s: %s", tool.name, type(exc).__name__, exc)
            return error(call.id, tool.name, f"the tool failed: {type(exc).__name__}")
        if len(content.encode()) > self.max_result_bytes:
            return error(
                call.id,
                tool.name,
                f"the tool's result is larger than {self.max_result_bytes} bytes",
            )
        return Result(call.id, tool.name, "ok", scrub(content))


@dataclass
class Batch:
    """The running calls of one step."""

    calls: list[ToolCall]
    tasks: list[asyncio.Task[Result]]
    _cancelled: bool = field(default=False)

    async def results(self) -> list[Result]:
        """Every call's result, in the calls' order, once all are done."""
        await asyncio.wait(self.tasks)
        return self._collect()

    async def cancel(self) -> list[Result]:
        """Abandon the calls still running; finished ones keep their result."""
        for task in self.tasks:
            task.cancel()
        await asyncio.wait(self.tasks)
        return self._collect()

    def _collect(self) -> list[Result]:
        return [self._result(call, task) for call, task in zip(self.calls, self.tasks, strict=True)]

    @staticmethod
    def _result(call: ToolCall, task: asyncio.Task[Result]) -> Result:
        if task.cancelled():
            return error(call.id, call.name, CANCELLED, "cancelled")
        return task.result()
