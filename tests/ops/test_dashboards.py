"""The Grafana dashboards: well formed, on the contract, and every panel shows real data.

The structural tests read the JSON as Grafana's file provisioning does. The live test runs
real rendezvous under a real Prometheus that scrapes the agents and etcd, and sends every
panel's query to Prometheus as Grafana would (variables replaced, range queries). It requires
data from each: over a healthy run (with a retry, a last call, a late node and a
re-rendezvous), and over each situation an operator opens the dashboards for: a stall, a node
lost after a rendezvous, an etcd outage. A panel that rightly shows nothing in a situation is
named there, with the reason, and must then show nothing.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from etcd_rdzv.kv import KeyValue
from etcd_rdzv_devtools.local_etcd import LocalEtcd, free_loopback_ports
from tests.conftest import EtcdFactory, only_etcd_api, open_kv
from tests.ops import dashboards
from tests.ops.dashboards import JsonDict, Target
from tests.support.harness import (
    Participant,
    ParticipantGroup,
    check_membership,
    leave_stale_frozen_version,
    rendezvous_together,
    wait_ready,
)
from tests.support.prometheus import (
    LocalPrometheus,
    PrometheusError,
    sample_value,
    scrape_config,
    start_local_prometheus,
)

OVERVIEW = "etcd-rdzv-overview"
ETCD_BOARD = "etcd-rdzv-etcd"
AGENT_JOB = "etcd-rdzv"
ETCD_JOB = "etcd"
LOOPBACK = "127.0.0.1"
BACKEND = "etcd-rdzv"
# keep_alive_ttl 1.5: rank keys are refreshed every 0.5 s, a steady flow within seconds.
# last_call_timeout 2: longer than a scrape interval, so that Prometheus surely sees a last call.
# request_timeout 2: while etcd is paused, requests fail within the checked window.
FAST = {
    "last_call_timeout": "2",
    "keep_alive_ttl": "1.5",
    "timeout": "60",
    "request_timeout": "2",
}
# The stalled run needs all of three nodes and gets two; they wait longer than the test runs.
STALLED_NODES = 3
STALLED_CONF = {"request_timeout": "2"}
RENDEZVOUS_TIMEOUT = 60.0
FIRST_SCRAPE_TIMEOUT = 20.0
SCRAPE_TIMEOUT = 10.0
# What Grafana sends for a 1 s scrape interval (the data source's setting) and a 1 s step:
# $__rate_interval is max($__interval + scrape interval, 4 * scrape interval).
STEP_SECONDS = 1.0
SCRAPE_INTERVAL_SECONDS = 1.0
RATE_INTERVAL_SECONDS = 4
# Every panel must show data within this long after the run; nearly all do at once.
DATA_TIMEOUT = 15.0

pytestmark = pytest.mark.timeout(240)

# Targets that show 0 in a healthy run: an error or failure counter, or a value that is 0
# once every agent trains. Every other target must show a non-zero value somewhere.
ZERO_WHEN_HEALTHY = {
    (OVERVIEW, "Agents up", "B"): "no agent is down",
    (OVERVIEW, "Agents", "B"): "every agent trains at the end: stuck for 0 s",
    (OVERVIEW, "Failed keep-alive refreshes", "A"): "no refresh fails",
    (OVERVIEW, "etcd request errors", "A"): "etcd answers every request",
    (ETCD_BOARD, "Pending proposals", "A"): "proposals commit at once",
    (ETCD_BOARD, "Leader changes", "A"): "the one member was elected at its start",
    (ETCD_BOARD, "Raft proposals per second", "B"): "no proposal fails",
    (ETCD_BOARD, "Raft proposals per second", "C"): "no apply is slow",
    (ETCD_BOARD, "gRPC failed requests per second", "A"): "no request fails (Canceled is left out)",
}
# A panel: (dashboard uid, panel title).
Panel = tuple[str, str]
# Why a target's result would leave its panel looking empty; None when it shows data.
Shortfall = Callable[[Target, list[JsonDict]], str | None]

# Panels that rightly show nothing in a situation, with the reason; the test checks that they
# do show nothing, so that a reason cannot outlive its truth. Latency panels show only what
# ended within each window.
NO_PHASE_ENDS = "no phase ends within the window: every node stays where it is"
NO_CALL_ENDS = "no next_rendezvous() call ends within the window"
NO_UNARY_REQUEST = (
    "etcd serves no unary request: the nodes only watch and keep leases alive, both streams"
)
STALLED_EMPTY: dict[Panel, str] = {
    (OVERVIEW, "Phase latency p50 / p95 / p99"): NO_PHASE_ENDS,
    (OVERVIEW, "Rendezvous call duration p50 / p95 / p99"): NO_CALL_ENDS,
    (OVERVIEW, "Keep-alive refresh latency p50 / p99"): (
        "no key is refreshed: no node is a member yet, so none has a rank key, and the run's "
        "key is refreshed once every 40 minutes"
    ),
    (OVERVIEW, "etcd request latency p50 / p99"): (
        "the waiting nodes only watch, which is not timed (it waits on purpose)"
    ),
    (ETCD_BOARD, "gRPC latency p50 / p99"): NO_UNARY_REQUEST,
}
NODE_LOST_EMPTY: dict[Panel, str] = {
    (OVERVIEW, "Time in current rendezvous phase"): "the survivors train: none is in a phase",
    (OVERVIEW, "Phase latency p50 / p95 / p99"): NO_PHASE_ENDS,
    (OVERVIEW, "Rendezvous call duration p50 / p95 / p99"): NO_CALL_ENDS,
    (ETCD_BOARD, "gRPC latency p50 / p99"): NO_UNARY_REQUEST,
}
# The etcd dashboard's panels that read etcd's own metrics.
ETCD_OWN_METRICS = (
    "Has leader",
    "Pending proposals",
    "Leader changes",
    "Raft proposals per second",
    "Memory",
    "WAL fsync p50 / p99",
    "WAL writes",
    "Database size",
    "gRPC requests per second",
    "gRPC latency p50 / p99",
    "MVCC operations per second",
    "Watches",
    "Keys",
    "Leases granted / renewed per second",
    "Leases expired",
)
ETCD_DOWN_EMPTY: dict[Panel, str] = {
    (OVERVIEW, "Phase latency p50 / p95 / p99"): NO_PHASE_ENDS,
    (OVERVIEW, "Rendezvous call duration p50 / p95 / p99"): NO_CALL_ENDS,
    **dict.fromkeys(
        [(ETCD_BOARD, title) for title in ETCD_OWN_METRICS],
        "a paused etcd answers no scrape either: its own metrics are gone (Members up says so)",
    ),
}

# Panels of rare events: a Prometheus that starts after they happened must not show them
# as if they had just happened.
PAST_EVENTS = (
    "Rendezvous outcomes",
    "Retries by phase and reason",
    "State transitions",
    "Phase latency p50 / p95 / p99",
    "Rendezvous call duration p50 / p95 / p99",
)


def all_dashboards() -> list[tuple[Path, JsonDict]]:
    return [(path, dashboards.load(path)) for path in dashboards.dashboard_files()]


def by_uid() -> dict[str, JsonDict]:
    return {board["uid"]: board for _, board in all_dashboards()}


def provisioned(source: object) -> bool:
    """Whether a panel's or target's `datasource` names a provisioned data source."""
    if not isinstance(source, dict):
        return False
    uid, kind = source.get("uid"), source.get("type")
    return isinstance(uid, str) and dashboards.PROVISIONED_DATASOURCES.get(uid) == kind


# --- structure -------------------------------------------------------------------------------


def test_dashboards_are_provisionable_files_with_stable_uids() -> None:
    found = all_dashboards()
    names = {path.name for path, _ in found}
    assert set(dashboards.DASHBOARD_UIDS) <= names, f"missing dashboards in {names}"
    uids = [board.get("uid") for _, board in found]
    assert len(uids) == len(set(uids)), f"dashboard uids repeat: {uids}"
    for path, board in found:
        expected = dashboards.DASHBOARD_UIDS.get(path.name)
        if expected is not None:
            assert board["uid"] == expected, path.name
        # Provisioned from files: no database id; the uid is what links and URLs use.
        assert board.get("id") is None, f"{path.name}: id must be null"
        assert board.get("schemaVersion") == dashboards.SCHEMA_VERSION, path.name
        assert board.get("title"), path.name


def test_every_panel_is_described_and_uses_a_provisioned_datasource() -> None:
    allowed = dashboards.PROVISIONED_DATASOURCES
    problems: list[str] = []
    for path, board in all_dashboards():
        ids = [panel.get("id") for panel in dashboards.panels(board)]
        repeated = sorted({i for i in ids if ids.count(i) > 1}, key=str)
        if repeated or None in ids:
            problems.append(f"{path.name}: panel ids repeat or are missing: {repeated}")
        for panel in dashboards.data_panels(board):
            where = f"{path.name} / panel {panel.get('id')} {panel.get('title')!r}"
            if not str(panel.get("title", "")).strip():
                problems.append(f"{where}: no title")
            if not str(panel.get("description", "")).strip():
                problems.append(f"{where}: no description")
            sources = [panel.get("datasource")]
            sources += [target.get("datasource") for target in panel.get("targets", [])]
            for source in sources:
                if not provisioned(source):
                    problems.append(f"{where}: datasource {source} is not one of {allowed}")
            refs = [target.get("refId") for target in panel.get("targets", [])]
            if not refs or len(refs) != len(set(refs)):
                problems.append(f"{where}: no targets, or repeated refIds {refs}")
            for target in panel.get("targets", []):
                if not str(target.get("expr", "")).strip():
                    problems.append(f"{where}: target {target.get('refId')} has no expr")
        for name, variable in dashboards.variables(board).items():
            source = variable.get("datasource")
            if variable.get("type") == "query" and not provisioned(source):
                problems.append(f"{path.name}: variable {name} datasource {source}")
    assert not problems, "\n".join(problems)


def test_panels_sit_in_their_rows_without_overlapping() -> None:
    """Grafana lays out an expanded row's panels by position: a panel listed under a row but
    placed above it, or two panels on the same cells, end up somewhere else."""
    for path, board in all_dashboards():
        placed: list[tuple[int, int, int, int, str]] = []
        previous = (-1, -1)
        for panel in board["panels"]:  # collapsed rows' own panels are placed when expanded
            grid = panel["gridPos"]
            x, y, w, h = grid["x"], grid["y"], grid["w"], grid["h"]
            title = f"{path.name}: {panel['title']!r}"
            assert x >= 0 and x + w <= 24 and w > 0 and h > 0, f"{title} at {grid}"
            assert (y, x) > previous, f"{title} at {grid} is listed after a panel below it"
            previous = (y, x)
            for ox, oy, ow, oh, other in placed:
                apart = x >= ox + ow or ox >= x + w or y >= oy + oh or oy >= y + h
                assert apart, f"{title} at {grid} overlaps {other}"
            placed.append((x, y, w, h, title))


def test_the_provisioning_declares_the_datasources_the_dashboards_use() -> None:
    files = dashboards.provisioned_datasource_files()
    if not files:
        # Grafana's provisioning is written separately; the dashboards hold to the fixed
        # interface (checked above) until it exists.
        return
    declared: dict[str, str] = {}
    texts = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        texts.append(text)
        declared.update(dashboards.provisioned_datasources(text))
    for uid, kind in dashboards.PROVISIONED_DATASOURCES.items():
        assert declared.get(uid) == kind, f"{[str(f) for f in files]} declare {declared}"
    # The latency panels' exemplars carry `trace_id`; Grafana links them to Tempo only if the
    # Prometheus data source says so.
    joined = "\n".join(texts)
    assert re.search(r"exemplarTraceIdDestinations:", joined), "no exemplar link to traces"
    assert re.search(r"datasourceUid:\s*['\"]?tempo\b", joined), "exemplars must link to tempo"
    assert re.search(r"name:\s*['\"]?trace_id\b", joined), "exemplar label must be trace_id"


def test_template_variables_are_the_fixed_interface() -> None:
    boards = by_uid()
    overview = dashboards.variables(boards["etcd-rdzv-overview"])
    assert (
        dashboards.variable_query(overview["run_id"]) == "label_values(etcd_rdzv_version, run_id)"
    )
    assert dashboards.variable_query(overview["instance"]) == (
        'label_values(etcd_rdzv_version{run_id=~"$run_id"}, instance)'
    )
    assert overview["run_id"]["multi"] and overview["run_id"]["includeAll"]
    assert overview["instance"]["multi"] and overview["instance"]["includeAll"]
    etcd_vars = dashboards.variables(boards["etcd-rdzv-etcd"])
    assert f'job="{ETCD_JOB}"' in dashboards.variable_query(etcd_vars["instance"])
    # Every variable a query uses is defined (or one of Grafana's own).
    for uid, board in boards.items():
        values = dict.fromkeys([*dashboards.variables(board), *dashboards.GRAFANA_BUILTINS], "x")
        for target in dashboards.targets(board):
            dashboards.interpolate(target.expr, values)  # raises on an unknown variable
        assert all(t.dashboard == uid for t in dashboards.targets(board))


def test_queries_read_only_documented_metrics() -> None:
    documented = dashboards.documented_metrics()
    assert "etcd_rdzv_phase_duration_seconds" in documented, "contract table not parsed"
    undocumented = {
        f"{target.where()}: {name}"
        for _, board in all_dashboards()
        for target in dashboards.targets(board)
        for name in dashboards.our_metrics(target.expr)
        if not dashboards.is_documented(name, documented)
    }
    assert not undocumented, "not in docs/telemetry.md:\n" + "\n".join(sorted(undocumented))


def test_latency_panels_link_to_traces() -> None:
    traced = (
        "etcd_rdzv_phase_duration_seconds_bucket",
        "etcd_rdzv_rendezvous_duration_seconds_bucket",
    )
    for _, board in all_dashboards():
        for panel in dashboards.data_panels(board):
            exprs = [str(t.get("expr", "")) for t in panel.get("targets", [])]
            if any(name in expr for expr in exprs for name in traced):
                assert any(t.get("exemplar") for t in panel["targets"]), panel["title"]


# --- live ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """What a dashboard shows: the runs and agents its variables select, over a time range
    from `range_start` to now (Unix times), of which the part from `since` is checked."""

    run_ids: tuple[str, ...]
    agents: tuple[str, ...]  # instance labels
    etcd_instance: str
    range_start: float
    since: float

    def checked_from(self, since: float) -> Selection:
        """The same dashboard, checked from `since` on: a situation within its range."""
        return replace(self, since=since)

    def variables(self, dashboard: str, end: float) -> dict[str, str]:
        """What Grafana puts for the dashboard's variables."""
        instances = self.agents if dashboard == OVERVIEW else (self.etcd_instance,)
        return {
            "run_id": dashboards.grafana_regex(self.run_ids),
            "instance": dashboards.grafana_regex(instances),
            "__interval": f"{STEP_SECONDS:g}s",
            "__rate_interval": f"{RATE_INTERVAL_SECONDS}s",
            "__rate_interval_ms": str(RATE_INTERVAL_SECONDS * 1000),
            "__range": f"{math.ceil(end - self.range_start)}s",
        }


