"""The Grafana dashboards: well formed, on the contract, and every panel shows real data.

The structural tests read the JSON as Grafana's file provisioning does. The live test runs a
real rendezvous (with a retry, a late node and a re-rendezvous) under a real Prometheus that
scrapes the agents and etcd, then sends every panel's query to Prometheus as Grafana would
(variables replaced, range queries over the run) and requires data from each.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from etcd_rdzv.kv import KeyValue
from etcd_rdzv_devtools.local_etcd import LocalEtcd, free_loopback_ports
from tests.conftest import only_etcd_api
from tests.ops import dashboards
from tests.ops.dashboards import JsonDict, Target
from tests.support.harness import (
    Participant,
    ParticipantGroup,
    check_membership,
    leave_stale_frozen_version,
)
from tests.support.prometheus import (
    LocalPrometheus,
    PrometheusError,
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
FAST = {"last_call_timeout": "1", "keep_alive_ttl": "1.5", "timeout": "60"}
RENDEZVOUS_TIMEOUT = 60.0
FIRST_SCRAPE_TIMEOUT = 20.0
SCRAPE_TIMEOUT = 10.0
TIMESTAMP_MARGIN = 0.05
# What Grafana sends for a 1 s scrape interval (the data source's setting) and a 1 s step:
# $__rate_interval is max($__interval + scrape interval, 4 * scrape interval).
STEP_SECONDS = 1.0
RATE_INTERVAL_SECONDS = 4
# Every panel must show data within this long after the run; nearly all do at once.
DATA_TIMEOUT = 15.0

pytestmark = pytest.mark.timeout(180)

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
class Run:
    """A finished rendezvous whose agents still run (and refresh their keep-alives)."""

    run_id: str
    agents: list[str]  # instance labels, the late node last
    etcd_instance: str
    started: float  # Unix time just before any agent existed

    @property
    def late_agent(self) -> str:
        return self.agents[-1]

    def variables(self, dashboard: str, end: float) -> dict[str, str]:
        """What Grafana puts for the dashboard's variables, this run and its agents selected."""
        instances = self.agents if dashboard == OVERVIEW else [self.etcd_instance]
        return {
            "run_id": dashboards.grafana_regex([self.run_id]),
            "instance": dashboards.grafana_regex(instances),
            "__interval": f"{STEP_SECONDS:g}s",
            "__rate_interval": f"{RATE_INTERVAL_SECONDS}s",
            "__rate_interval_ms": str(RATE_INTERVAL_SECONDS * 1000),
            "__range": f"{math.ceil(end - self.started)}s",
        }


