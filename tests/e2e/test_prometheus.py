"""A real Prometheus (Debian's `prometheus` package) scraping two `parley web` processes and
a `parley worker` every second, while turns run through the websockets client; and the
shipped alert rules checked with `promtool`."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import websockets

from server.dev import embedded
from tests.helpers.auth import mint, new_user
from tests.helpers.processes import ROOT, Cluster, Db, ParleyProcess, redis_db

pytestmark = pytest.mark.prometheus

RULES = ROOT / "docs" / "prometheus" / "parley-rules.yml"
DASHBOARD = ROOT / "docs" / "grafana" / "parley.json"


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = [target["expr"] for panel in panels for target in panel["targets"]]
    return [expr.replace("$__rate_interval", "1m") for expr in exprs]


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        pytest.fail(f"`{name}` is not installed: `apt-get install prometheus` (as root; CI does)")
    return path


def scrape_config(targets: list[tuple[ParleyProcess, int, str]]) -> str:
    static = [
        {"targets": [f"127.0.0.1:{port}"], "labels": {"role": role, "process": f"{role}-{port}"}}
        for _, port, role in targets
    ]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "parley", "static_configs": static}],
    }
    return json.dumps(config)  # JSON is YAML


class Prometheus:
    def __init__(self, config: str, data: Path) -> None:
        self.port = embedded.free_port()
        (data / "prometheus.yml").write_text(config)
        self.log = data / "prometheus.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    tool("prometheus"),
                    f"--config.file={data / 'prometheus.yml'}",
                    f"--storage.tsdb.path={data / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=out,
                stderr=out,
            )

    def get(self, path: str) -> dict[str, object]:
        url = f"http://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return dict(json.loads(response.read()))

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1):
                    return
            except OSError:
                assert self.proc.poll() is None, self.log.read_text()
                time.sleep(0.2)
        raise TimeoutError(self.log.read_text())

    def query(self, promql: str) -> list[dict[str, object]]:
        reply = self.get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        assert reply["status"] == "success", reply
        data = reply["data"]
        assert isinstance(data, dict)
        return list(data["result"])

    def value(self, promql: str) -> float:
        result = self.query(promql)
        return sum(float(r["value"][1]) for r in result)  # type: ignore[index]

    def wait_for(self, promql: str, at_least: float, timeout: float = 30) -> float:
        """Poll (bounded) until the query's value reaches `at_least`."""
        deadline = time.monotonic() + timeout
        value = 0.0
        while time.monotonic() < deadline:
            value = self.value(promql)
            if value >= at_least:
                return value
            time.sleep(0.5)
        raise AssertionError(f"{promql} stayed at {value}, wanted >= {at_least}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def test_alert_rules_pass_promtool() -> None:
    result = subprocess.run(
        [tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


async def one_turn(url: str, user: str) -> None:
    """create, join, say, read to `done` — through the plain websockets client."""
    subprotocols = ["parley.v1", f"bearer.{mint(user)}"]
    async with websockets.connect(url, subprotocols=subprotocols) as ws:  # type: ignore[list-item]
        assert json.loads(await ws.recv())["type"] == "ready"
        await ws.send(json.dumps({"type": "create", "title": "scraped"}))
        conversation = json.loads(await ws.recv())["conversation"]
        await ws.send(json.dumps({"type": "join", "conversation": conversation}))
        await ws.send(json.dumps({"type": "say", "conversation": conversation, "text": "hi"}))
        async with asyncio.timeout(20):
            while json.loads(await ws.recv())["type"] != "done":
                pass


async def test_prometheus_scrapes_web_and_worker(cluster: Cluster, tmp_path: Path) -> None:
    redis = {"REDIS_URL": redis_db(cluster.services.redis_url, Db.PROMETHEUS)}
    webs = [cluster.process("web", **redis), cluster.process("web", **redis)]
    worker_port = embedded.free_port()
    worker = cluster.process("worker", PARLEY_WORKER_METRICS_PORT=str(worker_port), **redis)
    targets = [(webs[0], webs[0].port, "web"), (webs[1], webs[1].port, "web")]
    targets.append((worker, worker_port, "worker"))
    prometheus = Prometheus(scrape_config(targets), tmp_path)
    try:
        await asyncio.to_thread(prometheus.wait_ready)
        await asyncio.to_thread(prometheus.wait_for, 'up{job="parley"}', 3)
        user = new_user()
        subprotocols = ["parley.v1", f"bearer.{mint(user)}"]
        idle = [
            await websockets.connect(web.ws_url, subprotocols=subprotocols)  # type: ignore[list-item]
            for web in webs
        ]
        try:
            sockets = 'sum by (process) (parley_ws_sockets_open{role="web"})'
            await asyncio.to_thread(prometheus.wait_for, f"count(({sockets}) >= 1)", 2)
            for _ in range(2):
                for web in webs:
                    await one_turn(web.ws_url, user)
        finally:
            for ws in idle:
                await ws.close()
        ttft = 'sum(gen_ai_server_time_to_first_token_seconds_count{role="web"})'
        await asyncio.to_thread(prometheus.wait_for, ttft, 4)
        p99 = (  # since the processes started: a rate needs two samples of a new series
            "histogram_quantile(0.99, sum by (le) "
            "(gen_ai_server_time_to_first_token_seconds_bucket))"
        )
        assert 0 < await asyncio.to_thread(prometheus.value, p99) < 10
        info = 'parley_process_info{role="worker"}'
        assert await asyncio.to_thread(prometheus.value, info) == 1
        assert (
            await asyncio.to_thread(prometheus.value, 'process_cpu_seconds_total{role="worker"}')
            > 0
        )
        closes = 'sum(parley_ws_closes_total{role="web", code="1000"})'
        await asyncio.to_thread(prometheus.wait_for, closes, 4)
        for expr in dashboard_queries():  # the shipped dashboard's queries all parse and run
            await asyncio.to_thread(prometheus.query, expr)
    finally:
        prometheus.stop()
        worker.stop()
        for web in webs:
            web.stop()