@dataclass(frozen=True)
class Situation:
    """Trouble the dashboards must show: what to select while it lasts, and the panels that
    rightly show nothing then, each with the reason."""

    name: str
    selection: Selection
    empty: Mapping[Panel, str]


def prometheus_for(tmp_path: Path, name: str, agents: Sequence[str], etcd: str) -> LocalPrometheus:
    config = {
        "scrape_configs": [
            scrape_config(AGENT_JOB, agents, interval=f"{SCRAPE_INTERVAL_SECONDS:g}s"),
            scrape_config(ETCD_JOB, [etcd], interval=f"{SCRAPE_INTERVAL_SECONDS:g}s"),
        ]
    }
    # Every rule file there is: a panel may read a recording rule.
    return start_local_prometheus(
        config, data_dir=tmp_path / name, rule_files=dashboards.rule_files()
    )


@contextmanager
def stopping(prometheus: LocalPrometheus) -> Iterator[LocalPrometheus]:
    try:
        yield prometheus
    finally:
        prometheus.stop()


@contextmanager
def resumed_at_exit(etcd: LocalEtcd) -> Iterator[LocalEtcd]:
    """etcd, continued if paused when the block ends: the agents then stop cleanly."""
    try:
        yield etcd
    finally:
        if etcd.is_running():
            etcd.resume()