def prometheus_for(tmp_path: Path, name: str, agents: list[str], etcd: str) -> LocalPrometheus:
    config = {
        "scrape_configs": [
            scrape_config(AGENT_JOB, agents, interval="1s"),
            scrape_config(ETCD_JOB, [etcd], interval="1s"),
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


def scraped_after(prometheus: LocalPrometheus, job: str, count: int, moment: float) -> None:
    prometheus.wait_for(
        f'timestamp(up{{job="{job}"}}) > {moment + TIMESTAMP_MARGIN:.3f}',
        lambda series: len(series) >= count,
        SCRAPE_TIMEOUT,
        description=f"a scrape of job {job} after {moment:.3f}",
    )


def wait_until_waiting_seen(member: Participant) -> None:
    """Poll like torchrun's agent until the member sees a node waiting."""
    deadline = time.monotonic() + SCRAPE_TIMEOUT
    while member.request({"cmd": "num_nodes_waiting"}, SCRAPE_TIMEOUT)["value"] == 0:
        assert time.monotonic() < deadline, f"{member} never saw the late node waiting"
        time.sleep(0.1)


@contextmanager
def rendezvous_with_retry_and_late_node(
    tmp_path: Path,
    etcd: LocalEtcd,
    *,
    kv: KeyValue,
    run_id: str,
    prometheus: LocalPrometheus,
    agents: list[str],
) -> Iterator[None]:
    """Two nodes rendezvous past a stale frozen version (a retry); a late node waits while
    Prometheus watches, and all three re-rendezvous. The agents run until the block ends."""
    with ParticipantGroup(
        tmp_path / "participants",
        endpoint=etcd.endpoint,
        run_id=run_id,
        min_nodes=2,
        max_nodes=3,
        conf=FAST,
    ) as group:
        first, second, late = (
            group.start(
                1,
                backend=BACKEND,
                # A trace file turns tracing on: histograms then carry exemplars.
                conf={
                    "metrics_port": agent.rsplit(":", 1)[1],
                    "trace_file": str(tmp_path / f"{n}.jsonl"),
                },
            )[0]
            for n, agent in enumerate(agents)
        )
        prometheus.wait_for_up(AGENT_JOB, len(agents), FIRST_SCRAPE_TIMEOUT)
        prometheus.wait_for_up(ETCD_JOB, 1, FIRST_SCRAPE_TIMEOUT)

        # A frozen version left by a dead run: the first setup waits for it to expire, then
        # starts over (a retry).
        leave_stale_frozen_version(kv, run_id)
        check_membership(group.rendezvous_all(RENDEZVOUS_TIMEOUT, participants=[first, second]))

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
        members = group.rendezvous_all(RENDEZVOUS_TIMEOUT, participants=[first, second])
        results = [*members, late.expect_rendezvous(RENDEZVOUS_TIMEOUT)]
        check_membership(results)
        assert {r["world_size"] for r in results} == {3}

        completed = time.time()
        scraped_after(prometheus, AGENT_JOB, len(agents), completed)
        scraped_after(prometheus, ETCD_JOB, 1, completed)
        yield


def values_of(series: list[JsonDict]) -> list[float]:
    found = []
    for one in series:
        points = one.get("values") or ([one["value"]] if "value" in one else [])
        found += [float(value) for _, value in points]
    return found


def shortfall(target: Target, series: list[JsonDict]) -> str | None:
    """Why the panel would look empty with this result; None when it shows data."""
    values = [value for value in values_of(series) if math.isfinite(value)]
    if not values:
        return f"no series with a finite value ({len(series)} series)"
    if (target.dashboard, target.panel, target.ref_id) not in ZERO_WHEN_HEALTHY and not any(values):
        return f"only zeros in {len(series)} series, though the run produced this"
    return None


def evaluate(
    prometheus: LocalPrometheus, target: Target, run: Run, start: float, end: float
) -> tuple[str, list[JsonDict]]:
    """The query Grafana sends for `target`, and Prometheus's answer (instant or range)."""
    expr = dashboards.interpolate(target.expr, run.variables(target.dashboard, end))
    if target.instant:
        return expr, prometheus.query(expr, at=end)
    return expr, prometheus.query_range(expr, start, end, STEP_SECONDS)


def every_target_shows_data(
    prometheus: LocalPrometheus, targets: list[Target], run: Run
) -> dict[Target, list[JsonDict]]:
    """Each target's result over the run; fail naming every target that shows no data."""
    results: dict[Target, list[JsonDict]] = {}
    pending = list(targets)
    failures: dict[Target, str] = {}
    deadline = time.monotonic() + DATA_TIMEOUT
    while pending:
        end = time.time()
        failures = {}
        for target in pending:
            try:
                expr, result = evaluate(prometheus, target, run, run.started, end)
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
    assert not failures, "panels without data after a real run:\n" + "\n".join(
        f"- {target.where()}: {why}" for target, why in failures.items()
    )
    return results


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


def exemplars_lead_to_traces(prometheus: LocalPrometheus, targets: list[Target], run: Run) -> None:
    end = time.time()
    for target in [t for t in targets if t.exemplar]:
        expr = dashboards.interpolate(target.expr, run.variables(target.dashboard, end))
        found = prometheus.query_exemplars(expr, run.started, end)
        trace_ids = {
            exemplar["labels"].get("trace_id")
            for series in found
            for exemplar in series["exemplars"]
        }
        assert trace_ids, f"{target.where()}: no exemplars"
        assert all(re.fullmatch(r"[0-9a-f]{32}", str(t)) for t in trace_ids), trace_ids


def variables_list_the_run(
    prometheus: LocalPrometheus, boards: dict[str, JsonDict], run: Run
) -> None:
    """The template variables' queries offer this run, its agents and the etcd member."""
    expected = {
        (OVERVIEW, "run_id"): {run.run_id},
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


def late_prometheus_shows_no_past_events(tmp_path: Path, targets: list[Target], run: Run) -> None:
    """A Prometheus started after the rendezvous (a restart, a new deployment) first sees
    counters that are already up; the event panels must not show that as events now."""
    chosen = [t for t in targets if t.panel in PAST_EVENTS]
    assert len({t.panel for t in chosen}) == len(PAST_EVENTS), "panels renamed?"
    with stopping(
        prometheus_for(tmp_path, "prometheus-late", run.agents, run.etcd_instance)
    ) as late:
        began = time.time()
        late.wait_for_up(AGENT_JOB, len(run.agents), FIRST_SCRAPE_TIMEOUT)
        # Past the first window, in which increase() has nothing to compare with yet.
        scraped_after(late, AGENT_JOB, len(run.agents), time.time() + RATE_INTERVAL_SECONDS)
        replayed = {}
        for target in chosen:
            expr, series = evaluate(late, target, run, began, time.time())
            if any(v for v in values_of(series) if math.isfinite(v)):
                replayed[target.where()] = f"{series}\n    query: {expr}"
    assert not replayed, "past events shown as new:\n" + "\n".join(
        f"- {where}: {what}" for where, what in replayed.items()
    )


@only_etcd_api("v3")  # what docker-compose.yml runs: etcd without the v2 API
def test_every_panel_shows_data_from_a_real_run(
    tmp_path: Path, etcd: LocalEtcd, kv: KeyValue, run_id: str
) -> None:
    began = time.monotonic()
    boards = by_uid()
    targets = [target for board in boards.values() for target in dashboards.targets(board)]
    agents = [f"{LOOPBACK}:{port}" for port in free_loopback_ports(3)]
    etcd_instance = etcd.client_url.removeprefix("http://")
    # Started first: Prometheus scrapes new targets only on its 5 s tick.
    prometheus = prometheus_for(tmp_path, "prometheus", agents, etcd_instance)
    run = Run(run_id, agents, etcd_instance, started=time.time())
    with (
        stopping(prometheus),
        rendezvous_with_retry_and_late_node(
            tmp_path, etcd, kv=kv, run_id=run_id, prometheus=prometheus, agents=agents
        ),
    ):
        ran = time.monotonic() - began
        results = every_target_shows_data(prometheus, targets, run)
        merged_tables_can_merge(boards, results)
        # The stuck-node panel showed the late node while it waited.
        [in_phase] = [t for t in results if t.panel == "Time in current rendezvous phase"]
        seen = {(s["metric"]["instance"], s["metric"]["phase"]) for s in results[in_phase]}
        assert (run.late_agent, "wait_next_version") in seen, seen
        exemplars_lead_to_traces(prometheus, targets, run)
        variables_list_the_run(prometheus, boards, run)
        checked = time.monotonic() - began
        late_prometheus_shows_no_past_events(tmp_path, targets, run)
    print(
        f"\n{len(targets)} targets in {len(boards)} dashboards: run {ran:.1f}s, all checked at "
        f"{checked:.1f}s, late Prometheus done at {time.monotonic() - began:.1f}s"
    )
