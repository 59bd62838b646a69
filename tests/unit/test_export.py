"""The trace file's OTLP JSON, written directly, is the protobuf JSON mapping's, key for key."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from etcd_rdzv.errors import RendezvousTimeoutError
from etcd_rdzv.telemetry.export import _encode_with_protobuf, encode_otlp_json
from etcd_rdzv.telemetry.observer import Outcome, Phase
from etcd_rdzv.telemetry.tracing import TracingObserver


def finished_spans(resource: Resource | None = None) -> tuple[TracerProvider, InMemorySpanExporter]:
    provider = TracerProvider(resource=resource or Resource.create({"service.name": "test"}))
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def assert_same_json(spans: Sequence[ReadableSpan]) -> None:
    expected = json.dumps(_encode_with_protobuf(spans), separators=(",", ":"))
    assert json.dumps(encode_otlp_json(spans), separators=(",", ":")) == expected


def rendezvous_spans() -> Sequence[ReadableSpan]:
    """What the tracing observer makes: phases, events, links, errors, a version trace."""
    provider, exporter = finished_spans()
    observer = TracingObserver(
        provider.get_tracer("etcd_rdzv", "1.2.3"), run_id="run", min_nodes=2, max_nodes=4,
        node="host:1",
    )  # fmt: skip
    with observer.phase(Phase.RENDEZVOUS) as outer:
        with observer.phase(Phase.SETUP, attempt=1) as scope:
            context = observer.open_version(3)
            observer.transition(None, None, "setup", 0, True)
            scope.annotate(version=3, state="joinable", ratio=0.5, ok=False)
        observer.enter_version(3, context)
        # Another node's version: its context arrives remote.
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(
            carrier, trace.set_span_in_context(provider.get_tracer("x").start_span("other"))
        )
        observer.enter_version(4, json.dumps(carrier))
        with observer.phase(Phase.JOIN, version=4) as scope:
            observer.retry(Phase.JOIN, "compare_failed", 2, "lost the race")
            observer.retry(None, "etcd_unavailable", 1)
            scope.event("keep_alive_missing", keys="/a/b")
            scope.end(Outcome.RETRY)
            try:
                raise RuntimeError("state moved on")
            except RuntimeError:
                pass
        try:
            with observer.phase(Phase.FROZEN_WAIT, version=4):
                raise RendezvousTimeoutError("late")
        except RendezvousTimeoutError:
            pass
        outer.annotate(rank=0, world_size=2)
    return exporter.get_finished_spans()


def test_the_rendezvous_spans_encode_as_protobuf_does() -> None:
    spans = rendezvous_spans()
    assert len(spans) >= 5
    assert any(span.links for span in spans) and any(span.events for span in spans)
    assert any(span.status.status_code is StatusCode.ERROR for span in spans)
    assert_same_json(spans)
    assert_same_json(spans[:1])
    assert encode_otlp_json([]) == _encode_with_protobuf([]) == {}


def test_every_attribute_type_kind_status_and_grouping_encode_as_protobuf_does() -> None:
    first, exporter = finished_spans(Resource.create({"service.name": "a", "n": 3}))
    second, other = finished_spans(Resource({}, schema_url="https://schema/1"))
    values: dict[str, AttributeValue] = {
        "s": "text", "empty": "", "t": True, "f": False, "i": -7, "zero": 0, "big": 2**62,
        "x": 1.5, "whole": 2.0, "inf": math.inf, "ninf": -math.inf, "nan": math.nan,
        "strings": ["a", "b"], "ints": (1, 2), "floats": [0.25], "bools": [True],
        "none_inside": [None, "a"], "nothing": [],
    }  # fmt: skip
    tracer = first.get_tracer("scope", "0.1", schema_url="https://schema/2")
    for kind in SpanKind:
        span = tracer.start_span(f"kind-{kind.name}", kind=kind, attributes=values)
        span.add_event("event", values, timestamp=123)
        span.add_event("bare")
        span.end()
    remote = trace.SpanContext(1, 2, is_remote=True, trace_flags=trace.TraceFlags(1))
    span = first.get_tracer("bare").start_span(
        "linked", links=[Link(remote, {"why": "x"}), Link(remote)], context=Context()
    )
    span.set_status(Status(StatusCode.OK))
    span.end()
    child = tracer.start_span("child", context=trace.set_span_in_context(span))
    child.set_status(Status(StatusCode.ERROR, "broken"))
    child.end()
    from_remote = tracer.start_span(
        "from remote", context=trace.set_span_in_context(trace.NonRecordingSpan(remote))
    )
    from_remote.end()
    second.get_tracer("").start_span("").end()
    spans = [*exporter.get_finished_spans(), *other.get_finished_spans()]
    interleaved = [spans[-1], *spans[:-1], spans[0]]
    assert_same_json(spans)
    assert_same_json(interleaved)


def test_values_the_direct_encoder_does_not_know_go_the_protobuf_way() -> None:
    provider, exporter = finished_spans()
    tracer = provider.get_tracer("t")
    for value in (b"\x00\x01", 2**63, [2**64], Phase.JOIN, {"a": 1}):
        span = tracer.start_span("odd")
        span.set_attribute("value", value)
        span.end()
        spans = exporter.get_finished_spans()[-1:]
        assert encode_otlp_json(spans) == _encode_with_protobuf(spans), value
