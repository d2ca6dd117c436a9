"""`parley load`'s plan from its command line: several `--url`s spread the sockets (and the
SSE streams)."""

from __future__ import annotations

import asyncio

from server.app.config import Settings
from server.load import _parser, plan_from
from server.load.ssetab import SseTab
from server.load.workload import Driver, Plan

URLS = ["ws://10.0.0.2:8000/ws", "ws://10.0.0.3:8000/ws", "ws://10.0.0.4:8000/ws"]


def plan_for(*args: str) -> Plan:
    return plan_from(_parser().parse_args(["chat", "--secret", "s" * 32, *args]), Settings())


def test_one_url_by_default() -> None:
    plan = plan_for()
    assert plan.urls == ("ws://127.0.0.1:8000/ws",)


def test_each_conversations_tabs_go_to_different_urls_round_robin() -> None:
    plan = plan_for(*(a for url in URLS for a in ("--url", url)), "-c", "4", "-t", "3")
    driver = Driver(plan, list(range(4)), asyncio.Event())
    used = [[(driver.endpoint(conv, t).host) for t in range(3)] for conv in driver.convs]
    hosts = [url.split("//")[1].split(":")[0] for url in URLS]
    assert all(sorted(row) == sorted(hosts) for row in used), used
    counts = [sum(row.count(h) for row in used) for h in hosts]
    assert counts == [4, 4, 4]


def test_two_tabs_over_three_urls_still_spread_the_sockets_evenly() -> None:
    plan = plan_for(*(a for url in URLS for a in ("--url", url)), "-c", "3", "-t", "2")
    driver = Driver(plan, list(range(3)), asyncio.Event())
    used = [driver.endpoint(conv, t).host for conv in driver.convs for t in range(2)]
    assert sorted(used.count(h) for h in set(used)) == [2, 2, 2]
    assert all(used[2 * i] != used[2 * i + 1] for i in range(3))


def test_sse_tabs_of_a_conversation_use_different_web_processes() -> None:
    urls = (a for url in URLS for a in ("--url", url))
    plan = plan_for("--transport", "sse", *urls, "-c", "4", "-t", "3")
    driver = Driver(plan, list(range(4)), asyncio.Event())
    used = [
        [t.http.base_url.host for t in conv.tabs if isinstance(t, SseTab)] for conv in driver.convs
    ]
    hosts = [url.split("//")[1].split(":")[0] for url in URLS]
    assert all(sorted(row) == sorted(hosts) for row in used), used
