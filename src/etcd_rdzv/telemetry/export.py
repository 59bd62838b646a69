"""Where spans go: the standard OpenTelemetry exporters, and OTLP JSON lines in a file.

Configured by the standard environment variables (`OTEL_SERVICE_NAME`,
`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_EXPORTER`, `OTEL_EXPORTER_OTLP_ENDPOINT`, ...) plus
a trace file. With none of them set there is no provider at all: tracing costs nothing.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, StatusCode
from opentelemetry.util.types import Attributes

log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = "etcd-rdzv"
_OTLP_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
# How long shutdown may wait for a slow or absent collector: never hold the agent's exit.
_SHUTDOWN_FLUSH_MILLIS = 2000


class OtlpJsonFileExporter(SpanExporter):
    """Appends each batch of spans as one line of OTLP JSON (an ExportTraceServiceRequest).

    The format of the OpenTelemetry collector's file exporter: ids in hex, one request a line,
    so files of several agents can be concatenated and read by `etcd-rdzv analyze`.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        line = json.dumps(encode_otlp_json(spans), separators=(",", ":")) + "\n"
        with self._lock:
            # One write of the whole line with O_APPEND: agents sharing a file do not interleave.
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(descriptor, line.encode())
            finally:
                os.close(descriptor)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def encode_otlp_json(spans: Sequence[ReadableSpan]) -> dict[str, Any]:
    """`spans` as an ExportTraceServiceRequest in OTLP JSON, ids in hex.

    Written directly: going through the protobuf messages and their JSON mapping cost about
    0.1 ms of CPU per span, more than making the span. The output is the protobuf path's,
    key for key (a test holds them equal); a value this encoder does not know takes it.
    """
    try:
        return _encode_request(spans)
    except _Unusual:
        pass  # outside the handler: a failure below is not chained to this
    return _encode_with_protobuf(spans)


def _encode_with_protobuf(spans: Sequence[ReadableSpan]) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    request: dict[str, Any] = MessageToDict(encode_spans(spans))
    for resource_spans in request.get("resourceSpans", []):
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                _ids_to_hex(span)
                for link in span.get("links", []):
                    _ids_to_hex(link)
    return request


class _Unusual(Exception):
    """A value the direct encoder leaves to the protobuf path."""


# The protobuf JSON mapping: fields in field-number order, those at their default left out,
# 64-bit integers as strings, enums by name.
_SPAN_KINDS = {
    SpanKind.INTERNAL: "SPAN_KIND_INTERNAL",
    SpanKind.SERVER: "SPAN_KIND_SERVER",
    SpanKind.CLIENT: "SPAN_KIND_CLIENT",
    SpanKind.PRODUCER: "SPAN_KIND_PRODUCER",
    SpanKind.CONSUMER: "SPAN_KIND_CONSUMER",
}
_STATUS_CODES = {StatusCode.OK: "STATUS_CODE_OK", StatusCode.ERROR: "STATUS_CODE_ERROR"}
_HAS_IS_REMOTE = 0x100  # SpanFlags: the context says whether it is remote
_IS_REMOTE = 0x200
_INT64_MIN, _INT64_END = -(2**63), 2**63


def _encode_request(spans: Sequence[ReadableSpan]) -> dict[str, Any]:
    grouped: dict[Resource, dict[InstrumentationScope | None, list[dict[str, Any]]]] = {}
    for span in spans:
        scope = span.instrumentation_scope or None
        grouped.setdefault(span.resource, {}).setdefault(scope, []).append(_encode_span(span))
    resource_spans = []
    for resource, scopes in grouped.items():
        scope_spans = []
        for scope, encoded in scopes.items():
            scope_item: dict[str, Any] = {"scope": _encode_scope(scope), "spans": encoded}
            if scope is not None and scope.schema_url:
                scope_item["schemaUrl"] = scope.schema_url
            scope_spans.append(scope_item)
        attributes = _encode_attributes(resource.attributes)
        resource_item: dict[str, Any] = {
            "resource": {"attributes": attributes} if attributes else {},
            "scopeSpans": scope_spans,
        }
        if resource.schema_url:
            resource_item["schemaUrl"] = resource.schema_url
        resource_spans.append(resource_item)
    return {"resourceSpans": resource_spans} if resource_spans else {}


def _encode_scope(scope: InstrumentationScope | None) -> dict[str, Any]:
    if scope is None:
        return {}
    item: dict[str, Any] = {}
    if scope.name:
        item["name"] = scope.name
    if scope.version:
        item["version"] = scope.version
    attributes = _encode_attributes(scope.attributes)
    if attributes:
        item["attributes"] = attributes
    return item