def wait_until_waiting_seen(member: Participant) -> None:
    """Poll like torchrun's agent until the member sees a node waiting."""
    deadline = time.monotonic() + SCRAPE_TIMEOUT
    while member.request({"cmd": "num_nodes_waiting"}, SCRAPE_TIMEOUT)["value"] == 0:
        assert time.monotonic() < deadline, f"{member} never saw the late node waiting"
        time.sleep(0.1)


def start_agents(group: ParticipantGroup, agents: Sequence[str], traces: Path) -> list[Participant]:
    """One participant per agent (`host:port`), serving its metrics on that port; not yet
    ready (`wait_ready` them all at once)."""
    spawned = []
    for agent in agents:
        port = agent.rsplit(":", 1)[1]
        # A trace file turns tracing on: histograms then carry exemplars.
        conf = {"metrics_port": port, "trace_file": str(traces / f"agent-{port}.jsonl")}
        spawned += group.spawn(1, backend=BACKEND, conf=conf)
    return spawned


def rendezvous_with_retry_and_late_node(
    prometheus: LocalPrometheus,
    kv: KeyValue,
    run_id: str,
    participants: Sequence[Participant],
    agents: Sequence[str],
) -> None:
    """Two nodes rendezvous past a stale frozen version (a retry) and through a last call; a
    late node waits while Prometheus watches, and all three re-rendezvous."""
    first, second, late = participants
    # A frozen version left by a dead run: the first setup waits for it to expire, then
    # starts over (a retry).
    leave_stale_frozen_version(kv, run_id)
    for member in (first, second):
        member.send({"cmd": "rendezvous"})
    # The second join reaches min_nodes and holds the last call: seen, so that the last-call
    # panel has something to show.
    prometheus.wait_for(
        f'max_over_time(etcd_rdzv_last_call_deadline_seconds{{run_id="{run_id}"}}[1m]) > 0',
        lambda series: len(series) == 1,
        RENDEZVOUS_TIMEOUT,
        description="a last call seen on its holder",
    )
    check_membership([member.expect_rendezvous(RENDEZVOUS_TIMEOUT) for member in (first, second)])

    # The late node waits for the running version to end, long enough for Prometheus to
    # see it in that phase (what the stuck-node panels show); the members see it waiting.
    late.send({"cmd": "rendezvous"})
    prometheus.wait_for(
        f'etcd_rdzv_phase{{run_id="{run_id}", instance="{agents[-1]}",'
        ' phase="wait_next_version"} == 1',
        lambda series: len(series) == 1,
        SCRAPE_TIMEOUT,
        description="the late node seen waiting for the next version",
    )
    for member in (first, second):
        wait_until_waiting_seen(member)
    members = rendezvous_together([first, second], RENDEZVOUS_TIMEOUT)
    results = [*members, late.expect_rendezvous(RENDEZVOUS_TIMEOUT)]
    check_membership(results)
    assert {r["world_size"] for r in results} == {3}


