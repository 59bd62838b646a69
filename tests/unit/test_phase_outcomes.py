"""Each phase's outcome is said by the protocol and read by every observer, never guessed.

The protocol maps its own exceptions to an `Outcome` in one place (`rendezvous._outcome`); the
observers (metrics, logs, traces, and the fan-out that feeds them) act on what they are told.
"""

from __future__ import annotations

import logging

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from etcd_rdzv.errors import RendezvousClosedError, RendezvousTimeoutError
from etcd_rdzv.rendezvous import _outcome, _StartOver
from etcd_rdzv.telemetry import FanOut, Outcome, Phase
from etcd_rdzv.telemetry.logging import EVENT_LOGGER_NAME, LoggingObserver
from etcd_rdzv.telemetry.metrics import MetricsObserver, RendezvousMetrics
from etcd_rdzv.telemetry.tracing import TracingObserver


class Unusual(Exception):
    """An exception no observer knows by name."""


@pytest.mark.parametrize(
    ("phase", "error", "outcome"),
    [
        (Phase.JOIN, _StartOver(Phase.JOIN, "state_moved_on", "moved"), Outcome.RETRY),
        (Phase.JOIN, Unusual(), Outcome.ERROR),
        (Phase.FINAL_WAIT, RendezvousTimeoutError("late"), Outcome.ERROR),
        (Phase.RENDEZVOUS, RendezvousTimeoutError("late"), Outcome.TIMEOUT),
        (Phase.RENDEZVOUS, RendezvousClosedError("closed"), Outcome.CLOSED),
        (Phase.RENDEZVOUS, Unusual(), Outcome.ERROR),
    ],
)
def test_the_protocol_names_the_outcome_of_its_exceptions(
    phase: Phase, error: BaseException, outcome: Outcome
) -> None:
    assert _outcome(phase, error) is outcome


def count(registry: CollectorRegistry, family: str, labels: dict[str, str]) -> float | None:
    return registry.get_sample_value(family, {"run_id": "run", **labels})


def test_metrics_take_the_outcome_they_are_told() -> None:
    registry = CollectorRegistry()
    observer = FanOut([MetricsObserver(RendezvousMetrics(registry), "run")])
    # A retry that leaves by an exception no observer knows by name is still a retry.
    with pytest.raises(Unusual), observer.phase(Phase.JOIN) as scope:
        scope.end(Outcome.RETRY)
        raise Unusual
    with pytest.raises(Unusual), observer.phase(Phase.JOIN):
        raise Unusual  # not told: an exception is an error
    with pytest.raises(Unusual), observer.phase(Phase.RENDEZVOUS) as scope:
        scope.end(Outcome.TIMEOUT)
        raise Unusual
    family = "etcd_rdzv_phase_duration_seconds_count"
    assert count(registry, family, {"phase": "join", "outcome": "retry"}) == 1
    assert count(registry, family, {"phase": "join", "outcome": "error"}) == 1
    rendezvous = "etcd_rdzv_rendezvous_duration_seconds_count"
    assert count(registry, rendezvous, {"outcome": "timeout"}) == 1
    assert count(registry, rendezvous, {"outcome": "error"}) == 0


def test_logs_and_traces_take_the_outcome_they_are_told(caplog: pytest.LogCaptureFixture) -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracing = TracingObserver(
        provider.get_tracer("test"), run_id="run", min_nodes=1, max_nodes=1, node="n"
    )
    logging_observer = LoggingObserver("run", "n")
    observer = FanOut([tracing, logging_observer])
    with caplog.at_level(logging.INFO, logger=EVENT_LOGGER_NAME):
        with pytest.raises(Unusual), observer.phase(Phase.JOIN) as scope:
            scope.end(Outcome.RETRY)
            raise Unusual
        with pytest.raises(Unusual), observer.phase(Phase.RENDEZVOUS) as scope:
            scope.end(Outcome.CLOSED)
            raise Unusual
    join, rendezvous = spans.get_finished_spans()
    assert join.attributes is not None and join.attributes["rdzv.outcome"] == "retry"
    assert join.status.is_ok
    assert rendezvous.attributes is not None and rendezvous.attributes["rdzv.outcome"] == "error"
    messages = [record.getMessage() for record in caplog.records]
    assert any("rendezvous_rejected_closed" in message for message in messages), messages
    assert not any("rendezvous_failed" in message for message in messages), messages
    logging_observer.close()
    provider.shutdown()
