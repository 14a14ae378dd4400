"""A local fake of an OpenTelemetry collector's OTLP/HTTP traces receiver (``POST /v1/traces``).

Speaks the protocol as the SDK's ``OTLPSpanExporter`` uses it: a binary protobuf
``ExportTraceServiceRequest`` (``Content-Type: application/x-protobuf``, gzip when the exporter
compresses), answered with an ``ExportTraceServiceResponse``. What it received is kept as plain
``Span`` records, with their service:

    collector = await FakeOtlpCollector().start()
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = collector.endpoint
    ...
    spans = await collector.wait_for(lambda spans: ..., timeout=10)
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest, ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tests.fakes._base import FakeServer

T = TypeVar("T")


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str  # "" for a trace's root
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


class FakeOtlpCollector(FakeServer):
    def __init__(self, *, host: str = "127.0.0.1") -> None:
        super().__init__(host=host)
        self.spans: list[Span] = []
        self.bad_requests = 0
        self._changed = asyncio.Condition()

    @property
    def endpoint(self) -> str:
        """For ``OTEL_EXPORTER_OTLP_ENDPOINT`` (the exporter appends ``/v1/traces``)."""
        return self.address("http")

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/traces", self._traces)]

    async def _traces(self, request: web.Request) -> web.Response:
        if (status := self._take_status()) is not None:
            return web.Response(status=status)
        if request.content_type != "application/x-protobuf":
            self.bad_requests += 1
            return web.Response(status=415)
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        export = ExportTraceServiceRequest()
        try:
            export.ParseFromString(body)
        except Exception:  # protobuf's DecodeError
            self.bad_requests += 1
            return web.Response(status=400)
        received = []
        for resource_spans in export.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(Span(
                        service=str(resource.get("service.name", "")), name=span.name,
                        trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                        parent_id=span.parent_span_id.hex(),
                        start_ns=span.start_time_unix_nano, end_ns=span.end_time_unix_nano,
                        attributes={a.key: _value(a.value) for a in span.attributes}))
        async with self._changed:
            self.spans.extend(received)
            self._changed.notify_all()
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    async def wait_for(self, found: Callable[[list[Span]], T | None], timeout: float,
                       what: str) -> T:
        """The first truthy ``found(spans)`` as spans arrive; ``TimeoutError`` naming ``what``."""
        async with self._changed:
            try:
                async with asyncio.timeout(timeout):
                    while not (result := found(self.spans)):
                        await self._changed.wait()
            except TimeoutError:
                names = sorted({(s.service, s.name) for s in self.spans})
                raise TimeoutError(f"no {what} within {timeout}s; spans so far: {names}") from None
            return result