def values_of(series: list[JsonDict]) -> list[float]:
    found = []
    for one in series:
        points = one.get("values") or ([one["value"]] if "value" in one else [])
        found += [float(value) for _, value in points]
    return found


def finite_values(series: list[JsonDict]) -> list[float]:
    return [value for value in values_of(series) if math.isfinite(value)]


def last_values(series: list[JsonDict], label: str) -> dict[str, float]:
    """Each series' last value, by `label` ("" for a series without it)."""
    return {
        one["metric"].get(label, ""): float((one.get("values") or [one.get("value")])[-1][1])
        for one in series
    }


def healthy_shortfall(target: Target, series: list[JsonDict]) -> str | None:
    """A healthy run: data, and more than zeros unless the target counts trouble."""
    values = finite_values(series)
    if not values:
        return f"no series with a finite value ({len(series)} series)"
    if (target.dashboard, target.panel, target.ref_id) not in ZERO_WHEN_HEALTHY and not any(values):
        return f"only zeros in {len(series)} series, though the run produced this"
    return None


def troubled_shortfall(target: Target, series: list[JsonDict]) -> str | None:
    """In trouble a zero is news too (nobody waits, nothing retried): data is what counts."""
    if not finite_values(series):
        return f"no series with a finite value ({len(series)} series)"
    return None


