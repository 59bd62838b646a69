"""Spans of real rendezvous, recorded in memory: the per-node and per-version traces."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from torch.distributed.elastic.rendezvous import RendezvousParameters, RendezvousTimeoutError

from etcd_rdzv.handler import EtcdRdzvHandler, create_handler
from etcd_rdzv.kv import KeyValue
from etcd_rdzv.telemetry import FanOut
from etcd_rdzv.telemetry.export import shutdown_provider
from etcd_rdzv.telemetry.tracing import TracingObserver
from etcd_rdzv_devtools.local_etcd import LocalEtcd
from tests.support.harness import leave_stale_frozen_version

PHASES_OF_A_MEMBER = {
    "rendezvous.join",
    "rendezvous.frozen_wait",
    "rendezvous.confirm",
    "rendezvous.final_wait",
}


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    yield InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


def handlers(
    etcd: LocalEtcd, provider: TracerProvider, run_id: str, count: int, **conf: str
) -> list[EtcdRdzvHandler]:
    """`count` nodes in this process, each with its own client and its own tracing observer."""
    min_nodes, max_nodes = int(conf.pop("min", count)), int(conf.pop("max", count))
    created = []
    for node in range(count):
        settings = {"timeout": "30", "last_call_timeout": "1", "metrics_port": "off", **conf}
        params = RendezvousParameters(
            backend="etcd-rdzv", endpoint=etcd.endpoint, run_id=run_id, min_nodes=min_nodes,
            max_nodes=max_nodes, **settings,
        )  # fmt: skip
        tracer = provider.get_tracer("test")
        observer = TracingObserver(
            tracer, run_id=run_id, min_nodes=min_nodes, max_nodes=max_nodes, node=f"node-{node}"
        )
        created.append(create_handler(params, observer=FanOut([observer])))
    return created


def rendezvous_all(nodes: Sequence[EtcdRdzvHandler]) -> None:
    with ThreadPoolExecutor(len(nodes)) as pool:
        for future in [pool.submit(node.next_rendezvous) for node in nodes]:
            future.result(timeout=60)


def by_node(spans: Sequence[ReadableSpan], name: str) -> dict[str, list[ReadableSpan]]:
    found: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        if span.name == name:
            found.setdefault(str((span.attributes or {})["rdzv.node"]), []).append(span)
    return found


def test_three_nodes_share_one_trace_per_version_and_link_to_it(
    etcd: LocalEtcd, provider: TracerProvider, exporter: InMemorySpanExporter, run_id: str
) -> None:
    nodes = handlers(etcd, provider, run_id, 3)
    rendezvous_all(nodes)
    for handler in nodes:
        handler.shutdown()
    spans = exporter.get_finished_spans()

    (version_root,) = [span for span in spans if span.name == "rendezvous.version"]
    assert version_root.parent is None
    assert (version_root.attributes or {})["rdzv.version"] == 1
    root_context = version_root.get_span_context()
    assert root_context is not None

    calls = by_node(spans, "rendezvous")
    assert sorted(calls) == ["node-0", "node-1", "node-2"]
    node_traces = {span.context.trace_id for (span,) in calls.values() if span.context}
    # Each node's call roots its own trace, distinct from the others' and from the version's.
    assert len(node_traces) == 3 and root_context.trace_id not in node_traces
    for node, (call,) in calls.items():
        attributes = call.attributes or {}
        assert attributes["rdzv.world_size"] == 3 and attributes["rdzv.version"] == 1, node
        assert [link.context.span_id for link in call.links] == [root_context.span_id], node

    # Every node's member phases sit in the version's trace, children of its root.
    for name in PHASES_OF_A_MEMBER:
        phase_spans = by_node(spans, name)
        assert sorted(phase_spans) == ["node-0", "node-1", "node-2"], name
        for node, phase_list in phase_spans.items():
            for span in phase_list:
                assert span.context is not None and span.parent is not None
                assert span.context.trace_id == root_context.trace_id, (name, node)
                assert span.parent.span_id == root_context.span_id, (name, node)
    ranks = {
        (span.attributes or {})["rdzv.rank"] for span in spans if span.name == "rendezvous.join"
    }
    assert ranks == {0, 1, 2}
    # Setup happens before a node knows its version: it stays in the node's own trace.
    for node, setups in by_node(spans, "rendezvous.setup").items():
        assert {span.context.trace_id for span in setups if span.context} <= node_traces, node


def test_last_call_span_only_on_the_node_that_holds_it(
    etcd: LocalEtcd, provider: TracerProvider, exporter: InMemorySpanExporter, run_id: str
) -> None:
    nodes = handlers(etcd, provider, run_id, 2, min="2", max="3")
    rendezvous_all(nodes)
    spans = exporter.get_finished_spans()
    (last_call,) = [span for span in spans if span.name == "rendezvous.last_call"]
    assert (last_call.attributes or {})["rdzv.rank"] == 1  # the join that reached min_nodes
    assert last_call.end_time and last_call.start_time
    assert (last_call.end_time - last_call.start_time) / 1e9 >= 1.0  # held the window open


def test_a_retried_join_shows_its_retry_and_both_attempts(
    etcd: LocalEtcd,
    kv: KeyValue,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    run_id: str,
) -> None:
    # A frozen version left by a dead run: the node waits until its TTL ends, then starts over
    # and opens the next version.
    leave_stale_frozen_version(kv, run_id)

    (node,) = handlers(etcd, provider, run_id, 1)
    node.next_rendezvous()
    spans = exporter.get_finished_spans()

    (call,) = [span for span in spans if span.name == "rendezvous"]
    retries = [event for event in call.events if event.name == "retry"]
    assert retries and (retries[0].attributes or {})["rdzv.phase"] == "setup"
    setups = [span for span in spans if span.name == "rendezvous.setup"]
    assert [(s.attributes or {})["rdzv.attempt"] for s in setups] == [1, 2]
    assert (setups[0].attributes or {})["rdzv.state"] == "frozen"
    (join,) = [span for span in spans if span.name == "rendezvous.join"]
    assert (join.attributes or {})["rdzv.version"] == 2
    # The first setup waited out the stale state and ended by starting over.
    assert [e.name for e in setups[0].events] == ["state_change", "start_over"]
    assert (setups[0].attributes or {})["rdzv.outcome"] == "retry"


def test_timeout_sets_error_status_and_records_the_exception(
    etcd: LocalEtcd, provider: TracerProvider, exporter: InMemorySpanExporter, run_id: str
) -> None:
    (node,) = handlers(etcd, provider, run_id, 1, min="2", max="2", timeout="1")
    with pytest.raises(RendezvousTimeoutError):
        node.next_rendezvous()
    (call,) = [span for span in exporter.get_finished_spans() if span.name == "rendezvous"]
    assert call.status.status_code is StatusCode.ERROR
    assert "RendezvousTimeoutError" in (call.status.description or "")
    (exception,) = [event for event in call.events if event.name == "exception"]
    assert str((exception.attributes or {})["exception.type"]).endswith("RendezvousTimeoutError")


def test_telemetry_that_raises_changes_nothing(etcd: LocalEtcd, run_id: str) -> None:
    class Broken(TracingObserver):
        def __init__(self) -> None:
            pass

        def __getattribute__(self, name: str) -> object:
            if name in ("shares_version_context", "__class__", "__dict__"):
                return object.__getattribute__(self, name)
            raise RuntimeError(f"telemetry broke in {name}")

    params = [
        RendezvousParameters(
            backend="etcd-rdzv",
            endpoint=etcd.endpoint,
            run_id=run_id,
            min_nodes=2,
            max_nodes=2,
            timeout="30",
            metrics_port="off",
        )
        for _ in range(2)
    ]
    nodes = [create_handler(p, observer=FanOut([Broken()])) for p in params]
    results: dict[int, int] = {}

    def join(index: int) -> None:
        results[index] = nodes[index].next_rendezvous().rank

    threads = [threading.Thread(target=join, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results.values()) == [0, 1]


def test_an_exporter_that_raises_changes_nothing(etcd: LocalEtcd, run_id: str) -> None:
    exported: list[int] = []

    class Raising(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            exported.append(len(spans))
            raise ConnectionError("the collector fell over")

    provider = TracerProvider()
    # The processor production uses: exports happen on its own thread, never the protocol's.
    provider.add_span_processor(BatchSpanProcessor(Raising()))
    nodes = handlers(etcd, provider, run_id, 2)
    rendezvous_all(nodes)
    shutdown_provider(provider)
    assert sum(exported) > 0  # the exporter really was called, and raised
    assert all(node.num_nodes_waiting() == 0 for node in nodes)
