"""Tracing is off without an OTLP endpoint: no provider, no exporter, no OpenTelemetry import.

Each check runs in a fresh interpreter, since this one may already have imported
OpenTelemetry for another test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import msgspec

from server.redis.turns import Job
from tests.helpers.processes import ROOT

PROBE = """
import json, sys, uuid
from server.app import tracing
on = tracing.configure("worker")
ids = (uuid.uuid4(), uuid.uuid4())
with tracing.accepting("say", *ids) as span:
    traceparent = span.traceparent
service = None
if tracing._provider is not None:
    service = tracing._provider.resource.attributes.get("service.name")
tracing.shutdown()
print(json.dumps({
    "on": on,
    "imported": sorted(m for m in sys.modules if m.startswith("opentelemetry"))[:3],
    "traceparent": traceparent,
    "service": service,
}))
"""


def probe(**env: str) -> dict[str, object]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return dict(json.loads(done.stdout.splitlines()[-1]))


def test_without_an_endpoint_nothing_is_set_up_or_imported() -> None:
    result = probe()
    assert result == {"on": False, "imported": [], "traceparent": None, "service": None}


def test_an_endpoint_turns_tracing_on_with_the_role_as_service() -> None:
    # The standard sampler variable drops every span, so nothing is sent to the endpoint
    # (127.0.0.1:9, where nothing listens); the context still propagates, marked unsampled.
    result = probe(
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9", OTEL_TRACES_SAMPLER="always_off"
    )
    assert result["on"] is True
    assert result["service"] == "parley-worker"
    assert isinstance(result["traceparent"], str)
    flags = int(result["traceparent"].rsplit("-", 1)[1], 16)
    assert flags & 1 == 0  # the sampled bit clear: the worker will not record either


def test_the_service_name_variable_wins_and_the_traces_endpoint_is_enough() -> None:
    result = probe(
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="http://127.0.0.1:9/v1/traces",
        OTEL_TRACES_SAMPLER="always_off",
        OTEL_SERVICE_NAME="parley-eu-1",
    )
    assert result["on"] is True and result["service"] == "parley-eu-1"


def test_a_job_queued_before_tracing_decodes() -> None:
    old = {"conversation": str(uuid.uuid4()), "user": "u", "message_id": str(uuid.uuid4())}
    job = msgspec.json.decode(json.dumps({**old, "model": "m"}), type=Job)
    assert job.traceparent is None
    assert b"traceparent" not in msgspec.json.encode(job)
