"""Where spans go: the standard OpenTelemetry exporters, and OTLP JSON lines in a file.

Configured by the standard environment variables (`OTEL_SERVICE_NAME`,
`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_EXPORTER`, `OTEL_EXPORTER_OTLP_ENDPOINT`, ...) plus
a trace file. With none of them set there is no provider at all: tracing costs nothing.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)

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