def evaluate(
    prometheus: LocalPrometheus, target: Target, selection: Selection, end: float
) -> tuple[str, list[JsonDict]]:
    """The query Grafana sends for `target`, and Prometheus's answer (instant or range)."""
    expr = dashboards.interpolate(target.expr, selection.variables(target.dashboard, end))
    if target.instant:
        return expr, prometheus.query(expr, at=end)
    return expr, prometheus.query_range(expr, selection.since, end, STEP_SECONDS)


def every_target_shows_data(
    prometheus: LocalPrometheus,
    targets: Sequence[Target],
    selection: Selection,
    shortfall: Shortfall = healthy_shortfall,
    situation: str = "a healthy run",
) -> dict[Target, list[JsonDict]]:
    """Each target's result; fail naming every target that shows no data."""
    results: dict[Target, list[JsonDict]] = {}
    pending = list(targets)
    failures: dict[Target, str] = {}
    deadline = time.monotonic() + DATA_TIMEOUT
    while pending:
        end = time.time()
        failures = {}
        for target in pending:
            try:
                expr, result = evaluate(prometheus, target, selection, end)
            except PrometheusError as error:  # a query Prometheus rejects never succeeds
                failures[target] = f"query failed: {error}"
                continue
            results[target] = result
            why = shortfall(target, result)
            if why is not None:
                failures[target] = f"{why}\n    query: {expr}"
        pending = [t for t in failures if not failures[t].startswith("query failed")]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    assert not failures, f"panels without data in {situation}:\n" + "\n".join(
        f"- {target.where()}: {why}" for target, why in failures.items()
    )
    return results


