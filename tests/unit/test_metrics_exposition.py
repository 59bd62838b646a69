"""The run's metric families scrape exactly as prometheus_client's Counter, Gauge and Histogram
would: same names, labels, values, exemplars and `_created` series, in both formats."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

from etcd_rdzv.telemetry.metrics import Counter, Gauge, Histogram, RendezvousMetrics

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C


def generate_openmetrics(registry: CollectorRegistry) -> bytes:
    return bytes(openmetrics_latest(registry))  # type: ignore[no-untyped-call]


@pytest.fixture
def frozen_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # `_created` and exemplars carry the time: both sides read the same one.
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.25)


@pytest.fixture(params=[True, False], ids=["created", "no-created"])
def created_series(request: pytest.FixtureRequest) -> Iterator[None]:
    if not request.param:
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        prometheus_client.enable_created_metrics()  # type: ignore[no-untyped-call]


def reference(metrics: RendezvousMetrics, registry: CollectorRegistry) -> dict[str, Any]:
    """prometheus_client's own metrics, defined as ours, registered in the same order."""
    families: dict[str, Any] = {}
    for attribute, family in vars(metrics).items():
        if isinstance(family, Histogram):
            families[attribute] = prometheus_client.Histogram(
                family.name, family._documentation, family._labelnames, registry=registry,
                buckets=family.bounds,
            )  # fmt: skip
        elif isinstance(family, Counter):
            families[attribute] = prometheus_client.Counter(
                family.name, family._documentation, family._labelnames, registry=registry
            )
        elif isinstance(family, Gauge):
            families[attribute] = prometheus_client.Gauge(
                family.name, family._documentation, family._labelnames, registry=registry
            )
        else:
            registry.register(family)  # the phase collector, shared
    return families


@pytest.mark.usefixtures("frozen_time", "created_series")
def test_every_family_scrapes_as_prometheus_client_would() -> None:
    ours_registry, their_registry = CollectorRegistry(), CollectorRegistry()
    ours = RendezvousMetrics(ours_registry)
    theirs = reference(ours, their_registry)
    ours.current_phase.enter("run", "join")
    exemplar = {"trace_id": f"{TRACE_ID:032x}"}
    for attribute, family in vars(ours).items():
        if attribute not in theirs:
            continue
        other = theirs[attribute]
        extra = ["x"] * (len(family._labelnames) - 1)
        if isinstance(family, Histogram):
            for value in (0.003, 0.005, 0.0051, 7.0, 700.0, 0.0, -1.0, math.inf, math.nan):
                family.labels("run", *extra).observe(value)
                other.labels("run", *extra).observe(value)
            family.labels("run", *extra).observe(0.02, TRACE_ID)
            other.labels("run", *extra).observe(0.02, exemplar)
            family.labels("other", *extra)
            other.labels("other", *extra)
        elif isinstance(family, Counter):
            for amount in (1, 2.5, 0):
                family.labels("run", *extra).inc(amount)
                other.labels("run", *extra).inc(amount)
            family.labels("other", *extra)
            other.labels("other", *extra)
        else:
            for value in (3, -1.5, 1e20, 1_700_000_030.5):
                family.labels("run", *extra).set(value)
                other.labels("run", *extra).set(value)
    assert generate_latest(ours_registry) == generate_latest(their_registry)
    assert generate_openmetrics(ours_registry) == generate_openmetrics(their_registry)
    assert b'trace_id="0af7651916cd43dd8448eb211c80319c"' in generate_openmetrics(ours_registry)
    assert ours_registry._names_to_collectors.keys() == their_registry._names_to_collectors.keys()
    # A scrape asking for some series (name[]=...); families come in no set order there.
    restricted = ["etcd_rdzv_retries_total", "etcd_rdzv_rank"]
    assert sorted(generate_latest(ours_registry.restricted_registry(restricted)).split(b"\n")) == (
        sorted(generate_latest(their_registry.restricted_registry(restricted)).split(b"\n"))
    )


def test_bad_uses_fail_as_prometheus_client_fails() -> None:
    metrics = RendezvousMetrics(CollectorRegistry())
    with pytest.raises(ValueError):
        metrics.retries.labels("run", "join")  # a label missing
    with pytest.raises(ValueError):
        metrics.retries.labels("run", "join", "x").inc(-1)
    registry = CollectorRegistry()
    RendezvousMetrics(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        RendezvousMetrics(registry)
