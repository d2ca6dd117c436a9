"""`parley load` against a real server: the load kit's own seq checks must find nothing lost,
nothing duplicated, and every rejoin filled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers.auth import SECRET
from tests.helpers.processes import ROOT, ParleyProcess, Scaled, counter_now


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PARLEY_", "OPENAI_"))}
    env.update(PARLEY_JWT_SECRET=SECRET, PARLEY_CONFIG=str(tmp_path / "none.toml"))
    return env


def _run(args: list[str], tmp_path: Path) -> str:
    """Run `parley load`; return what it printed."""
    proc = subprocess.run(
        args, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _assert_churned_without_loss(result: dict[str, Any]) -> None:
    integrity = result["integrity"]
    assert integrity["lost"] == 0
    assert integrity["duplicated"] == 0
    assert integrity["rejoins"] > 0, "churn 0.3/s over 4 tabs x 5 s should drop some tab"
    assert integrity["rejoins_filled"] == integrity["rejoins"]
    assert integrity["rejoins_unfilled"] == integrity["rejoins_failed"] == 0


def test_load_chat_with_churn(parley: ParleyProcess, tmp_path: Path) -> None:
    out = tmp_path / "chat.json"
    args = [
        sys.executable, "-m", "server.app.cli", "load", "chat",
        "--url", parley.ws_url,
        "--conversations", "2", "--tabs", "2",
        "--duration", "5", "--rate", "1", "--churn", "0.3",
        "--server-pid", str(parley.pid),
        "--drain", "10", "--no-progress",
        "--out", str(out),
    ]  # fmt: skip
    printed = _run(args, tmp_path)
    result = json.loads(out.read_text())

    _assert_churned_without_loss(result)
    assert result["throughput"]["tokens"] > 0
    assert result["connections"]["opened"] == 4
    assert result["latency_ms"]["ttft"]["count"] > 0
    added = result["latency_ms"]["added"]  # Parley's share: the model's own TTFT taken off
    assert 0 < added["count"] <= result["latency_ms"]["ttft"]["count"]
    assert added["p50_ms"] < result["latency_ms"]["ttft"]["p50_ms"]
    assert result["server"]["rss_kib_before"] > 0
    server_view = result["server_metrics"]  # read from the server's GET /metrics
    assert server_view["ttft_count"] > 0
    assert server_view["ttft_p99_ms"] > 0
    assert "TTFT server vs client" in printed
    assert (tmp_path / "chat-timeline.png").stat().st_size > 0
    assert (tmp_path / "chat-histogram.png").stat().st_size > 0


def test_load_chat_with_churn_over_sse_tickets(parley: ParleyProcess, tmp_path: Path) -> None:
    out = tmp_path / "sse.json"
    args = [
        sys.executable, "-m", "server.app.cli", "load", "chat",
        "--transport", "sse", "--sse-tickets",
        "--url", parley.ws_url,
        "--conversations", "2", "--tabs", "2",
        "--duration", "5", "--rate", "1", "--churn", "0.3",
        "--server-pid", str(parley.pid),
        "--drain", "10", "--no-progress", "--no-charts",
        "--out", str(out),
    ]  # fmt: skip
    printed = _run(args, tmp_path)
    result = json.loads(out.read_text())

    assert result["transport"] == "sse"
    _assert_churned_without_loss(result)
    assert result["throughput"]["tokens"] > 0
    assert result["throughput"]["frames_per_second"] > 0
    assert result["latency_ms"]["ttft"]["count"] > 0
    assert "parley load chat over SSE" in printed


def test_load_refuses_more_than_max_connections(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "server.app.cli", "load", "idle", "--sockets", "50",
         "--max-connections", "10", "--url", "ws://127.0.0.1:9/ws"],
        cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "max-connections" in proc.stderr


def test_load_publish_appends_through_the_append_script(
    parley: ParleyProcess, tmp_path: Path
) -> None:
    out = tmp_path / "publish.json"
    args = [
        sys.executable, "-m", "server.app.cli", "load", "publish",
        "--url", parley.ws_url, "--redis-url", parley.env["REDIS_URL"],
        "--conversations", "2", "--tabs", "2", "--rate", "200", "--duration", "3",
        "--server-pid", str(parley.pid), "--no-progress", "--no-charts",
        "--out", str(out),
    ]  # fmt: skip
    _run(args, tmp_path)
    result = json.loads(out.read_text())
    published = result["counters"]["published"]
    assert published > 0 and result["publish"]["errors"] == 0
    assert result["throughput"]["tokens"] == published * 2  # every frame to both tabs
    assert result["integrity"]["lost"] == result["integrity"]["duplicated"] == 0


def test_load_over_sse_spreads_each_conversations_tabs_over_the_web_processes(
    scaled: Scaled, tmp_path: Path
) -> None:
    """Two `--url`s over SSE: each conversation's two tabs follow it from different web
    processes, each process serves half the streams, and no tab misses or repeats an event."""
    joins = "parley_joins_total"
    before = [counter_now(web, joins) for web in scaled.webs]
    out = tmp_path / "sse-spread.json"
    args = [sys.executable, "-m", "server.app.cli", "load", "chat", "--transport", "sse"]
    args += [arg for web in scaled.webs for arg in ("--url", web.ws_url)]
    args += ["--conversations", "3", "--tabs", "2", "--rate", "0.5", "--duration", "3"]
    args += ["--tokens", "20", "--tps", "100", "--no-progress", "--no-charts", "--out", str(out)]
    _run(args, tmp_path)
    result = json.loads(out.read_text())
    assert result["transport"] == "sse"
    assert result["integrity"]["lost"] == result["integrity"]["duplicated"] == 0
    assert result["throughput"]["tokens"] > 0
    gained = [counter_now(web, joins) - b for web, b in zip(scaled.webs, before, strict=True)]
    assert gained == [3, 3], gained
