"""The event loop's lag sampler, on a real running loop."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import Histogram

from server.app import metrics
from server.app.looplag import LoopLag

BLOCK = 0.15


def hold_the_loop() -> None:
    """A synchronous step as long as BLOCK: nothing else on the loop runs meanwhile."""
    time.sleep(BLOCK)


def _bucket_at_least(histogram: Histogram, bound: float) -> float:
    """Observations in `histogram` of at least `bound` (a bucket boundary)."""
    counts = {
        float(sample.labels["le"]): sample.value
        for family in histogram.collect()
        for sample in family.samples
        if sample.name.endswith("_bucket")
    }
    return counts[float("inf")] - counts[max(b for b in counts if b < bound)]


async def test_a_blocked_loop_is_observed_as_lag_at_least_as_long() -> None:
    seen: list[float] = []
    sampler = LoopLag(0.01, seen.append)
    sampler.start()
    try:
        await asyncio.sleep(0.05)
        hold_the_loop()
        await asyncio.sleep(0.05)
    finally:
        sampler.stop()
    assert max(seen) >= BLOCK - 0.011  # it was due at most one interval into the block
    assert sorted(seen)[len(seen) // 2] < 0.01  # the other samples ran about on time


async def test_the_sampler_feeds_the_process_histogram() -> None:
    long_before = _bucket_at_least(metrics.LOOP_LAG, 0.1)
    sampler = LoopLag(0.01)
    sampler.start()
    try:
        await asyncio.sleep(0.03)
        hold_the_loop()
        await asyncio.sleep(0.03)
    finally:
        sampler.stop()
    assert _bucket_at_least(metrics.LOOP_LAG, 0.1) - long_before >= 1


async def test_an_interval_of_zero_samples_nothing() -> None:
    seen: list[float] = []
    sampler = LoopLag(0.0, seen.append)
    sampler.start()
    await asyncio.sleep(0.02)
    sampler.stop()
    assert seen == []


async def test_a_stopped_sampler_observes_no_more() -> None:
    seen: list[float] = []
    sampler = LoopLag(0.005, seen.append)
    sampler.start()
    await asyncio.sleep(0.03)
    sampler.stop()
    count = len(seen)
    await asyncio.sleep(0.03)
    assert count >= 1 and len(seen) == count
