"""OpenTelemetry spans of the rendezvous: one trace per node call, one trace per version.

Each `next_rendezvous()` call is a `rendezvous` span rooting the node's own trace. The node
that opens a version starts that version's trace with a `rendezvous.version` span (ended at
once, so it is exported even if its node dies) and publishes its W3C context in etcd; every
node's phase spans for the version are children of it, so one trace shows all nodes side by
side, and each node's `rendezvous` span links to it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from etcd_rdzv.telemetry.observer import Observer, Outcome, Phase, PhaseScope

SPAN_PREFIX = "rendezvous"
VERSION_SPAN = "rendezvous.version"
_PROPAGATOR = TraceContextTextMapPropagator()
# Phases before the node knows its version stay in the node's own trace.
_NODE_PHASES = frozenset({Phase.RENDEZVOUS, Phase.SETUP})


def span_name(phase: Phase) -> str:
    return SPAN_PREFIX if phase is Phase.RENDEZVOUS else f"{SPAN_PREFIX}.{phase.value}"


_SPAN_NAMES = {phase: span_name(phase) for phase in Phase}
# A rendezvous roots its own trace, whatever the caller's context (contexts are immutable).
_NO_PARENT = Context()


def node_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class TracingObserver(Observer):
    shares_version_context = True

    def __init__(
        self, tracer: Tracer, *, run_id: str, min_nodes: int, max_nodes: int, node: str
    ) -> None:
        self._tracer = tracer
        self._common: dict[str, str | int] = {
            "rdzv.run_id": run_id,
            "rdzv.min_nodes": min_nodes,
            "rdzv.max_nodes": max_nodes,
            "rdzv.node": node,
        }
        self._lock = threading.Lock()
        self._versions: dict[int, Context] = {}
        self._rendezvous_span: Span | None = None
        self._linked: set[int] = set()

    @contextmanager
    def phase(self, phase: Phase, **attributes: Any) -> Iterator[PhaseScope]:
        if phase is Phase.RENDEZVOUS:
            parent: Context | None = _NO_PARENT
        else:
            version = attributes.get("version")
            parent = None
            if phase not in _NODE_PHASES and version is not None:
                with self._lock:
                    parent = self._versions.get(version)
        # start_span and attach by hand: what start_as_current_span does with
        # record_exception and set_status_on_exception off, less two context managers.
        span = self._tracer.start_span(
            _SPAN_NAMES[phase],
            context=parent,
            attributes={**self._common, **_attributes(attributes)},
            record_exception=False,
            set_status_on_exception=False,
        )
        token = context_api.attach(trace.set_span_in_context(span))
        if phase is Phase.RENDEZVOUS:
            with self._lock:
                self._rendezvous_span, self._linked = span, set()
        scope = _SpanScope(span)
        try:
            yield scope
        except BaseException as error:
            _end_with(span, scope.ended(failed=True), error)
            raise
        finally:
            if phase is Phase.RENDEZVOUS:
                with self._lock:
                    self._rendezvous_span = None
            context_api.detach(token)
            span.end()

    def retry(
        self, phase: Phase | None, reason: str, attempt: int, detail: str | None = None
    ) -> None:
        attributes: dict[str, Any] = {"rdzv.reason": reason, "rdzv.attempt": attempt}
        if phase is not None:
            attributes["rdzv.phase"] = phase.value
        if detail:
            attributes["rdzv.detail"] = detail
        trace.get_current_span().add_event("retry", attributes)

    def transition(
        self, version: int | None, before: str | None, after: str, participants: int, made: bool
    ) -> None:
        attributes: dict[str, Any] = {
            "rdzv.from": before or "none",
            "rdzv.to": after,
            "rdzv.participants": participants,
            "rdzv.made": made,
        }
        if version is not None:
            attributes["rdzv.version"] = version
        trace.get_current_span().add_event("state_change", attributes)

    def open_version(self, version: int) -> str | None:
        root = self._tracer.start_span(
            VERSION_SPAN, context=Context(), attributes={**self._common, "rdzv.version": version}
        )
        root.end()
        context = trace.set_span_in_context(root, Context())
        with self._lock:
            self._versions[version] = context
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=context)
        return json.dumps(carrier, separators=(",", ":"))

    def enter_version(self, version: int, context: str | None) -> None:
        with self._lock:
            known = self._versions.get(version)
            if known is None and context:
                known = _extract(context)
                if known is not None:
                    self._versions[version] = known
                    # Only the latest few versions matter; keep the map from growing.
                    for old in sorted(self._versions)[:-4]:
                        del self._versions[old]
            span = self._rendezvous_span
            if known is None or span is None or version in self._linked:
                return
            self._linked.add(version)
        span.add_link(trace.get_current_span(known).get_span_context(), {"rdzv.version": version})


class _SpanScope(PhaseScope):
    def __init__(self, span: Span) -> None:
        self._span = span

    def annotate(self, **attributes: Any) -> None:
        self._span.set_attributes(_attributes(attributes))

    def event(self, name: str, **attributes: Any) -> None:
        self._span.add_event(name, _attributes(attributes))


def _end_with(span: Span, outcome: Outcome, error: BaseException) -> None:
    if outcome is Outcome.RETRY:
        # Not a failure: the state moved on and the rendezvous starts over.
        span.set_attribute("rdzv.outcome", "retry")
        span.add_event("start_over", {"rdzv.reason": str(error)})
        return
    span.set_attribute("rdzv.outcome", "error")
    span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))


def _attributes(values: Mapping[str, Any]) -> dict[str, Any]:
    return {
        f"rdzv.{key}": value
        for key, value in values.items()
        if value is not None and isinstance(value, str | int | float | bool)
    }


def _extract(context: str) -> Context | None:
    try:
        carrier = json.loads(context)
    except ValueError:
        return None
    if not isinstance(carrier, dict):
        return None
    extracted = _PROPAGATOR.extract(carrier)
    if not trace.get_current_span(extracted).get_span_context().is_valid:
        return None
    return extracted
