"""Whole nodes over the in-memory etcd (the contract suite holds it to the real one), several
at once in threads: what a node tells about its rank under a rank policy (its membership, the
rendezvous span, log line and metric), and a whole job rendezvousing again."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from etcd_rdzv.config import RendezvousConfig, parse_endpoints
from etcd_rdzv.kv.memory import MemoryEtcd
from etcd_rdzv.layouts import waiting_nodes
from etcd_rdzv.rank_policy import RankPolicy
from etcd_rdzv.rendezvous import EtcdRendezvous, Membership
from etcd_rdzv.telemetry import Observer, Phase, PhaseScope
from etcd_rdzv.telemetry.logging import LoggingObserver
from etcd_rdzv.telemetry.metrics import MetricsObserver, RendezvousMetrics
from etcd_rdzv.telemetry.observer import FanOut
from etcd_rdzv.telemetry.tracing import TracingObserver

TIMEOUT = 30.0


class Annotations(Observer):
    """The attributes each node's whole rendezvous ended with, and the retries it reported."""

    def __init__(self) -> None:
        self.rendezvous: list[dict[str, Any]] = []
        self.retries: list[tuple[Phase | None, str]] = []

    def retry(
        self, phase: Phase | None, reason: str, attempt: int, detail: str | None = None
    ) -> None:
        self.retries.append((phase, reason))

    @contextmanager
    def phase(self, phase: Phase, **attributes: Any) -> Iterator[PhaseScope]:
        seen = dict(attributes)

        class Scope(PhaseScope):
            def annotate(self, **more: Any) -> None:
                seen.update(more)

        yield Scope()
        if phase is Phase.RENDEZVOUS:
            self.rendezvous.append(seen)


def node(
    etcd: MemoryEtcd, node_id: str, policy: RankPolicy, observer: Observer, nodes: int = 3
) -> EtcdRendezvous:
    config = RendezvousConfig(
        "run",
        parse_endpoints("memory:2379"),
        nodes,
        nodes,
        timeout=TIMEOUT,
        last_call_timeout=0.2,
        rank_policy=policy,
        node_id=node_id,
    )
    return EtcdRendezvous(etcd.client(), config, observer)


def rendezvous_together(nodes: list[EtcdRendezvous]) -> list[Membership]:
    results: list[Membership | BaseException | None] = [None] * len(nodes)

    def run(index: int) -> None:
        try:
            results[index] = nodes[index].next_rendezvous()
        except BaseException as error:  # reported below, with the others
            results[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(nodes))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT + 5)
    memberships = [r for r in results if isinstance(r, Membership)]
    assert len(memberships) == len(nodes), results
    return memberships


@pytest.mark.parametrize("policy", [RankPolicy("stable"), RankPolicy()])
def test_a_node_whose_agent_restarted_is_told_its_previous_rank_under_stable(
    policy: RankPolicy,
) -> None:
    etcd = MemoryEtcd()
    ids = ["a", "b", "c"]
    observers = {name: Annotations() for name in ids}
    nodes = {name: node(etcd, name, policy, observers[name]) for name in ids}
    try:
        first = dict(zip(ids, rendezvous_together(list(nodes.values())), strict=True))
        # c's agent restarts: a new process, knowing nothing, with the same node id.
        nodes["c"].stop()
        nodes["c"] = node(etcd, "c", policy, observers["c"])
        second = dict(zip(ids, rendezvous_together(list(nodes.values())), strict=True))
    finally:
        for each in nodes.values():
            each.stop()
    ranks = {name: m.rank for name, m in first.items()}
    told = {name: m.previous_rank for name, m in second.items()}
    if policy.kind == "stable":
        assert {name: m.rank for name, m in second.items()} == ranks
        assert told == ranks  # from the run's rank memory, the restarted node's too
    else:
        # Join order keeps no memory: the restarted node does not know; the others do.
        assert told == {"a": ranks["a"], "b": ranks["b"], "c": None}
    last = {name: observer.rendezvous[-1] for name, observer in observers.items()}
    for name, attributes in last.items():
        assert attributes["rank_policy"] == policy.kind
        assert attributes["previous_rank"] == told[name]
        assert attributes["rank"] == second[name].rank


def test_the_rank_changes_metric_counts_nodes_that_moved() -> None:
    registry = CollectorRegistry()
    observer = MetricsObserver(RendezvousMetrics(registry), "run", rank_policy="stable")

    def changes() -> float | None:
        return registry.get_sample_value(
            "etcd_rdzv_rank_changes_total", {"run_id": "run", "rank_policy": "stable"}
        )

    assert changes() == 0  # from the start, so increase() sees the first change
    for rank, previous in ((1, None), (1, 1), (2, 1), (0, 2)):
        with observer.phase(Phase.RENDEZVOUS) as scope:
            scope.annotate(
                version=3, rank=rank, world_size=3, rank_policy="stable", previous_rank=previous
            )
    assert changes() == 2


def test_the_span_and_the_log_line_carry_the_policy_and_the_previous_rank(
    caplog: pytest.LogCaptureFixture,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = TracingObserver(
        provider.get_tracer("t"), run_id="run", min_nodes=2, max_nodes=2, node="n:1"
    )
    observer = FanOut([tracing, LoggingObserver("run", "n:1", min_nodes=2, max_nodes=2)])
    with caplog.at_level(logging.INFO), observer.phase(Phase.RENDEZVOUS) as scope:
        scope.annotate(version=4, rank=1, world_size=2, rank_policy="stable", previous_rank=1)
    (span,) = exporter.get_finished_spans()
    assert span.attributes is not None
    assert span.attributes["rdzv.rank_policy"] == "stable"
    assert span.attributes["rdzv.previous_rank"] == 1
    (line,) = [r.getMessage() for r in caplog.records if "rendezvous_completed" in r.getMessage()]
    assert "rank_policy" in line and "stable" in line and "previous_rank" in line, line


def test_a_whole_job_rendezvousing_again_ends_its_version_without_a_fight() -> None:
    """Every member leaves the final version at once (a worker failed: every agent restarts
    its workers). Each ends the version itself: none counts itself waiting on the one state
    key, so nobody loses a compare-and-swap to the others."""
    etcd = MemoryEtcd()
    size = 8
    observers = [Annotations() for _ in range(size)]
    nodes = [node(etcd, f"n{i}", RankPolicy(), observers[i], size) for i in range(size)]
    try:
        first = rendezvous_together(nodes)
        kv = etcd.client()
        paths = nodes[0].paths
        second = rendezvous_together(nodes)
        ending = kv.get(paths.ending(first[0].version)).value
        waiting = waiting_nodes(kv.list(paths.version_dir(first[0].version)).entries)
    finally:
        for each in nodes:
            each.stop()
    assert {m.version for m in second} == {first[0].version + 1}
    assert sorted(m.rank for m in second) == list(range(size))
    assert '"reason":"members_left"' in ending
    # Nobody counted itself waiting for version 1 to end (each would have said so in a key).
    assert waiting == (), waiting
    lost = [
        reason
        for observer in observers
        for phase, reason in observer.retries
        if phase is Phase.WAIT_NEXT_VERSION and reason != "version_ended"
    ]
    assert lost == [], lost
