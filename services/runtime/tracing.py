"""One OpenTelemetry trace per turn, across every process of the pipeline.

Each stage records one span for its part of a turn's critical path, after the fact, with the
times it measured (a turn crosses many callbacks; a span held open across them would be one
more thing a handover loses). The span's context travels to the next stage in the headers of
the event that ends it (W3C ``traceparent``), and the next stage parents its span on it:

    ingress end_of_speech → stt stt_final → egress end_of_turn → llm llm_first_token
        → tts tts_first_audio → egress playback_start (→ egress interruption)

Off unless configured, with the SDK's own settings: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) turns on OTLP/HTTP export; ``OTEL_SERVICE_NAME`` and
the batch processor's ``OTEL_BSP_*`` apply as usual. Off, nothing here costs more than a
boolean test, and no event carries headers.
"""

from __future__ import annotations

import contextvars
import os
import time
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from services.runtime.errors import ConfigError

Headers = dict[str, str]

# The headers of the bus message being handled (set by ``Bus.subscribe`` around a handler).
CARRIED: contextvars.ContextVar[Headers | None] = contextvars.ContextVar("carried", default=None)

_provider: Any = None
_tracer: trace.Tracer | None = None


def enabled() -> bool:
    return _tracer is not None


def setup(stage: str, replica: str, exporter: Any = None) -> None:
    """Install the SDK with an OTLP/HTTP exporter when an endpoint is configured (or with
    ``exporter``, a span exporter of the SDK's, synchronously: the tests' in-memory one)."""
    global _provider, _tracer
    if exporter is None and not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                                 or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise ConfigError(f"OTEL_EXPORTER_OTLP_ENDPOINT is set but the exporter is missing "
                          f"({exc}); install voicebus[tracing]") from None
    resource = Resource.create({
        "service.name": os.environ.get("OTEL_SERVICE_NAME") or f"voicebus-{stage}",
        "service.instance.id": replica,
    })
    _provider = TracerProvider(resource=resource)
    _provider.add_span_processor(SimpleSpanProcessor(exporter) if exporter is not None
                                 else BatchSpanProcessor(OTLPSpanExporter()))
    _tracer = _provider.get_tracer("voicebus")


def shutdown() -> None:
    """Export what is still batched (called once, as the service stops)."""
    global _provider, _tracer
    if _provider is not None:
        _provider.shutdown()
    _provider = _tracer = None


def received() -> Headers | None:
    """The trace headers of the message being handled now (None when off or absent)."""
    return CARRIED.get() if _tracer is not None else None


def stage_span(name: str, *, session: str, start_ns: int, parent: Headers | None = None,
               turn: int = 0, end_ns: int = 0, **attributes: Any) -> Headers | None:
    """Record one finished span of a turn and return the headers that carry it on.

    ``parent``: the headers of the event this work started from (a new trace without them).
    """
    if _tracer is None:
        return None
    context = propagate.extract(parent) if parent else None
    attrs = {"voicebus.session": session, **{f"voicebus.{k}": v for k, v in attributes.items()}}
    if turn:
        attrs["voicebus.turn"] = turn
    span = _tracer.start_span(name, context=context, kind=SpanKind.INTERNAL,
                              start_time=start_ns or time.time_ns(), attributes=attrs)
    span.end(end_time=end_ns or time.time_ns())
    carrier: Headers = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return carrier
