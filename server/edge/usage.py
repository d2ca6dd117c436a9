"""Usage over HTTP: `GET /api/usage` for the signed-in user; for the host application's
backend (server API keys) any user's usage, the ledger's export (JSON or CSV) and a user's own
budget."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, Response, get, put
from litestar.exceptions import ValidationException
from litestar.params import Parameter

from protocol import frames as f
from server.edge.rest import answers, group_of, runtime_of, shallow_body, signed_in, user_of
from server.edge.server_api import UserParam, server_key
from storage import usage as ledger

MAX_SPAN = timedelta(days=400)
DEFAULT_SPAN = timedelta(days=30)
MAX_EXPORT_ROWS = 100_000

From = Annotated[datetime | None, Parameter(query="from")]
To = Annotated[datetime | None, Parameter(query="to")]
GroupBy = Annotated[ledger.GroupBy, Parameter(query="group_by")]
Group = Annotated[str, Parameter(query="group", max_length=256)]


class UsageReport(msgspec.Struct, frozen=True):
    """The ledger summed per UTC day or per model over [from, to), and the budget now."""

    user: str
    start: datetime = msgspec.field(name="from")
    end: datetime = msgspec.field(name="to")
    group_by: str
    totals: list[ledger.UsageTotal]
    budget: f.Budget | None = None


class BudgetChange(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    tokens: Annotated[int, msgspec.Meta(ge=0, le=2**53)] | None
    """The user's own budget in tokens (0: unlimited); null: the group's again."""


def _span(start: datetime | None, end: datetime | None) -> tuple[datetime, datetime]:
    """[from, to) as asked: `to` defaults to now, `from` to 30 days before `to`."""
    end = end or f.utcnow()
    if end.tzinfo is None or (start is not None and start.tzinfo is None):
        raise ValidationException("`from` and `to` need a time zone (e.g. 2026-01-01T00:00:00Z)")
    try:
        start = start or end - DEFAULT_SPAN
        start, end = start.astimezone(UTC), end.astimezone(UTC)
    except OverflowError:
        raise ValidationException("`from` and `to` must lie between the years 1 and 9999") from None
    if not start < end or end - start > MAX_SPAN:
        raise ValidationException(f"`from` must be before `to`, at most {MAX_SPAN.days} days")
    return start, end


async def _report(
    request: Request[Any, Any, Any],
    user: str,
    group: str,
    span: tuple[datetime, datetime],
    group_by: ledger.GroupBy,
) -> UsageReport:
    spending = runtime_of(request).conversations.spending
    totals = await ledger.totals(spending.pool, user, *span, group_by)
    budget = spending.budget_frame(await spending.state(user, group))
    return UsageReport(user, span[0], span[1], group_by, totals, budget)


@get("/api/usage", guards=[signed_in])
async def my_usage(
    request: Request[Any, Any, Any], start: From = None, end: To = None, group_by: GroupBy = "day"
) -> UsageReport:
    """The signed-in user's usage: the ledger summed per day or per model, and the budget."""
    span = _span(start, end)
    with answers("GET /api/usage"):
        return await _report(request, user_of(request), group_of(request), span, group_by)


class ServerUsage(Controller):
    path = "/api/server"
    guards = [server_key, shallow_body]  # noqa: RUF012 (litestar's Controller declares it)
    tags = ["server"]  # noqa: RUF012

    @get("/users/{user:str}/usage")
    async def usage(
        self,
        request: Request[Any, Any, Any],
        user: UserParam,
        start: From = None,
        end: To = None,
        group_by: GroupBy = "day",
        group: Group = "",
    ) -> UsageReport:
        """Any user's usage and budget (`group`: the user's budget group, as the token's
        `budgets.group_claim` would name it)."""
        span = _span(start, end)
        with answers("GET /api/server/users/{user}/usage"):
            return await _report(request, user, group, span, group_by)

    @put("/users/{user:str}/budget")
    async def set_budget(
        self, request: Request[Any, Any, Any], user: UserParam, data: BudgetChange
    ) -> f.Budget:
        """Set the user's own budget over their group's (null: back to the group's)."""
        spending = runtime_of(request).conversations.spending
        with answers("PUT /api/server/users/{user}/budget"):
            await spending.set_limit(user, data.tokens)
            return spending.budget_frame(await spending.state(user, ""))

    @get("/usage/export")
    async def export(
        self,
        request: Request[Any, Any, Any],
        start: From = None,
        end: To = None,
        user: Annotated[str | None, Parameter(query="user", max_length=200)] = None,
        format: Annotated[Literal["json", "csv"], Parameter(query="format")] = "json",
        limit: Annotated[int, Parameter(query="limit", ge=1, le=MAX_EXPORT_ROWS)] = 10_000,
    ) -> Response[Any]:
        """The ledger's rows finished in [from, to), oldest first, of one user or everyone:
        for billing."""
        span = _span(start, end)
        with answers("GET /api/server/usage/export"):
            pool = runtime_of(request).conversations.spending.pool
            rows = await ledger.records(pool, user, *span, limit)
        if format == "csv":
            return Response(_csv(rows), media_type="text/csv; charset=utf-8")
        return Response(msgspec.json.encode(rows), media_type="application/json")


def _csv(rows: list[ledger.UsageRecord]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(ledger.UsageRecord.__struct_fields__)
    for row in rows:
        writer.writerow([_cell(value) for value in msgspec.structs.astuple(row)])
    return out.getvalue()


def _cell(value: object) -> object:
    """A text cell a spreadsheet would run as a formula gets a leading quote."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


ROUTES = [my_usage, ServerUsage]
