"""The server's side of a load run: `GET /metrics` of the web processes driven, read before
and after the run, so that the summary shows the server's time to first token and its
closes beside what the tabs measured. Nothing when the endpoint is not reachable."""

from __future__ import annotations

import math
import urllib.request
from typing import Any, Final

from prometheus_client.parser import text_string_to_metric_families

from server.app.metrics import samples

TTFT: Final = "gen_ai_server_time_to_first_token_seconds_bucket"
CLOSES: Final = "parley_ws_closes_total"


def metrics_url(ws_url: str) -> str:
    """ws://host:port/ws → http://host:port/metrics."""
    scheme, _, rest = ws_url.partition("://")
    host = rest.split("/", 1)[0]
    return f"{'https' if scheme == 'wss' else 'http'}://{host}/metrics"


def scrape(url: str) -> dict[str, float] | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return samples(text_string_to_metric_families(response.read().decode()))
    except (OSError, ValueError):
        return None


def scrape_all(urls: list[str]) -> dict[str, float] | None:
    """The samples of every endpoint, added up; None if one of them does not answer."""
    total: dict[str, float] = {}
    for url in urls:
        found = scrape(url)
        if found is None:
            return None
        for key, value in found.items():
            total[key] = total.get(key, 0.0) + value
    return total


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Like PromQL's histogram_quantile: linear within the bucket (cumulative counts)."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return None


def summary(changed: dict[str, float]) -> dict[str, Any]:
    """TTFT p50/p99 (ms) and closes by code, from what changed during the run."""
    buckets: dict[float, float] = {}
    closes: dict[str, float] = {}
    for key, value in changed.items():
        name, _, labels = key.partition("{")
        if name == TTFT:
            le = float(labels.split('le="', 1)[1].split('"', 1)[0])
            buckets[le] = buckets.get(le, 0.0) + value
        elif name == CLOSES and value:
            code = labels.split('code="', 1)[1].split('"', 1)[0]
            closes[code] = closes.get(code, 0.0) + value

    def ms(q: float) -> float | None:
        value = quantile(q, buckets)
        return None if value is None else round(value * 1000, 1)

    count = buckets.get(math.inf, 0.0)
    return {
        "ttft_p50_ms": ms(0.5),
        "ttft_p99_ms": ms(0.99),
        "ttft_count": int(count),
        "closes": {code: int(n) for code, n in sorted(closes.items())},
    }
