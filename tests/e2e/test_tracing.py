"""OpenTelemetry traces: a real `parley web` and `parley worker` export over OTLP/HTTP to a
receiver the test runs on 127.0.0.1, which decodes each body as the collector would
(`opentelemetry-proto`'s ExportTraceServiceRequest); one turn's spans form one trace across
the web process, the worker and its persister."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from protocol import frames as f
from server.dev.client import Client, ProtocolError
from tests.helpers.auth import mint, new_user
from tests.helpers.conversations import say_and_finish, start_conversation
from tests.helpers.processes import Cluster, Db, redis_db, start_all

TRACING_DB = Db.TRACING
NO_WORKER_DB = Db.TRACING_NO_WORKER
MODEL = "sim-traced"


@dataclass(frozen=True)
class Exported:
    """One span as the receiver got it, with the service that sent it."""

    service: str
    name: str
    kind: int
    trace_id: bytes
    span_id: bytes
    parent_id: bytes
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status_code: int


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    return getattr(value, kind) if kind else None


class Receiver(ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver: POST /v1/traces with a protobuf body."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.spans: list[Exported] = []
        self.paths: list[str] = []
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def add(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            attributes = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self._keep(str(attributes.get("service.name")), span)

    def _keep(self, service: str, span: SpanProto) -> None:
        exported = Exported(
            service=service,
            name=span.name,
            kind=span.kind,
            trace_id=span.trace_id,
            span_id=span.span_id,
            parent_id=span.parent_span_id,
            start_ns=span.start_time_unix_nano,
            end_ns=span.end_time_unix_nano,
            attributes={a.key: _value(a.value) for a in span.attributes},
            status_code=span.status.code,
        )
        with self.lock:
            self.spans.append(exported)

    def named(self, name: str) -> list[Exported]:
        with self.lock:
            return [span for span in self.spans if span.name == name]


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.paths.append(self.path)
        if self.path != "/v1/traces":
            self.send_response(404)
            self.end_headers()
            return
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        self.server.add(request)
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads what arrived, not an access log."""


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


async def wait_for_spans(
    receiver: Receiver, names: list[str], each: int = 1, timeout: float = 20
) -> None:
    """Until `each` spans of every name have arrived (the batch delay is 200 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(len(receiver.named(name)) >= each for name in names):
            return
        await asyncio.sleep(0.1)
    got = sorted({span.name for span in receiver.spans})
    pytest.fail(f"spans {names} not all exported within {timeout} s; got {got}")


async def test_one_turn_is_one_trace_across_web_worker_and_persister(
    cluster: Cluster, receiver: Receiver
) -> None:
    env = {
        "REDIS_URL": redis_db(cluster.services.redis_url, TRACING_DB),
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "PARLEY_LLM_MODEL": MODEL,
    }
    web = cluster.process("web", start=False, **env)
    worker = cluster.process("worker", start=False, **env)
    start_all([web, worker])
    user = new_user()
    async with await Client.connect(web.ws_url, mint(user)) as client:
        conversation = await start_conversation(client)
        done = await say_and_finish(client, conversation, "trace me")
    assert done.reason == "stop" and done.usage is not None
    names = ["say", f"chat {MODEL}", "queue wait", "build prompt", "model stream"]
    await wait_for_spans(receiver, [*names, "finish turn", "persist turn"])
    assert set(receiver.paths) == {"/v1/traces"}

    say = receiver.named("say")[0]
    turn = [span for span in receiver.spans if span.trace_id == say.trace_id]
    by_name = {span.name: span for span in turn}
    assert set(by_name) >= {*names, "finish turn", "persist turn"}
    assert len(turn) == len(by_name), "one span of each per turn"
    assert say.service == "parley-web" and not say.parent_id
    assert say.kind == SpanProto.SPAN_KIND_PRODUCER
    assert say.attributes["parley.admission"] == "ok"

    chat = by_name[f"chat {MODEL}"]
    assert chat.service == "parley-worker"
    assert chat.parent_id == say.span_id
    assert chat.kind == SpanProto.SPAN_KIND_CLIENT
    assert chat.attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.system": "openai",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": MODEL,
        "gen_ai.response.model": MODEL,
        "gen_ai.response.finish_reasons": ["stop"],
        "gen_ai.usage.input_tokens": done.usage.prompt_tokens,
        "gen_ai.usage.output_tokens": done.usage.completion_tokens,
        "gen_ai.conversation.id": str(conversation),
        "parley.message.id": str(done.message_id),
    }
    assert say.attributes["parley.message.id"] == str(done.message_id)
    assert chat.status_code != Status.STATUS_CODE_ERROR

    for step in ("queue wait", "build prompt", "model stream", "finish turn"):
        span = by_name[step]
        assert span.parent_id == chat.span_id, step
        assert span.service == "parley-worker", step
        assert span.start_ns >= chat.start_ns, step
    persist = by_name["persist turn"]  # the persister's, from the finished turn's traceparent
    assert persist.parent_id == by_name["finish turn"].span_id
    assert persist.start_ns >= by_name["finish turn"].start_ns
    queue = by_name["queue wait"]
    assert queue.start_ns == chat.start_ns  # accepted, on the web process's clock
    assert queue.end_ns <= by_name["build prompt"].start_ns
    assert by_name["model stream"].end_ns <= chat.end_ns
    assert persist.attributes["gen_ai.conversation.id"] == str(conversation)
    assert say.start_ns <= chat.start_ns
    worker.stop()
    web.stop()


async def test_refused_turn_ends_its_trace_at_the_web_process(
    cluster: Cluster, receiver: Receiver
) -> None:
    """A `say` refused as busy is traced (and marked an error) but never reaches a worker:
    no worker runs on this Redis database, so the first turn stays queued."""
    env = {
        "REDIS_URL": redis_db(cluster.services.redis_url, NO_WORKER_DB),
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "OTEL_SERVICE_NAME": "edge-under-test",
    }
    web = cluster.process("web", start=False, **env)
    start_all([web])
    async with await Client.connect(web.ws_url, mint(new_user())) as client:
        conversation = await start_conversation(client)
        await client.request(f.Say(conversation=conversation, text="first"))
        with pytest.raises(ProtocolError) as refused:
            await client.request(f.Say(conversation=conversation, text="second"))
    assert refused.value.error.code == "busy"
    await wait_for_spans(receiver, ["say"], each=2)
    says = receiver.named("say")
    assert len(says) == 2 and {s.service for s in says} == {"edge-under-test"}
    assert [s.status_code for s in says].count(Status.STATUS_CODE_ERROR) == 1
    assert not [span for span in receiver.spans if span.name.startswith("chat ")]
    web.stop()
