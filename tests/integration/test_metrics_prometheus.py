"""A real Prometheus scrapes the agents' `/metrics` during a real rendezvous.

Each participant is a separate process serving its metrics on a loopback port the test chose;
Prometheus scrapes all of them every second, and every assertion is a PromQL query through
its HTTP API, so names, labels and values are checked exactly as dashboards and alerts see them.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from etcd_rdzv_devtools.local_etcd import LocalEtcd, reserved_loopback_ports
from tests.support.harness import ParticipantGroup, check_membership
from tests.support.prometheus import (
    JsonDict,
    LocalPrometheus,
    sample_value,
    scrape_config,
    start_local_prometheus,
    values_by,
)

BACKEND = "etcd-rdzv"
JOB = "etcd-rdzv"
LOOPBACK = "127.0.0.1"
# keep_alive_ttl 1.5: the rank key is refreshed every 0.5 s, so refreshes show up within a
# scrape or two.
FAST = {"last_call_timeout": "1", "keep_alive_ttl": "1.5", "timeout": "60"}
RENDEZVOUS_TIMEOUT = 60.0
# Prometheus applies new targets on a 5 s tick, then scrapes every second.
FIRST_SCRAPE_TIMEOUT = 20.0
SCRAPE_TIMEOUT = 10.0
# Prometheus may record a scrape up to 2 ms before it really started (it aligns timestamps to
# the scrape schedule); asking for a scrape this much later than a moment rules that out.
TIMESTAMP_MARGIN = 0.05

pytestmark = pytest.mark.timeout(180)


def by_instance(series: list[JsonDict]) -> dict[str, float]:
    return values_by(series, "instance")


def covers(instances: list[str]) -> Callable[[list[JsonDict]], bool]:
    """A `wait_for` predicate: the result has a sample from each of `instances`."""
    return lambda series: {s["metric"].get("instance") for s in series} >= set(instances)


def scraped_after(prometheus: LocalPrometheus, instances: list[str], moment: float) -> None:
    """Wait until every instance was scraped by a scrape that started after `moment`.

    From then on an instant query shows each agent's state as of `moment` or later.
    """
    prometheus.wait_for(
        f'timestamp(up{{job="{JOB}"}}) > {moment + TIMESTAMP_MARGIN:.3f}',
        covers(instances),
        SCRAPE_TIMEOUT,
        description=f"a scrape of every agent after {moment:.3f}",
    )


def test_prometheus_sees_every_agent_through_a_rendezvous(
    tmp_path: Path, etcd: LocalEtcd, run_id: str
) -> None:
    run = f'run_id="{run_id}"'
    with reserved_loopback_ports(3) as ports:
        instances = [f"{LOOPBACK}:{port}" for port in ports]
        prometheus = start_local_prometheus(
            {"scrape_configs": [scrape_config(JOB, instances, interval="1s")]},
            data_dir=tmp_path / "prometheus",
        )
    with (
        prometheus,
        ParticipantGroup(
            tmp_path / "participants",
            endpoint=etcd.endpoint,
            run_id=run_id,
            min_nodes=3,
            max_nodes=3,
            conf=FAST,
        ) as group,
    ):
        for port in ports:
            group.start(1, backend=BACKEND, conf={"metrics_port": str(port)})

        # Every agent is scraped once before the rendezvous: its idle state is on record, so
        # Prometheus sees the phases change and the membership appear.
        prometheus.wait_for_up(JOB, 3, FIRST_SCRAPE_TIMEOUT)
        idle = prometheus.query(f'etcd_rdzv_phase{{{run}, phase="done"}}')
        assert by_instance(idle) == dict.fromkeys(instances, 1.0)
        assert prometheus.query(f"etcd_rdzv_world_size{{{run}}}") == []

        results = group.rendezvous_all(RENDEZVOUS_TIMEOUT)
        completed = time.time()
        check_membership(results)
        assert {r["world_size"] for r in results} == {3}

        scraped_after(prometheus, instances, completed)

        up = prometheus.query(f'up{{job="{JOB}"}}')
        assert by_instance(up) == dict.fromkeys(instances, 1.0)
        health = {
            t["labels"]["instance"]: t["health"] for t in prometheus.targets()["activeTargets"]
        }
        assert health == dict.fromkeys(instances, "up")

        world_size = prometheus.query(f"etcd_rdzv_world_size{{{run}}}")
        assert by_instance(world_size) == dict.fromkeys(instances, 3.0)
        version = prometheus.query(f"etcd_rdzv_version{{{run}}}")
        assert by_instance(version) == dict.fromkeys(instances, 1.0)
        ranks = by_instance(prometheus.query(f"etcd_rdzv_rank{{{run}}}"))
        assert set(ranks) == set(instances)
        assert sorted(ranks.values()) == [0.0, 1.0, 2.0]

        done = prometheus.query(f"etcd_rdzv_phase{{{run}}} == 1")
        assert {(s["metric"]["instance"], s["metric"]["phase"]) for s in done} == {
            (instance, "done") for instance in instances
        }
        # The phase started over since the idle scrape: Prometheus recorded the change.
        changed = prometheus.query(
            f"changes(etcd_rdzv_phase_started_timestamp_seconds{{{run}}}[5m])"
        )
        assert set(by_instance(changed)) == set(instances)
        assert all(count >= 1 for count in by_instance(changed).values()), changed

        joins = prometheus.query(
            f'sum by (instance) (etcd_rdzv_phase_duration_seconds_count{{{run}, phase="join"}}) > 0'
        )
        assert set(by_instance(joins)) == set(instances)
        rendezvous = prometheus.query(
            f'etcd_rdzv_rendezvous_duration_seconds_count{{{run}, outcome="ok"}}'
        )
        assert by_instance(rendezvous) == dict.fromkeys(instances, 1.0)

        requests = prometheus.query(
            f'sum by (instance) (etcd_rdzv_etcd_requests_total{{{run}, result="ok"}}) > 0'
        )
        assert set(by_instance(requests)) == set(instances)

        # The rank keys are kept alive after the rendezvous, every 0.5 s, on every agent.
        refreshes = f'etcd_rdzv_lease_refreshes_total{{{run}, kind="rank", result="ok"}}'
        first = by_instance(
            prometheus.wait_for(
                f"{refreshes} > 0",
                covers(instances),
                SCRAPE_TIMEOUT,
                description="a rank keep-alive refresh on every agent",
            )
        )
        assert set(first) == set(instances)
        prometheus.wait_for(
            refreshes,
            lambda series: (
                all(sample_value(s) > first[s["metric"]["instance"]] for s in series)
                and covers(instances)(series)
            ),
            SCRAPE_TIMEOUT,
            description="rank keep-alive refreshes continuing on every agent",
        )
        failed = prometheus.query(f'etcd_rdzv_lease_refreshes_total{{{run}, result="failed"}} > 0')
        assert failed == []


# Long enough for a few scrapes of the holder while it waits, short enough to wait out.
LAST_CALL_SECONDS = 3.0
# Prometheus timestamps against the wall clock the agents read: the same host's.
CLOCK_SLACK = 0.1


def test_the_last_call_holder_publishes_when_its_last_call_ends(
    tmp_path: Path, etcd: LocalEtcd, run_id: str
) -> None:
    """Two nodes of at most three: the one whose join reached min_nodes holds the last call
    (torch's layout over v2, claims over v3). Prometheus sees its deadline, and only its,
    while it holds it, and 0 everywhere once the version froze."""
    run = f'run_id="{run_id}"'
    deadlines = f"etcd_rdzv_last_call_deadline_seconds{{{run}}}"
    with reserved_loopback_ports(2) as ports:
        instances = [f"{LOOPBACK}:{port}" for port in ports]
        prometheus = start_local_prometheus(
            {"scrape_configs": [scrape_config(JOB, instances, interval="1s")]},
            data_dir=tmp_path / "prometheus",
        )
    with (
        prometheus,
        ParticipantGroup(
            tmp_path / "participants",
            endpoint=etcd.endpoint,
            run_id=run_id,
            min_nodes=2,
            max_nodes=3,
            conf={**FAST, "last_call_timeout": f"{LAST_CALL_SECONDS:g}"},
        ) as group,
    ):
        for port in ports:
            group.start(1, backend=BACKEND, conf={"metrics_port": str(port)})
        prometheus.wait_for_up(JOB, 2, FIRST_SCRAPE_TIMEOUT)
        assert by_instance(prometheus.query(deadlines)) == dict.fromkeys(instances, 0.0)

        sent = time.time()
        for participant in group.members:
            participant.send({"cmd": "rendezvous"})
        held = by_instance(
            prometheus.wait_for(
                f"{deadlines} > 0",
                lambda series: len(series) == 1,
                SCRAPE_TIMEOUT,
                description="the deadline of the last call, on its holder alone",
            )
        )
        seen = time.time()
        [(holder, deadline)] = held.items()
        assert sent + LAST_CALL_SECONDS - CLOCK_SLACK <= deadline <= seen + LAST_CALL_SECONDS

        results = [p.expect_rendezvous(RENDEZVOUS_TIMEOUT) for p in group.members]
        completed = time.time()
        check_membership(results)
        # Nobody else came: the version froze when the last call ended, as announced.
        assert completed >= deadline - CLOCK_SLACK, (completed, deadline)
        scraped_after(prometheus, instances, completed)
        assert by_instance(prometheus.query(deadlines)) == dict.fromkeys(instances, 0.0)
        # The holder is the join that reached min_nodes: rank 1.
        assert by_instance(prometheus.query(f"etcd_rdzv_rank{{{run}}}"))[holder] == 1.0


def spans_named(trace_file: Path, name: str) -> list[JsonDict]:
    """Spans called `name` in a trace file (OTLP JSON lines, ids in hex)."""
    found = []
    for line in trace_file.read_text(encoding="utf-8").splitlines():
        for resource_spans in json.loads(line).get("resourceSpans", []):
            for scope_spans in resource_spans.get("scopeSpans", []):
                found += [s for s in scope_spans.get("spans", []) if s.get("name") == name]
    return found


def exemplar_trace_ids(found: list[JsonDict]) -> dict[str, set[str]]:
    """The `trace_id`s of `query_exemplars` results, by instance."""
    trace_ids: dict[str, set[str]] = {}
    for series in found:
        instance = series["seriesLabels"]["instance"]
        for exemplar in series["exemplars"]:
            trace_ids.setdefault(instance, set()).add(exemplar["labels"]["trace_id"])
    return trace_ids


def test_latency_exemplars_lead_to_the_traces(tmp_path: Path, etcd: LocalEtcd, run_id: str) -> None:
    run = f'run_id="{run_id}"'
    with reserved_loopback_ports(2) as ports:
        instances = [f"{LOOPBACK}:{port}" for port in ports]
        prometheus = start_local_prometheus(
            {"scrape_configs": [scrape_config(JOB, instances, interval="1s")]},
            data_dir=tmp_path / "prometheus",
        )
    trace_files = [tmp_path / f"trace-{index}.jsonl" for index in range(len(ports))]
    started = time.time()
    with (
        prometheus,
        ParticipantGroup(
            tmp_path / "participants",
            endpoint=etcd.endpoint,
            run_id=run_id,
            min_nodes=2,
            max_nodes=2,
            conf=FAST,
        ) as group,
    ):
        for port, trace_file in zip(ports, trace_files, strict=True):
            conf = {"metrics_port": str(port), "trace_file": str(trace_file)}
            group.start(1, backend=BACKEND, conf=conf)
        prometheus.wait_for_up(JOB, 2, FIRST_SCRAPE_TIMEOUT)
        check_membership(group.rendezvous_all(RENDEZVOUS_TIMEOUT))
        scraped_after(prometheus, instances, time.time())

        window = (started - 1, time.time() + 1)
        joins = exemplar_trace_ids(
            prometheus.query_exemplars(
                f'etcd_rdzv_phase_duration_seconds_bucket{{{run}, phase="join"}}', *window
            )
        )
        calls = exemplar_trace_ids(
            prometheus.query_exemplars(
                f"etcd_rdzv_rendezvous_duration_seconds_bucket{{{run}}}", *window
            )
        )
        # Exiting flushes each participant's spans to its trace file.
        assert group.stop_all() == {p.name: 0 for p in group.members}

    # Both joins belong to the version's trace, which both nodes share; each node's whole call
    # is its own trace. The exemplars name exactly these traces.
    version_traces = {
        span["traceId"] for path in trace_files for span in spans_named(path, "rendezvous.join")
    }
    assert len(version_traces) == 1, version_traces
    assert joins == dict.fromkeys(instances, version_traces)
    own_traces = {
        instance: {span["traceId"] for span in spans_named(path, "rendezvous")}
        for instance, path in zip(instances, trace_files, strict=True)
    }
    assert calls == own_traces
    assert len(set.union(*calls.values())) == len(instances)


def test_a_taken_metrics_port_disables_metrics_not_the_rendezvous(
    tmp_path: Path, etcd: LocalEtcd, run_id: str
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind((LOOPBACK, 0))
        squatter.listen()
        taken = int(squatter.getsockname()[1])
        with ParticipantGroup(
            tmp_path / "participants",
            endpoint=etcd.endpoint,
            run_id=run_id,
            min_nodes=2,
            max_nodes=2,
            conf=FAST,
        ) as group:
            [blocked] = group.start(1, backend=BACKEND, conf={"metrics_port": str(taken)})
            [free] = group.start(1, backend=BACKEND, conf={"metrics_port": "0"})
            results = group.rendezvous_all(RENDEZVOUS_TIMEOUT)

    check_membership(results)
    assert {r["world_size"] for r in results} == {2}
    blocked_log = blocked.log_path.read_text(encoding="utf-8", errors="replace")
    warnings = [
        line for line in blocked_log.splitlines() if "metrics disabled: cannot listen" in line
    ]
    assert len(warnings) == 1, blocked.stderr_tail()
    assert f"{LOOPBACK}:{taken}" in warnings[0], warnings[0]
    assert "metrics disabled" not in free.log_path.read_text(encoding="utf-8", errors="replace")