def panels_show_the_situation(
    prometheus: LocalPrometheus, targets: Sequence[Target], situation: Situation
) -> dict[Target, list[JsonDict]]:
    """Every panel shows data over the situation, except those it names, which show none: a
    panel named there that shows data has the wrong reason written next to it."""
    panels = {(t.dashboard, t.panel) for t in targets}
    assert set(situation.empty) <= panels, f"no such panels: {set(situation.empty) - panels}"
    results = every_target_shows_data(
        prometheus,
        [t for t in targets if (t.dashboard, t.panel) not in situation.empty],
        situation.selection,
        troubled_shortfall,
        situation.name,
    )
    end = time.time()
    shown = {}
    for target in [t for t in targets if (t.dashboard, t.panel) in situation.empty]:
        expr, series = evaluate(prometheus, target, situation.selection, end)
        if finite_values(series):
            reason = situation.empty[(target.dashboard, target.panel)]
            shown[target.where()] = f"said empty ({reason}), shows {series}\n    query: {expr}"
    assert not shown, f"panels with data in {situation.name}:\n" + "\n".join(
        f"- {where}: {what}" for where, what in shown.items()
    )
    return results


def result_of(results: Mapping[Target, list[JsonDict]], panel: str, ref_id: str) -> list[JsonDict]:
    [target] = [t for t in results if (t.panel, t.ref_id) == (panel, ref_id)]
    return results[target]


def merged_tables_can_merge(
    boards: dict[str, JsonDict], results: dict[Target, list[JsonDict]]
) -> None:
    """Grafana's merge joins the rows of a table's queries only where their labels agree: a
    metric name in one of them would keep every row apart."""
    for board in boards.values():
        for panel in dashboards.data_panels(board):
            if not any(t.get("id") == "merge" for t in panel.get("transformations", [])):
                continue
            for target, series in results.items():
                if target.dashboard == board["uid"] and target.panel_id == panel["id"]:
                    named = [s["metric"] for s in series if "__name__" in s["metric"]]
                    assert not named, f"{target.where()}: rows would not merge: {named}"


def exemplars_lead_to_traces(
    prometheus: LocalPrometheus, targets: list[Target], run: Selection
) -> None:
    end = time.time()
    for target in [t for t in targets if t.exemplar]:
        expr = dashboards.interpolate(target.expr, run.variables(target.dashboard, end))
        found = prometheus.query_exemplars(expr, run.since, end)
        trace_ids = {
            exemplar["labels"].get("trace_id")
            for series in found
            for exemplar in series["exemplars"]
        }
        assert trace_ids, f"{target.where()}: no exemplars"
        assert all(re.fullmatch(r"[0-9a-f]{32}", str(t)) for t in trace_ids), trace_ids


def variables_list_the_run(
    prometheus: LocalPrometheus, boards: dict[str, JsonDict], run: Selection
) -> None:
    """The template variables' queries offer this run, its agents and the etcd member."""
    expected = {
        (OVERVIEW, "run_id"): set(run.run_ids),
        (OVERVIEW, "instance"): set(run.agents),
        (ETCD_BOARD, "instance"): {run.etcd_instance},
    }
    for (uid, name), wanted in expected.items():
        query = dashboards.variable_query(dashboards.variables(boards[uid])[name])
        promql, label = dashboards.label_values_as_promql(
            dashboards.interpolate(query, run.variables(uid, time.time()))
        )
        listed = {s["metric"][label] for s in prometheus.query(promql)}
        assert wanted <= listed, f"{uid} variable {name} offers {listed}"


def late_prometheus_for(tmp_path: Path, run: Selection) -> LocalPrometheus:
    """A Prometheus started after the rendezvous (a restart, a new deployment)."""
    return prometheus_for(tmp_path, "prometheus-late", run.agents, run.etcd_instance)


def no_past_events_shown_as_new(
    late: LocalPrometheus, began: float, targets: list[Target], run: Selection
) -> None:
    """A Prometheus started at `began`, after the rendezvous, first sees counters that are
    already up; the event panels must not show that as events now."""
    chosen = [t for t in targets if t.panel in PAST_EVENTS]
    assert len({t.panel for t in chosen}) == len(PAST_EVENTS), "panels renamed?"
    late.wait_for_up(AGENT_JOB, len(run.agents), FIRST_SCRAPE_TIMEOUT)
    # Past the first window, in which increase() has nothing to compare with yet.
    late.wait_for_scrape_after(AGENT_JOB, time.time() + RATE_INTERVAL_SECONDS, SCRAPE_TIMEOUT)
    replayed = {}
    since_began = Selection(run.run_ids, run.agents, run.etcd_instance, began, began)
    for target in chosen:
        expr, series = evaluate(late, target, since_began, time.time())
        if any(finite_values(series)):
            replayed[target.where()] = f"{series}\n    query: {expr}"
    assert not replayed, "past events shown as new:\n" + "\n".join(
        f"- {where}: {what}" for where, what in replayed.items()
    )


