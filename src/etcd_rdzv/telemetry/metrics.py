"""Prometheus metrics of the rendezvous, served by the agent process.

Every series carries `run_id`; Prometheus adds `instance` when it scrapes, which tells nodes
apart. Histograms carry the trace id of the span they measured as an OpenMetrics exemplar.
The families are collectors of this module's own (`Counter`, `Gauge`, `Histogram`), which a
scrape sees exactly as prometheus_client's classes of those names.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from bisect import bisect_left
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

from opentelemetry import trace
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client import metrics as client_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from etcd_rdzv.telemetry.observer import Observer, Phase, PhaseScope

log = logging.getLogger(__name__)

# Phases of a healthy rendezvous take milliseconds; a stalled one takes minutes.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
# The `phase` gauge's value between rendezvous: training runs, nothing to wait for.
IDLE_PHASE = "done"


class RendezvousMetrics:
    """The metric families of one run, registered in `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def histogram(
            name: str, doc: str, labels: list[str], buckets: tuple[float, ...]
        ) -> Histogram:
            return Histogram(registry, name, doc, ["run_id", *labels], buckets)

        def counter(name: str, doc: str, labels: list[str]) -> Counter:
            return Counter(registry, name, doc, ["run_id", *labels])

        def gauge(name: str, doc: str, labels: list[str] | None = None) -> Gauge:
            return Gauge(registry, name, doc, ["run_id", *(labels or [])])

        self.phase_duration = histogram(
            "etcd_rdzv_phase_duration_seconds",
            "Time spent in one rendezvous phase, by phase and outcome (ok, retry, error).",
            ["phase", "outcome"],
            _LATENCY_BUCKETS,
        )
        self.rendezvous_duration = histogram(
            "etcd_rdzv_rendezvous_duration_seconds",
            "Time one next_rendezvous() call took, by outcome (ok, timeout, closed, error).",
            ["outcome"],
            _LATENCY_BUCKETS,
        )
        self.retries = counter(
            "etcd_rdzv_retries",
            "Times a phase started over or an etcd request was retried, by phase and reason.",
            ["phase", "reason"],
        )
        self.lease_refreshes = counter(
            "etcd_rdzv_lease_refreshes",
            "Keep-alive refreshes of TTL keys, by key kind (run, rank) and result (ok, failed, "
            "restored: re-created after it expired while etcd did not answer).",
            ["kind", "result"],
        )
        self.lease_refresh_duration = histogram(
            "etcd_rdzv_lease_refresh_duration_seconds",
            "Latency of one keep-alive refresh.",
            ["kind"],
            _REQUEST_BUCKETS,
        )
        self.transitions = counter(
            "etcd_rdzv_state_transitions",
            "Rendezvous state changes seen or made by this node.",
            ["from_state", "to_state"],
        )
        self.version = gauge("etcd_rdzv_version", "Rendezvous version this node last saw.")
        self.rank = gauge("etcd_rdzv_rank", "This node's rank in its last completed version.")
        self.world_size = gauge(
            "etcd_rdzv_world_size", "Participants of this node's last completed version."
        )
        self.participants = gauge(
            "etcd_rdzv_participants", "Participants in the version this node last saw."
        )
        self.nodes_waiting = gauge(
            "etcd_rdzv_nodes_waiting", "Nodes waiting to join the next version (final state)."
        )
        self.min_nodes = gauge(
            "etcd_rdzv_min_nodes", "The fewest nodes a version forms with (this node's --nnodes)."
        )
        self.max_nodes = gauge(
            "etcd_rdzv_max_nodes", "The most nodes a version takes (this node's --nnodes)."
        )
        self.last_call_deadline = gauge(
            "etcd_rdzv_last_call_deadline_seconds",
            "Unix time at which the last call this node holds ends; 0 while it holds none.",
        )
        self.current_phase = CurrentPhase()
        registry.register(self.current_phase)
        self.etcd_requests = counter(
            "etcd_rdzv_etcd_requests",
            "Requests to etcd, by operation and result.",
            ["operation", "result"],
        )
        self.unanswered_calls = counter(
            "etcd_rdzv_unanswered_calls",
            "Calls torch made while training (num_nodes_waiting, is_closed, shutdown) that etcd "
            "did not answer; each was answered from what the node last knew.",
            ["call"],
        )
        self.closed_while_training = counter(
            "etcd_rdzv_closed_while_training",
            "Times this node found its run closed while it trained: the job cannot "
            "rendezvous again after a failure.",
            [],
        )
        self.rank_changes = counter(
            "etcd_rdzv_rank_changes",
            "Rendezvous after which this node's rank differs from its rank in the final version "
            "before (as far as known, see rank_policy), by rank policy: summed over a job's "
            "nodes, the ranks a re-rendezvous moved.",
            ["rank_policy"],
        )
        self.etcd_request_duration = histogram(
            "etcd_rdzv_etcd_request_duration_seconds",
            "Latency of one etcd request, watches excluded (they wait by design).",
            ["operation"],
            _REQUEST_BUCKETS,
        )


_Series = TypeVar("_Series", bound="_CounterSeries | _GaugeSeries | _HistogramSeries")


class _Family(Collector, Generic[_Series]):
    """A metric family with labels, exported as prometheus_client's own would be.

    prometheus_client's labelled children validate their names again and make a lock per
    value (per bucket, for a histogram) when first used: some 35 µs per histogram series,
    paid inside the first rendezvous that uses it. A series here is a few floats behind its
    family's lock; the samples a scrape sees are the same, name, labels, value and exemplar.
    """

    _type = ""

    def __init__(
        self, registry: CollectorRegistry, name: str, documentation: str, labelnames: list[str]
    ) -> None:
        self.name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._lock = threading.Lock()
        self._series: dict[tuple[str, ...], _Series] = {}
        registry.register(self)

    def labels(self, *values: str) -> _Series:
        key = tuple(str(value) for value in values)
        series = self._series.get(key)
        if series is None:
            if len(key) != len(self._labelnames):
                raise ValueError(f"{self.name}: {len(key)} label values for {self._labelnames}")
            with self._lock:
                series = self._series.setdefault(key, self._new_series())
        return series

    def describe(self) -> list[Metric]:
        return [Metric(self.name, self._documentation, self._type)]

    def collect(self) -> list[Metric]:
        metric = Metric(self.name, self._documentation, self._type)
        # Read at each scrape, as prometheus_client does: disable_created_metrics() holds.
        created = client_metrics._use_created
        with self._lock:
            for values, series in self._series.items():
                labels = dict(zip(self._labelnames, values, strict=True))
                series.add_samples(metric, labels, created)
        return [metric]

    def _new_series(self) -> _Series:
        raise NotImplementedError


class _CounterSeries:
    __slots__ = ("_created", "_lock", "_value")

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._value = 0.0
        self._created = time.time()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        with self._lock:
            self._value += amount

    def add_samples(self, metric: Metric, labels: dict[str, str], created: bool) -> None:
        metric.add_sample(metric.name + "_total", labels, self._value)
        if created:
            metric.add_sample(metric.name + "_created", dict(labels), self._created)


class _GaugeSeries:
    __slots__ = ("_lock", "_value")

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._value = 0.0

    def set(self, value: float) -> None:
        with self._lock:
            self._value = float(value)

    def add_samples(self, metric: Metric, labels: dict[str, str], created: bool) -> None:
        metric.add_sample(metric.name, labels, self._value)


class _HistogramSeries:
    __slots__ = ("_counts", "_created", "_exemplars", "_family", "_lock", "_sum")

    def __init__(self, family: Histogram, lock: threading.Lock) -> None:
        self._family = family
        self._lock = lock
        self._counts = [0.0] * len(family.bounds)
        self._sum = 0.0
        # Per bucket, the last (trace id, value, time) observed in it; formatted when scraped.
        self._exemplars: list[tuple[int, float, float] | None] = [None] * len(family.bounds)
        self._created = time.time()

    def observe(self, amount: float, trace_id: int | None = None) -> None:
        """`trace_id`: of the span measured, the bucket's exemplar."""
        bucket = bisect_left(self._family.bounds, amount)  # the first bound >= amount
        with self._lock:
            self._sum += amount
            if not math.isnan(amount):  # in no bucket, as in prometheus_client
                self._counts[bucket] += 1
                if trace_id:
                    self._exemplars[bucket] = (trace_id, amount, time.time())

    def add_samples(self, metric: Metric, labels: dict[str, str], created: bool) -> None:
        name = metric.name
        total = 0.0
        for le, count, exemplar in zip(
            self._family.le_labels, self._counts, self._exemplars, strict=True
        ):
            total += count
            metric.add_sample(
                name + "_bucket",
                {**labels, "le": le},
                total,
                None,
                None if exemplar is None else _exemplar_of(*exemplar),
            )
        metric.add_sample(name + "_count", dict(labels), total)
        if self._family.bounds[0] >= 0:
            metric.add_sample(name + "_sum", dict(labels), self._sum)
        if created:
            metric.add_sample(name + "_created", dict(labels), self._created)


class Counter(_Family[_CounterSeries]):
    _type = "counter"

    def _new_series(self) -> _CounterSeries:
        return _CounterSeries(self._lock)


class Gauge(_Family[_GaugeSeries]):
    _type = "gauge"

    def _new_series(self) -> _GaugeSeries:
        return _GaugeSeries(self._lock)


class Histogram(_Family[_HistogramSeries]):
    _type = "histogram"

    def __init__(
        self,
        registry: CollectorRegistry,
        name: str,
        documentation: str,
        labelnames: list[str],
        buckets: tuple[float, ...],
    ) -> None:
        bounds = [float(bound) for bound in buckets]
        if bounds != sorted(bounds):
            raise ValueError("Buckets not in sorted order")
        if bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.bounds = tuple(bounds)
        # prometheus_client's own spelling of a bound (untyped there).
        self.le_labels = tuple(
            str(floatToGoString(bound))  # type: ignore[no-untyped-call]
            for bound in bounds
        )
        super().__init__(registry, name, documentation, labelnames)

    def _new_series(self) -> _HistogramSeries:
        return _HistogramSeries(self, self._lock)


def _exemplar_of(trace_id: int, value: float, at: float) -> Exemplar:
    return Exemplar({"trace_id": trace.format_trace_id(trace_id)}, value, at)


class CurrentPhase(Collector):
    """`etcd_rdzv_phase` and `etcd_rdzv_phase_started_timestamp_seconds`, from one snapshot.

    Separate gauges set one after the other could be scraped between two sets, showing no
    phase or two at 1; a scrape here sees exactly one, with the time it began.
    """

    _PHASES = (*(phase.value for phase in Phase), IDLE_PHASE)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: dict[str, tuple[str, float]] = {}

    def enter(self, run_id: str, phase: str) -> None:
        with self._lock:
            self._current[run_id] = (phase, time.time())

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            current = dict(self._current)
        phases = GaugeMetricFamily(
            "etcd_rdzv_phase",
            f"1 for the phase this node is in now, 0 for the others ({IDLE_PHASE}: none).",
            labels=["run_id", "phase"],
        )
        started = GaugeMetricFamily(
            "etcd_rdzv_phase_started_timestamp_seconds",
            "Unix time at which this node entered its current phase.",
            labels=["run_id"],
        )
        for run_id, (phase, since) in current.items():
            for name in self._PHASES:
                phases.add_metric([run_id, name], 1.0 if name == phase else 0.0)
            started.add_metric([run_id], since)
        yield phases
        yield started


class MetricsObserver(Observer):
    def __init__(
        self,
        metrics: RendezvousMetrics,
        run_id: str,
        nodes: tuple[int, int] | None = None,
        rank_policy: str = "join_order",
    ) -> None:
        """`nodes`: this node's (min_nodes, max_nodes), published as gauges: a dashboard or
        an alert then compares participants with what the job needs. `rank_policy`: its
        policy's name, whose rank-change counter exists from the start."""
        self._m = metrics
        self._run_id = run_id
        self._lock = threading.Lock()
        self._phases: list[Phase] = []
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._m.current_phase.enter(run_id, IDLE_PHASE)
        # Series that exist from the start at 0, so rate() and increase() see the first
        # failure instead of a series appearing out of nowhere.
        for outcome in ("ok", "timeout", "closed", "error"):
            self._series(self._m.rendezvous_duration, outcome)
        for kind in ("rank", "run"):
            for result in ("ok", "failed"):
                self._series(self._m.lease_refreshes, kind, result)
        # Only members' rank keys are re-created after an outage (see leases.KeepAlive).
        self._series(self._m.lease_refreshes, "rank", "restored")
        for call in ("num_nodes_waiting", "is_closed", "shutdown"):
            self._series(self._m.unanswered_calls, call)
        self._series(self._m.closed_while_training)
        self._series(self._m.rank_changes, rank_policy)
        if nodes is not None:
            self._series(self._m.min_nodes).set(nodes[0])
            self._series(self._m.max_nodes).set(nodes[1])
        # At 0 from the start, as while no last call is held: a dashboard tells "none" from
        # an agent that exports nothing.
        self._series(self._m.last_call_deadline).set(0)

    @contextmanager
    def phase(self, phase: Phase, **attributes: Any) -> Iterator[PhaseScope]:
        scope = _MetricsScope(self, attributes)
        with self._lock:
            self._phases.append(phase)
            self._m.current_phase.enter(self._run_id, phase.value)
        started = time.monotonic()
        failed = True
        try:
            yield scope
            failed = False
        finally:
            outcome = scope.ended(failed).value
            elapsed = time.monotonic() - started
            exemplar = _trace_id()
            if phase is Phase.RENDEZVOUS:
                self._series(self._m.rendezvous_duration, outcome).observe(elapsed, exemplar)
                if outcome == "ok":
                    scope.publish_membership()
            else:
                self._series(self._m.phase_duration, phase.value, outcome).observe(
                    elapsed, exemplar
                )
            if phase is Phase.LAST_CALL:
                # The deadline told inside the phase; whatever ended it, the last call is over.
                self._series(self._m.last_call_deadline).set(0)
            with self._lock:
                self._phases.remove(phase)
                current = self._phases[-1].value if self._phases else IDLE_PHASE
                self._m.current_phase.enter(self._run_id, current)

    def retry(
        self, phase: Phase | None, reason: str, attempt: int, detail: str | None = None
    ) -> None:
        # Without a phase the retry comes from the etcd transport, on whichever thread.
        self._series(self._m.retries, phase.value if phase else "etcd", reason).inc()

    def transition(
        self, version: int | None, before: str | None, after: str, participants: int, made: bool
    ) -> None:
        self._series(self._m.transitions, before or "none", after).inc()

    def state_seen(self, version: int | None, status: str, participants: int) -> None:
        if version is not None:
            self._series(self._m.version).set(version)
        self._series(self._m.participants).set(participants)

    def nodes_waiting(self, count: int) -> None:
        self._series(self._m.nodes_waiting).set(count)

    def last_call_deadline(self, version: int, ends_at: float) -> None:
        self._series(self._m.last_call_deadline).set(ends_at)

    def lease_refresh(self, kind: str, ok: bool, seconds: float, error: str | None = None) -> None:
        self._series(self._m.lease_refreshes, kind, "ok" if ok else "failed").inc()
        self._series(self._m.lease_refresh_duration, kind).observe(seconds, _trace_id())

    def etcd_request(self, operation: str, result: str, seconds: float) -> None:
        self._series(self._m.etcd_requests, operation, result).inc()
        if operation != "watch":
            self._series(self._m.etcd_request_duration, operation).observe(seconds, _trace_id())

    def lease_restored(self, kind: str, key: str) -> None:
        self._series(self._m.lease_refreshes, kind, "restored").inc()

    def etcd_unanswered(
        self, call: str, reason: str, detail: str, failures: int, outage_seconds: float
    ) -> None:
        self._series(self._m.unanswered_calls, call).inc()

    def closed_while_training(self, version: int) -> None:
        self._series(self._m.closed_while_training).inc()

    def _series(self, metric: _Family[_Series], *labels: str) -> _Series:
        """`metric.labels(run_id, *labels)`, looked up once: one dict lookup per call after."""
        key = (id(metric), labels)
        child: _Series | None = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(self._run_id, *labels)
        return child

    def _membership(
        self, rank: int, world_size: int, previous_rank: int | None, rank_policy: str
    ) -> None:
        self._series(self._m.rank).set(rank)
        self._series(self._m.world_size).set(world_size)
        if previous_rank is not None and previous_rank != rank:
            self._series(self._m.rank_changes, rank_policy).inc()


class _MetricsScope(PhaseScope):
    def __init__(self, observer: MetricsObserver, attributes: dict[str, Any]) -> None:
        self._observer = observer
        self._attributes = dict(attributes)

    def annotate(self, **attributes: Any) -> None:
        self._attributes.update(attributes)
        if "nodes_waiting" in attributes and attributes["nodes_waiting"] is not None:
            self._observer.nodes_waiting(int(attributes["nodes_waiting"]))

    def publish_membership(self) -> None:
        rank, world_size = self._attributes.get("rank"), self._attributes.get("world_size")
        previous = self._attributes.get("previous_rank")
        policy = str(self._attributes.get("rank_policy") or "join_order")
        if rank is not None and world_size is not None:
            self._observer._membership(
                int(rank), int(world_size), None if previous is None else int(previous), policy
            )


class MetricsServer:
    """The HTTP endpoint Prometheus scrapes; a port already taken disables it, never the agent."""

    def __init__(self, registry: CollectorRegistry, addr: str, port: int) -> None:
        self.addr = addr
        self.port: int | None = None
        self._server: Any = None
        try:
            self._server, _ = start_http_server(port, addr=addr, registry=registry)
        except OSError as error:
            log.warning(
                "etcd-rdzv metrics disabled: cannot listen on %s:%d (%s); set "
                "--rdzv-conf metrics_port=0 for a free port",
                addr,
                port,
                error,
            )
            return
        self.port = int(self._server.server_port)
        log.info("etcd-rdzv metrics at http://%s:%d/metrics", addr, self.port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _trace_id() -> int | None:
    """The current span's trace id, a histogram's exemplar, or None outside a span."""
    context = trace.get_current_span().get_span_context()
    return context.trace_id if context.is_valid else None
