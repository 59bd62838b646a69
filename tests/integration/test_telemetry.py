"""docs/telemetry.md against what real agents emit: spans, metrics and log events."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from etcd_rdzv.kv import KeyValue
from etcd_rdzv_devtools.local_etcd import LocalEtcd, free_loopback_ports
from tests.support.harness import (
    Participant,
    ParticipantGroup,
    check_membership,
    leave_stale_frozen_version,
)
from tests.support.waiting import wait_until

CONTRACT = Path(__file__).resolve().parents[2] / "docs" / "telemetry.md"


def documented(section: str, pattern: str) -> set[str]:
    """Names in the first column of the tables under `## section` in docs/telemetry.md."""
    text = CONTRACT.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(rf"^\| `({pattern})` \|", body, flags=re.MULTILINE))


def scrape(port: int) -> dict[str, list[Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def span_names(trace_file: Path) -> set[str]:
    names: set[str] = set()
    for line in trace_file.read_text().splitlines():
        for resource in json.loads(line)["resourceSpans"]:
            for scope in resource["scopeSpans"]:
                names.update(span["name"] for span in scope["spans"])
    return names


def events_of(participant: Participant) -> list[dict[str, Any]]:
    events = []
    for line in participant.log_path.read_text().splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))  # every JSON-looking line must parse
    return events


def test_every_documented_span_and_metric_is_emitted(
    tmp_path: Path, etcd: LocalEtcd, kv: KeyValue, run_id: str
) -> None:
    trace_file = tmp_path / "traces.jsonl"
    # A frozen version left by a dead run makes the first setup wait, then retry.
    leave_stale_frozen_version(kv, run_id)

    ports = free_loopback_ports(3)
    conf = {"last_call_timeout": "1", "keep_alive_ttl": "1.5", "trace_file": str(trace_file)}
    with ParticipantGroup(
        tmp_path, endpoint=etcd.endpoint, run_id=run_id, min_nodes=2, max_nodes=3, conf=conf
    ) as group:
        a, b, late = (
            group.start(1, backend="etcd-rdzv", conf={"metrics_port": str(port)})[0]
            for port in ports
        )
        check_membership(group.rendezvous_all(60, participants=[a, b]))  # retry, last call
        late.send({"cmd": "rendezvous"})  # waits for the next version
        wait_until(
            "the members see the late node",
            lambda: a.request({"cmd": "num_nodes_waiting"}, 10)["value"] > 0,
            timeout=20,
        )
        members = group.rendezvous_all(60, participants=[a, b])
        check_membership([*members, late.expect_rendezvous(60)])
        wait_until(
            "keep-alive refreshes",
            lambda: any(
                s.labels["result"] == "ok" and s.value > 0
                for s in scrape(ports[0]).get("etcd_rdzv_lease_refreshes", [])
            ),
            timeout=10,
        )
        families = [scrape(port) for port in ports]
        for participant in (a, b, late):
            assert participant.request({"cmd": "shutdown"}, 30)["value"] is True

    with_samples = {name for family in families for name, samples in family.items() if samples}
    for metric in documented("Metrics", r"etcd_rdzv_\w+"):
        # prometheus_client names counter families without their `_total` suffix.
        assert metric.removesuffix("_total") in with_samples, f"{metric} never emitted"
    assert documented("Traces", r"rendezvous[\w.]*") <= span_names(trace_file)


def test_log_lines_are_json_with_transitions_in_order(
    tmp_path: Path, etcd: LocalEtcd, run_id: str
) -> None:
    conf = {"last_call_timeout": "1", "trace_file": str(tmp_path / "traces.jsonl")}
    with ParticipantGroup(
        tmp_path, endpoint=etcd.endpoint, run_id=run_id, min_nodes=2, max_nodes=2, conf=conf
    ) as group:
        nodes = group.start(2, backend="etcd-rdzv")
        check_membership(group.rendezvous_all(60))
        logs = {node.name: events_of(node) for node in nodes}

    for name, events in logs.items():
        ours = [event for event in events if event.get("logger") == "etcd_rdzv.events"]
        assert ours, f"{name}: no events"
        assert all(event["run_id"] == run_id and event["node"] for event in ours), name
        names = [event["event"] for event in ours]
        # Written once each, in protocol order.
        assert names.count("joined") == 1 and names.count("rendezvous_completed") == 1, names
        assert names.index("joined") < names.index("rendezvous_completed"), names
        states = [e["to_state"] for e in ours if e["event"] == "state_transition"]
        assert [s for s in states if s in ("joinable", "frozen", "final")] == [
            "joinable", "frozen", "final",
        ], states  # fmt: skip
        for event in ours:
            if event["event"] in ("joined", "rendezvous_completed"):
                assert re.fullmatch(r"[0-9a-f]{32}", event["trace_id"]), event
                assert re.fullmatch(r"[0-9a-f]{16}", event["span_id"]), event
        completed = next(e for e in ours if e["event"] == "rendezvous_completed")
        assert completed["world_size"] == 2 and completed["version"] == 1


def test_a_collector_that_is_down_changes_nothing(
    tmp_path: Path, etcd: LocalEtcd, run_id: str
) -> None:
    # Nothing listens there: every export fails, off the rendezvous threads.
    collector = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_loopback_ports(1)[0]}"}
    with ParticipantGroup(
        tmp_path, endpoint=etcd.endpoint, run_id=run_id, min_nodes=2, max_nodes=2
    ) as group:
        nodes = group.start(2, backend="etcd-rdzv", env=collector)
        check_membership(group.rendezvous_all(60))
        # Shutdown flushes spans to the absent collector: bounded, and it still succeeds.
        assert all(node.request({"cmd": "shutdown"}, 15)["value"] is True for node in nodes)


def test_a_waiting_agent_says_where_it_waits_at_a_steady_interval(
    tmp_path: Path, etcd: LocalEtcd, run_id: str
) -> None:
    conf = {"timeout": "3", "progress_interval": "0.5"}
    with ParticipantGroup(
        tmp_path, endpoint=etcd.endpoint, run_id=run_id, min_nodes=2, max_nodes=2, conf=conf
    ) as group:
        (alone,) = group.start(1, backend="etcd-rdzv")
        alone.send({"cmd": "rendezvous"})
        assert alone.expect("error", 30)["type"] == "RendezvousTimeoutError"
        events = events_of(alone)

    waiting = [event for event in events if event.get("event") == "rendezvous_waiting"]
    assert len(waiting) >= 3, waiting
    for event in waiting:
        assert event["phase"] == "frozen_wait" and event["version"] == 1, event
        assert (event["participants"], event["min_nodes"]) == (1, 2), event
        assert event["run_id"] == run_id
    elapsed = [event["seconds"] for event in waiting]
    assert elapsed == sorted(elapsed) and elapsed[-1] > elapsed[0]
    # It stops with the rendezvous: none after the timeout was reported.
    timeout_at = next(i for i, e in enumerate(events) if e.get("event") == "rendezvous_timeout")
    assert all(e.get("event") != "rendezvous_waiting" for e in events[timeout_at:])