def the_healthy_run_shows(
    prometheus: LocalPrometheus,
    boards: dict[str, JsonDict],
    targets: list[Target],
    run: Selection,
    late_agent: str,
) -> None:
    results = every_target_shows_data(prometheus, targets, run)
    merged_tables_can_merge(boards, results)
    # The stuck-node panel showed the late node while it waited.
    waited = result_of(results, "Time in current rendezvous phase", "A")
    seen = {(s["metric"]["instance"], s["metric"]["phase"]) for s in waited}
    assert (late_agent, "wait_next_version") in seen, seen
    exemplars_lead_to_traces(prometheus, targets, run)
    variables_list_the_run(prometheus, boards, run)


def stalled_since(prometheus: LocalPrometheus, run_id: str, count: int) -> float:
    """Unix time at which the last of `count` nodes of `run_id` began to wait for the
    missing one, as they export it."""
    run = f'run_id="{run_id}"'
    waiting = prometheus.wait_for(
        f"etcd_rdzv_phase_started_timestamp_seconds{{{run}}} and on (instance)"
        f' (etcd_rdzv_phase{{{run}, phase="frozen_wait"}} == 1)',
        lambda series: len(series) == count,
        RENDEZVOUS_TIMEOUT,
        description=f"{count} nodes of {run_id} waiting for the missing one",
    )
    return max(sample_value(sample) for sample in waiting)


def the_stall_shows(
    prometheus: LocalPrometheus,
    boards: dict[str, JsonDict],
    targets: list[Target],
    stalled: Selection,
    not_before: float,
) -> None:
    """Who waits, where, and for how many nodes of how many needed; checked from
    `not_before` on, once the other run only trains."""
    began = max(not_before, stalled_since(prometheus, stalled.run_ids[0], len(stalled.agents)))
    stall = Situation(
        "a stall", stalled.checked_from(settled_after(prometheus, began)), STALLED_EMPTY
    )
    results = panels_show_the_situation(prometheus, targets, stall)
    merged_tables_can_merge(boards, results)
    waiting = result_of(results, "Time in current rendezvous phase", "A")
    assert {(s["metric"]["instance"], s["metric"]["phase"]) for s in waiting} == {
        (agent, "frozen_wait") for agent in stalled.agents
    }
    # Over v3 each node counted the join claims when it joined: the first saw only itself.
    # The table shows the freshest count of their version.
    assert last_values(result_of(results, "Agents", "G"), "instance") == dict.fromkeys(
        stalled.agents, float(len(stalled.agents))
    )
    nodes = result_of(results, "Nodes against min / max", "A")
    assert last_values(nodes, "run_id") == {stalled.run_ids[0]: float(len(stalled.agents))}
    needed = result_of(results, "Nodes against min / max", "B")
    assert last_values(needed, "run_id") == {stalled.run_ids[0]: float(STALLED_NODES)}
    # min_nodes = max_nodes: a version fills up or waits, it holds no last call.
    last_call = result_of(results, "Last call ends in", "A")
    assert last_values(last_call, "run_id") == {stalled.run_ids[0]: 0.0}


def a_node_loss_shows(
    prometheus: LocalPrometheus,
    targets: list[Target],
    run: Selection,
    lost: Participant,
    lost_agent: str,
) -> None:
    """A member of the completed rendezvous (`lost`, scraped at `lost_agent`) dies; the
    others train on."""
    lost.kill()
    seen = down_seen(prometheus, AGENT_JOB, lost_agent)
    node_lost = Situation(
        "a node loss", run.checked_from(settled_after(prometheus, seen)), NODE_LOST_EMPTY
    )
    results = panels_show_the_situation(prometheus, targets, node_lost)
    assert last_values(result_of(results, "Agents up", "B"), "") == {"": 1.0}


def an_etcd_outage_shows(
    prometheus: LocalPrometheus, targets: list[Target], runs: Selection, etcd: LocalEtcd
) -> None:
    """etcd stops answering while one run trains and the other waits."""
    etcd.pause()
    seen = down_seen(prometheus, ETCD_JOB, runs.etcd_instance)
    outage = Situation(
        "an etcd outage", runs.checked_from(settled_after(prometheus, seen)), ETCD_DOWN_EMPTY
    )
    results = panels_show_the_situation(prometheus, targets, outage)
    members_up = result_of(results, "Members up", "A")
    assert last_values(members_up, "instance") == {runs.etcd_instance: 0.0}
    etcd.resume()


def down_seen(prometheus: LocalPrometheus, job: str, instance: str) -> float:
    """Unix time by which Prometheus failed to scrape `instance` of `job`."""
    prometheus.wait_for(
        f'up{{job="{job}", instance="{instance}"}} == 0',
        lambda series: len(series) == 1,
        SCRAPE_TIMEOUT,
        description=f"{instance} of job {job} seen down",
    )
    return time.time()


