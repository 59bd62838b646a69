"""Metrics observer, without I/O: a scrape always sees exactly one current phase."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import CollectorRegistry

from etcd_rdzv.telemetry.metrics import MetricsObserver, RendezvousMetrics
from etcd_rdzv.telemetry.observer import FanOut, Outcome, Phase

SCRAPES = 3000


def phases_at_one(registry: CollectorRegistry) -> list[str]:
    return [
        sample.labels["phase"]
        for family in registry.collect()
        if family.name == "etcd_rdzv_phase"
        for sample in family.samples
        if sample.value == 1
    ]


def test_a_scrape_sees_exactly_one_phase_while_phases_change() -> None:
    registry = CollectorRegistry()
    observer = MetricsObserver(RendezvousMetrics(registry), "run")
    stop = threading.Event()

    def rendezvous_forever() -> None:
        while not stop.is_set():
            with observer.phase(Phase.RENDEZVOUS):
                for phase in (Phase.SETUP, Phase.JOIN, Phase.CONFIRM, Phase.FINAL_WAIT):
                    with observer.phase(phase):
                        pass

    worker = threading.Thread(target=rendezvous_forever)
    worker.start()
    try:
        seen = [phases_at_one(registry) for _ in range(SCRAPES)]
    finally:
        stop.set()
        worker.join(10)
    assert all(len(current) == 1 for current in seen), [c for c in seen if len(c) != 1][:5]
    assert phases_at_one(registry) == ["done"]


def test_rank_and_world_size_are_published_when_a_rendezvous_completes() -> None:
    registry = CollectorRegistry()
    observer = MetricsObserver(RendezvousMetrics(registry), "run")
    with observer.phase(Phase.RENDEZVOUS) as scope:
        scope.annotate(version=3, rank=2, world_size=4)
    assert registry.get_sample_value("etcd_rdzv_rank", {"run_id": "run"}) == 2
    assert registry.get_sample_value("etcd_rdzv_world_size", {"run_id": "run"}) == 4
    assert (
        registry.get_sample_value(
            "etcd_rdzv_rendezvous_duration_seconds_count", {"run_id": "run", "outcome": "ok"}
        )
        == 1
    )


def test_the_nodes_a_job_needs_are_published_from_the_start() -> None:
    registry = CollectorRegistry()
    MetricsObserver(RendezvousMetrics(registry), "run", (2, 4))
    assert registry.get_sample_value("etcd_rdzv_min_nodes", {"run_id": "run"}) == 2
    assert registry.get_sample_value("etcd_rdzv_max_nodes", {"run_id": "run"}) == 4


def last_call_deadline(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("etcd_rdzv_last_call_deadline_seconds", {"run_id": "run"})


def test_the_last_call_deadline_shows_while_the_last_call_is_held() -> None:
    registry = CollectorRegistry()
    # Behind a FanOut, as in an agent: the new method must reach the metrics.
    observer = FanOut([MetricsObserver(RendezvousMetrics(registry), "run", (2, 4))])
    assert last_call_deadline(registry) == 0  # exported from the start: no last call held
    with observer.phase(Phase.RENDEZVOUS), observer.phase(Phase.LAST_CALL):
        observer.last_call_deadline(3, 1_700_000_030.5)
        assert last_call_deadline(registry) == 1_700_000_030.5
    assert last_call_deadline(registry) == 0


def test_the_last_call_deadline_is_cleared_however_the_last_call_ends() -> None:
    registry = CollectorRegistry()
    observer = MetricsObserver(RendezvousMetrics(registry), "run", (2, 4))
    with pytest.raises(TimeoutError), observer.phase(Phase.LAST_CALL):
        observer.last_call_deadline(3, 1_700_000_030.5)
        raise TimeoutError("the rendezvous deadline came first")
    assert last_call_deadline(registry) == 0
    with observer.phase(Phase.LAST_CALL) as scope:
        observer.last_call_deadline(4, 1_700_000_090.0)
        scope.end(Outcome.RETRY)  # the state moved on under the last call
    assert last_call_deadline(registry) == 0