def _encode_span(span: ReadableSpan) -> dict[str, Any]:
    context = span.get_span_context()
    if context is None or span.kind not in _SPAN_KINDS:
        raise _Unusual
    item: dict[str, Any] = {
        "traceId": f"{context.trace_id:032x}",
        "spanId": f"{context.span_id:016x}",
    }
    if context.trace_state:
        item["traceState"] = ",".join(f"{k}={v}" for k, v in context.trace_state.items())
    parent = span.parent
    if parent:
        item["parentSpanId"] = f"{parent.span_id:016x}"
    if span.name:
        item["name"] = span.name
    item["kind"] = _SPAN_KINDS[span.kind]
    if span.start_time:
        item["startTimeUnixNano"] = _int64(span.start_time)
    if span.end_time:
        item["endTimeUnixNano"] = _int64(span.end_time)
    attributes = _encode_attributes(span.attributes)
    if attributes:
        item["attributes"] = attributes
    if span.dropped_attributes:
        item["droppedAttributesCount"] = span.dropped_attributes
    if span.events:
        item["events"] = [_encode_event(event) for event in span.events]
    if span.dropped_events:
        item["droppedEventsCount"] = span.dropped_events
    if span.links:
        item["links"] = [_encode_link(link) for link in span.links]
    if span.dropped_links:
        item["droppedLinksCount"] = span.dropped_links
    status: dict[str, Any] = {}
    if span.status.description:
        status["message"] = span.status.description
    if span.status.status_code is not StatusCode.UNSET:
        status["code"] = _STATUS_CODES[span.status.status_code]
    item["status"] = status
    item["flags"] = _flags(parent)
    return item


def _encode_event(event: Event) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if event.timestamp:
        item["timeUnixNano"] = _int64(event.timestamp)
    if event.name:
        item["name"] = event.name
    attributes = _encode_attributes(event.attributes)
    if attributes:
        item["attributes"] = attributes
    if event.dropped_attributes:
        item["droppedAttributesCount"] = event.dropped_attributes
    return item


def _encode_link(link: Link) -> dict[str, Any]:
    context = link.context
    item: dict[str, Any] = {
        "traceId": f"{context.trace_id:032x}",
        "spanId": f"{context.span_id:016x}",
    }
    attributes = _encode_attributes(link.attributes)
    if attributes:
        item["attributes"] = attributes
    if link.dropped_attributes:
        item["droppedAttributesCount"] = link.dropped_attributes
    item["flags"] = _flags(context)
    return item


def _flags(context: SpanContext | None) -> int:
    if context is not None and context.is_remote:
        return _HAS_IS_REMOTE | _IS_REMOTE
    return _HAS_IS_REMOTE


def _encode_attributes(attributes: Attributes) -> list[dict[str, Any]]:
    if not attributes:
        return []
    encoded = []
    for key, value in attributes.items():
        if type(key) is not str or not key:
            raise _Unusual
        encoded.append({"key": key, "value": _encode_value(value)})
    return encoded


def _encode_value(value: Any) -> dict[str, Any]:
    # Exact types only: a subclass (an enum, say) may print otherwise than protobuf stores it.
    kind = type(value)
    if kind is str:
        return {"stringValue": value}
    if kind is bool:
        return {"boolValue": value}
    if kind is int:
        return {"intValue": _int64(value)}
    if kind is float:
        return {"doubleValue": _double(value)}
    if value is None:
        return {}
    if kind is tuple or kind is list:
        return {"arrayValue": {"values": [_encode_value(v) for v in value]} if value else {}}
    raise _Unusual


def _int64(value: int) -> str:
    if not _INT64_MIN <= value < _INT64_END:
        raise _Unusual  # protobuf refuses it; its path says so the way it always did
    return str(value)


def _double(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def build_tracer_provider(trace_file: Path | None) -> TracerProvider | None:
    """A provider with the exporters asked for, or None when none is."""
    exporters: list[SpanExporter] = []
    if trace_file is not None:
        exporters.append(OtlpJsonFileExporter(trace_file))
    exporters.extend(_environment_exporters())
    if not exporters:
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": _service_name()}))
    for exporter in exporters:
        # Batching moves every export off the rendezvous threads: a slow or failing
        # exporter costs the protocol nothing.
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def shutdown_provider(provider: TracerProvider) -> None:
    """Flush what is pending, bounded in time, then stop the exporters."""

    def flush_and_stop() -> None:
        provider.force_flush(_SHUTDOWN_FLUSH_MILLIS)
        provider.shutdown()

    done = threading.Thread(target=flush_and_stop, name="etcd-rdzv-trace-shutdown", daemon=True)
    done.start()
    done.join(_SHUTDOWN_FLUSH_MILLIS / 1000 + 1)


def _environment_exporters() -> list[SpanExporter]:
    names = os.environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if not names and any(os.environ.get(variable) for variable in _OTLP_ENDPOINT_VARIABLES):
        names = "otlp"
    exporters: list[SpanExporter] = []
    for name in filter(None, (part.strip().lower() for part in names.split(","))):
        if name == "none":
            continue
        if name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name in ("otlp", "otlp_proto_http"):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        else:
            log.warning("etcd-rdzv: OTEL_TRACES_EXPORTER=%s is not supported; ignored", name)
    return exporters


def _service_name() -> str:
    return os.environ.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME


def _ids_to_hex(item: dict[str, Any]) -> None:
    # Protobuf's JSON mapping writes bytes in base64; OTLP JSON wants trace and span ids in hex.
    for key in ("traceId", "spanId", "parentSpanId"):
        if item.get(key):
            item[key] = base64.b64decode(item[key]).hex()
