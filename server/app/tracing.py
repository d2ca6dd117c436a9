"""OpenTelemetry traces of each turn: optional, off unless an OTLP endpoint is configured.

`configure(role)` turns tracing on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set and the `otel` extra is installed: a tracer
provider with a batch processor and the OTLP/HTTP exporter, both configured by the standard
`OTEL_*` variables (sampler, batch delay, headers). Otherwise the module-level tracer stays
None, OpenTelemetry is never imported, and every function here returns a shared no-op.

A turn's trace crosses processes with the turn: the web process that accepts a `say` opens
the root span and puts its W3C `traceparent` into the job; the worker continues it with the
`chat {model}` span (GenAI semantic conventions) and its children; the finished turn carries
the chat span's `traceparent` to the persister, whose span joins the same trace.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from protocol.frames import Usage

log = logging.getLogger("parley.tracing")

ENDPOINT_VARIABLES: Final = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
PROVIDER_NAME: Final = "openai"
"""`gen_ai.system` / `gen_ai.provider.name`: the API Parley's model client speaks."""

_tracer: Tracer | None = None
_provider: TracerProvider | None = None


class Traced:
    """A span Parley opened, or nothing when tracing is off (`OFF`)."""

    __slots__ = ("span",)

    def __init__(self, span: Span | None = None) -> None:
        self.span = span

    @property
    def traceparent(self) -> str | None:
        """The span's W3C `traceparent`, to carry to another process."""
        if self.span is None:
            return None
        from opentelemetry.trace import set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier, set_span_in_context(self.span))
        return carrier.get("traceparent")

    def note(self, name: str, value: str | int) -> None:
        if self.span is not None:
            self.span.set_attribute(name, value)

    def chat_finished(
        self, reason: str, usage: Usage | None, response_model: str | None, error: str | None
    ) -> None:
        """The `chat` span's outcome: finish reason, token usage, the model that answered."""
        span = self.span
        if span is None:
            return
        span.set_attribute("gen_ai.response.finish_reasons", [reason])
        if response_model:
            span.set_attribute("gen_ai.response.model", response_model)
        if usage is not None:
            span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
        if error is not None:
            from opentelemetry.trace import StatusCode

            span.set_attribute("error.type", "model")
            span.set_status(StatusCode.ERROR, error)


OFF: Final = Traced()


def enabled() -> bool:
    return _tracer is not None


def configure(role: str) -> bool:
    """Turn tracing on if an OTLP endpoint is set; the service is `OTEL_SERVICE_NAME`, else
    `parley-<role>`. Returns whether tracing is on."""
    global _tracer, _provider
    if _tracer is not None:
        return True
    if not any(os.environ.get(name) for name in ENDPOINT_VARIABLES):
        return False
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("an OTLP endpoint is set but the `otel` extra is not installed: no traces")
        return False
    service = os.environ.get("OTEL_SERVICE_NAME") or f"parley-{role}"
    _provider = TracerProvider(resource=Resource.create({"service.name": service}))
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _tracer = _provider.get_tracer("parley")
    log.info("exporting traces over OTLP as %s", service)
    return True


def shutdown() -> None:
    """Export what is still batched and stop; tracing is off again."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


@contextlib.contextmanager
def accepting(command: str, conversation: uuid.UUID, message_id: uuid.UUID) -> Iterator[Traced]:
    """Web: the span of accepting a turn (`say`, `regenerate`), the root of its trace."""
    if _tracer is None:
        yield OFF
        return
    from opentelemetry.trace import SpanKind

    attributes = _ids(conversation, message_id)
    with _tracer.start_as_current_span(
        command, kind=SpanKind.PRODUCER, attributes=attributes
    ) as span:
        yield Traced(span)


@contextlib.contextmanager
def chat(
    traceparent: str | None,
    model: str,
    conversation: uuid.UUID,
    message_id: uuid.UUID,
    accepted_at: float,
) -> Iterator[Traced]:
    """Worker: the `chat {model}` span of a generation, continuing the accepting process's
    trace. With `accepted_at` (not a takeover) it starts then, with a `queue wait` child
    from then until now, when the worker claimed the turn."""
    if _tracer is None:
        yield OFF
        return
    from opentelemetry.trace import SpanKind

    attributes: dict[str, str | int] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.system": PROVIDER_NAME,
        "gen_ai.provider.name": PROVIDER_NAME,
        "gen_ai.request.model": model,
        **_ids(conversation, message_id),
    }
    claimed = time.time_ns()
    start = int(accepted_at * 1e9) if 0 < accepted_at * 1e9 < claimed else claimed
    with _tracer.start_as_current_span(
        f"chat {model}",
        context=_parent(traceparent),
        kind=SpanKind.CLIENT,
        attributes=attributes,
        start_time=start,
    ) as span:
        if start < claimed:
            _tracer.start_span("queue wait", start_time=start).end(end_time=claimed)
        yield Traced(span)


def span(name: str) -> contextlib.AbstractContextManager[Traced]:
    """A child of the current span (a step of the turn); nothing when tracing is off."""
    if _tracer is None:
        return contextlib.nullcontext(OFF)
    return _child(name)


@contextlib.contextmanager
def _child(name: str) -> Iterator[Traced]:
    assert _tracer is not None
    with _tracer.start_as_current_span(name) as child:
        yield Traced(child)


@contextlib.contextmanager
def continued(
    traceparent: str | None,
    name: str,
    conversation: uuid.UUID,
    message_id: uuid.UUID,
    start_time: int | None = None,
) -> Iterator[Traced]:
    """A span in another process joining the trace `traceparent` names (the persister's),
    begun at `start_time` (ns since the epoch) if given, else now."""
    if _tracer is None or traceparent is None:
        yield OFF
        return
    with _tracer.start_as_current_span(
        name,
        context=_parent(traceparent),
        attributes=_ids(conversation, message_id),
        start_time=start_time,
    ) as child:
        yield Traced(child)


def current_traceparent() -> str | None:
    """The current span's `traceparent` (None when tracing is off or no span is open)."""
    if _tracer is None:
        return None
    from opentelemetry.trace import get_current_span

    current = get_current_span()
    return Traced(current).traceparent if current.get_span_context().is_valid else None


def _parent(traceparent: str | None) -> Context | None:
    if traceparent is None:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": traceparent})


def _ids(conversation: uuid.UUID, message_id: uuid.UUID) -> dict[str, str | int]:
    return {"gen_ai.conversation.id": str(conversation), "parley.message.id": str(message_id)}
