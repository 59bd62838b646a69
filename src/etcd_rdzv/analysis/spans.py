"""Read spans from OTLP JSON lines (the trace file) and Jaeger JSON into one `Span` type."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

AttributeValue = str | int | float | bool
Attributes = Mapping[str, AttributeValue]


class AnalysisError(Exception):
    """A problem with the input that the user can fix; its message says what and where."""


@dataclass(frozen=True)
class SpanEvent:
    name: str
    time_ns: int
    attributes: Attributes = field(default_factory=dict)


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    start_ns: int
    end_ns: int
    attributes: Attributes = field(default_factory=dict)
    events: tuple[SpanEvent, ...] = ()
    error: bool = False
    source: str = ""

    @property
    def run_id(self) -> str | None:
        value = self.attributes.get("rdzv.run_id")
        return None if value is None else str(value)

    @property
    def node(self) -> str | None:
        value = self.attributes.get("rdzv.node")
        return None if value is None else str(value)

    @property
    def version(self) -> int | None:
        return _as_int(self.attributes.get("rdzv.version"))

    @property
    def rank(self) -> int | None:
        return _as_int(self.attributes.get("rdzv.rank"))

    @property
    def outcome(self) -> str:
        """`ok`, `retry` or `error`, from `rdzv.outcome` and the span's status."""
        value = self.attributes.get("rdzv.outcome")
        if value is not None:
            return str(value)
        return "error" if self.error else "ok"

    @property
    def phase(self) -> str | None:
        """The phase of a `rendezvous.<phase>` span; None for `rendezvous` and others."""
        prefix, _, phase = self.name.partition(".")
        if prefix != "rendezvous" or not phase or phase == "version":
            return None
        return phase

    @property
    def seconds(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


def read_spans(paths: Iterable[Path]) -> list[Span]:
    """Every span in `paths`, each an OTLP JSON lines file or a Jaeger JSON export."""
    spans: list[Span] = []
    for path in paths:
        spans.extend(read_file(path))
    return spans


def read_file(path: Path) -> list[Span]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AnalysisError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise AnalysisError(f"{path}: cannot read: {error}") from None
    if not text.strip():
        raise AnalysisError(f"no spans in {path}: the file is empty")
    source = str(path)
    try:
        # A whole-file document: a Jaeger export, or one pretty-printed OTLP request.
        documents: list[tuple[int, Any]] = [(1, json.loads(text))]
    except ValueError:
        documents = list(_json_lines(text, source))
    spans: list[Span] = []
    for line, document in documents:
        try:
            spans.extend(_spans_of(document, source))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise AnalysisError(
                f"{path}:{line}: not an OTLP or Jaeger trace document ({type(error).__name__}: "
                f"{error})"
            ) from None
    if not spans:
        raise AnalysisError(f"no spans in {path}")
    return spans


def _json_lines(text: str, source: str) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except ValueError as error:
            raise AnalysisError(f"{source}:{number}: malformed JSON: {error}") from None


def _spans_of(document: Any, source: str) -> Iterator[Span]:
    if not isinstance(document, dict):
        raise TypeError(f"expected a JSON object, got {type(document).__name__}")
    if "resourceSpans" in document:
        yield from _otlp_spans(document, source)
    elif "data" in document:
        yield from _jaeger_spans(document, source)
    else:
        raise KeyError("neither 'resourceSpans' (OTLP) nor 'data' (Jaeger)")


# --- OTLP JSON ---------------------------------------------------------------------------------


def _otlp_spans(request: Mapping[str, Any], source: str) -> Iterator[Span]:
    for resource_spans in request.get("resourceSpans") or []:
        for scope_spans in resource_spans.get("scopeSpans") or []:
            for raw in scope_spans.get("spans") or []:
                status = raw.get("status") or {}
                yield Span(
                    trace_id=str(raw["traceId"]),
                    span_id=str(raw["spanId"]),
                    parent_span_id=raw.get("parentSpanId") or None,
                    name=str(raw["name"]),
                    start_ns=int(raw["startTimeUnixNano"]),
                    end_ns=int(raw["endTimeUnixNano"]),
                    attributes=_otlp_attributes(raw.get("attributes")),
                    events=tuple(
                        SpanEvent(
                            name=str(event["name"]),
                            time_ns=int(event["timeUnixNano"]),
                            attributes=_otlp_attributes(event.get("attributes")),
                        )
                        for event in raw.get("events") or []
                    ),
                    error=status.get("code") in ("STATUS_CODE_ERROR", 2),
                    source=source,
                )


def _otlp_attributes(raw: Any) -> dict[str, AttributeValue]:
    attributes: dict[str, AttributeValue] = {}
    for item in raw or []:
        value = _otlp_value(item.get("value") or {})
        if value is not None:
            attributes[str(item["key"])] = value
    return attributes


def _otlp_value(value: Mapping[str, Any]) -> AttributeValue | None:
    if "stringValue" in value:
        return str(value["stringValue"])
    if "intValue" in value:
        return int(value["intValue"])  # a string in OTLP JSON
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "doubleValue" in value:
        return float(value["doubleValue"])
    return None  # arrays, maps and bytes: not used by etcd-rdzv


# --- Jaeger JSON -------------------------------------------------------------------------------


def _jaeger_spans(export: Mapping[str, Any], source: str) -> Iterator[Span]:
    for trace in export.get("data") or []:
        for raw in trace.get("spans") or []:
            tags = _jaeger_tags(raw.get("tags"))
            parent = next(
                (
                    str(reference["spanID"])
                    for reference in raw.get("references") or []
                    if reference.get("refType") == "CHILD_OF"
                ),
                None,
            )
            start_ns = int(raw["startTime"]) * 1000
            error = tags.get("error") is True or tags.get("otel.status_code") == "ERROR"
            yield Span(
                trace_id=str(raw["traceID"]),
                span_id=str(raw["spanID"]),
                parent_span_id=parent,
                name=str(raw["operationName"]),
                start_ns=start_ns,
                end_ns=start_ns + int(raw.get("duration", 0)) * 1000,
                attributes=tags,
                events=tuple(_jaeger_event(log) for log in raw.get("logs") or []),
                error=error,
                source=source,
            )


def _jaeger_event(log: Mapping[str, Any]) -> SpanEvent:
    fields = _jaeger_tags(log.get("fields"))
    name = fields.pop("event", "log")
    return SpanEvent(name=str(name), time_ns=int(log["timestamp"]) * 1000, attributes=fields)


def _jaeger_tags(raw: Any) -> dict[str, AttributeValue]:
    tags: dict[str, AttributeValue] = {}
    for tag in raw or []:
        kind, value = str(tag.get("type", "string")).lower(), tag.get("value")
        if value is None:
            continue
        if kind == "int64":
            tags[str(tag["key"])] = int(value)
        elif kind == "float64":
            tags[str(tag["key"])] = float(value)
        elif kind == "bool":
            tags[str(tag["key"])] = value if isinstance(value, bool) else str(value) == "true"
        else:
            tags[str(tag["key"])] = str(value)
    return tags


def _as_int(value: AttributeValue | None) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except ValueError:
        return None