def settled_after(prometheus: LocalPrometheus, began: float) -> float:
    """The start of the first window that holds only samples scraped after `began`, once
    every target was scraped within it: a panel shows data there only if it shows the
    situation itself, not what came before."""
    since = began + SCRAPE_INTERVAL_SECONDS + RATE_INTERVAL_SECONDS
    for job in (AGENT_JOB, ETCD_JOB):
        prometheus.wait_for_scrape_after(job, since, SCRAPE_TIMEOUT)
    return since


@only_etcd_api("v3")  # what docker-compose.yml runs: etcd without the v2 API
def test_every_panel_shows_data_from_a_real_run(
    tmp_path: Path, etcd_factory: EtcdFactory, run_id: str
) -> None:
    """A run, healthy, then after it lost a node, and beside it a run stalled for want of a
    node; then etcd pauses under both. Every panel shows data in each of these situations,
    or the situation names it with the reason it shows none."""
    began = time.monotonic()
    boards = by_uid()
    targets = [target for board in boards.values() for target in dashboards.targets(board)]
    etcd = etcd_factory()  # this test's own: it pauses it
    etcd_instance = etcd.client_url.removeprefix("http://")
    ports = free_loopback_ports(3 + STALLED_NODES - 1)
    agents = tuple(f"{LOOPBACK}:{port}" for port in ports[:3])
    stalled_agents = tuple(f"{LOOPBACK}:{port}" for port in ports[3:])
    # Started first: Prometheus scrapes new targets only on its 5 s tick.
    prometheus = prometheus_for(tmp_path, "prometheus", [*agents, *stalled_agents], etcd_instance)
    started = time.time()
    run = Selection((run_id,), agents, etcd_instance, started, started)
    stalled_run_id = f"{run_id}-stalled"
    stalled_run = Selection((stalled_run_id,), stalled_agents, etcd_instance, started, started)
    with (
        stopping(prometheus),
        closing(open_kv(etcd, "v3")) as kv,
        ParticipantGroup(
            tmp_path / "participants",
            endpoint=etcd.endpoint,
            run_id=run_id,
            min_nodes=2,
            max_nodes=3,
            conf=FAST,
        ) as group,
        ParticipantGroup(
            tmp_path / "stalled",
            endpoint=etcd.endpoint,
            run_id=stalled_run_id,
            min_nodes=STALLED_NODES,
            max_nodes=STALLED_NODES,
            conf=STALLED_CONF,
        ) as stalled_group,
        resumed_at_exit(etcd),
    ):
        participants = start_agents(group, agents, tmp_path)
        stalled = start_agents(stalled_group, stalled_agents, tmp_path)
        wait_ready([*participants, *stalled])
        # The stall begins at once and lasts while the healthy run is checked.
        for participant in stalled:
            participant.send({"cmd": "rendezvous"})
        prometheus.wait_for_up(AGENT_JOB, len(agents) + len(stalled_agents), FIRST_SCRAPE_TIMEOUT)
        prometheus.wait_for_up(ETCD_JOB, 1, FIRST_SCRAPE_TIMEOUT)
        rendezvous_with_retry_and_late_node(prometheus, kv, run_id, participants, agents)
        completed = time.time()
        ran = time.monotonic() - began

        # Started now, it first scrapes while the others are checked.
        with stopping(late_prometheus_for(tmp_path, run)) as late:
            late_began = time.time()
            prometheus.wait_for_scrape_after(AGENT_JOB, completed, SCRAPE_TIMEOUT)
            prometheus.wait_for_scrape_after(ETCD_JOB, completed, SCRAPE_TIMEOUT)
            the_healthy_run_shows(prometheus, boards, targets, run, late_agent=agents[-1])
            healthy = time.monotonic() - began
            # From when the healthy run trains: the etcd dashboard then shows the stall alone.
            the_stall_shows(prometheus, boards, targets, stalled_run, not_before=completed)
            no_past_events_shown_as_new(late, late_began, targets, run)
        a_node_loss_shows(prometheus, targets, run, participants[-1], lost_agent=agents[-1])
        both = Selection(
            (run_id, stalled_run_id), (*agents, *stalled_agents), etcd_instance, started, started
        )
        an_etcd_outage_shows(prometheus, targets, both, etcd)
        # Stuck in their rendezvous, they would read `exit` only at its timeout.
        for participant in stalled:
            participant.kill()
    print(
        f"\n{len(targets)} targets in {len(boards)} dashboards: run {ran:.1f}s, healthy checked "
        f"at {healthy:.1f}s, all situations at {time.monotonic() - began:.1f}s"
    )
