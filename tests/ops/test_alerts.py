"""The alert rules: promtool checks and unit tests, and the stalled-rendezvous alert, live.

`prometheus/rules/*.yml` are the shipped rules and `prometheus/tests/*.yml` their promtool unit
tests. The live test loads the shipped rules into a real Prometheus that scrapes real
participants, plus a copy of the stalled rule whose threshold is lowered to seconds. The copy
is made from the expression Prometheus itself parsed, so it is the shipped expression that
fires.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import pytest

from etcd_rdzv_devtools.local_etcd import LocalEtcd, reserved_loopback_ports
from tests.conftest import only_etcd_api
from tests.support.harness import Participant, ParticipantGroup, check_membership
from tests.support.prometheus import (
    JsonDict,
    LocalPrometheus,
    sample_value,
    scrape_config,
    start_local_prometheus,
)

REPO = Path(__file__).resolve().parents[2]
RULE_FILES = sorted((REPO / "prometheus" / "rules").glob("*.yml"))
PROMTOOL_TESTS = sorted((REPO / "prometheus" / "tests").glob("*.yml"))
RUNBOOK = REPO / "docs" / "runbook.md"
CONTRACT = REPO / "docs" / "telemetry.md"
RUNBOOK_URL = "https://github.com/etcd-rdzv/etcd-rdzv/blob/main/docs/runbook.md"
SEVERITIES = {"warning", "critical"}

STALLED = "EtcdRdzvRendezvousStalled"
# The shipped threshold is minutes; the copy's is seconds, and fires without `for`.
LOWERED_SECONDS = 3
COPY_LABEL = {"rule_copy": "lowered-threshold"}
COPY_GROUP = "test-lowered-thresholds"

BACKEND = "etcd-rdzv"
AGENT_JOB = "etcd-rdzv"
ETCD_JOB = "etcd"
LOOPBACK = "127.0.0.1"
# A lone node of a run that needs two waits in frozen_wait; `timeout` keeps it waiting.
CONF = {"last_call_timeout": "1", "timeout": "60"}
PROMTOOL_TIMEOUT = 60.0
# Prometheus applies new targets on a 5 s tick, then scrapes and evaluates every second.
FIRST_SCRAPE_TIMEOUT = 20.0
ALERT_TIMEOUT = 15.0
SCRAPE_TIMEOUT = 10.0
RENDEZVOUS_TIMEOUT = 30.0
TIMESTAMP_MARGIN = 0.05
POLL_SECONDS = 0.2

_ALERT_NAME = re.compile(r"^\s*-\s*alert:\s*(\S+)\s*$", re.MULTILINE)
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.MULTILINE)
_METRIC = re.compile(r"\betcd_rdzv_[a-z_]+")
_SERIES_SUFFIXES = ("_total", "_count", "_sum", "_bucket")
_RFC3339_UTC = re.compile(r"^(?P<seconds>[^.Z]+)(?:\.(?P<fraction>\d+))?Z$")
# The stalled expression ends in `> <threshold>`, in the rule file and as Prometheus prints it.
_TRAILING_THRESHOLD = re.compile(r"^(?P<expr>.*\S)\s*>\s*(?P<threshold>\d+(?:\.\d+)?)\s*$", re.S)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found on PATH: install it with `apt-get install prometheus`",
            pytrace=False,
        )
    return subprocess.run(
        [path, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT,
        check=False,
    )


def assert_succeeds(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"`{' '.join(result.args)}` exited {result.returncode}\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )


def shipped_alert_names() -> list[str]:
    return [name for path in RULE_FILES for name in _ALERT_NAME.findall(path.read_text())]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


# --- promtool ---------------------------------------------------------------------------------


def test_rule_files_pass_promtool_check() -> None:
    assert RULE_FILES, "no rule files in prometheus/rules/"
    assert_succeeds(promtool("check", "rules", *map(str, RULE_FILES)))


def test_promtool_unit_tests_pass() -> None:
    assert PROMTOOL_TESTS, "no promtool tests in prometheus/tests/"
    assert_succeeds(promtool("test", "rules", *map(str, PROMTOOL_TESTS)))


def promtool_cases() -> dict[str, dict[str, int]]:
    """For each alert name, how many promtool cases expect it to fire and to stay quiet.

    Reads the test files line by line: an `alertname:` line, then its `exp_alerts:` line,
    which is `exp_alerts: []` for a quiet case.
    """
    cases: dict[str, dict[str, int]] = {}
    for path in PROMTOOL_TESTS:
        alertname = None
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith("alertname:"):
                alertname = stripped.split(":", 1)[1].strip()
            elif stripped.startswith("exp_alerts:") and alertname is not None:
                kind = "quiet" if stripped.split(":", 1)[1].strip() == "[]" else "firing"
                counts = cases.setdefault(alertname, {"firing": 0, "quiet": 0})
                counts[kind] += 1
                alertname = None
    return cases


def test_every_alert_has_firing_and_quiet_promtool_cases() -> None:
    names = shipped_alert_names()
    assert len(names) == len(set(names)), f"alert names repeat: {names}"
    cases = promtool_cases()
    missing = {
        name: cases.get(name, {"firing": 0, "quiet": 0})
        for name in names
        if not all(cases.get(name, {}).get(kind, 0) for kind in ("firing", "quiet"))
    }
    assert not missing, f"alerts without both a firing and a quiet promtool case: {missing}"
    unknown = set(cases) - set(names)
    assert not unknown, f"promtool cases for alerts that are not shipped: {unknown}"


def test_rules_use_only_metrics_of_the_contract() -> None:
    contract = set(_METRIC.findall(CONTRACT.read_text()))
    used = {
        metric
        for path in [*RULE_FILES, *PROMTOOL_TESTS]
        for metric in _METRIC.findall(path.read_text())
    }
    assert used, "the rules use no etcd_rdzv_ metric"
    unknown = sorted(
        metric
        for metric in used
        if metric not in contract
        and not any(
            metric.endswith(suffix) and metric.removesuffix(suffix) in contract
            for suffix in _SERIES_SUFFIXES
        )
    )
    assert not unknown, f"metrics not in docs/telemetry.md: {unknown}"


# --- the rules as Prometheus loads them ---------------------------------------------------------


def alerting_rules(groups: list[JsonDict]) -> dict[str, JsonDict]:
    """The shipped alerting rules Prometheus loaded, by name (the test's copy left out)."""
    return {
        rule["name"]: rule
        for group in groups
        if group["name"] != COPY_GROUP
        for rule in group["rules"]
        if rule["type"] == "alerting"
    }


def copy_group(groups: list[JsonDict]) -> JsonDict:
    [group] = [group for group in groups if group["name"] == COPY_GROUP]
    return group


def test_every_alert_has_severity_annotations_and_a_runbook_section(tmp_path: Path) -> None:
    with start_local_prometheus(
        {"scrape_configs": []}, data_dir=tmp_path / "prometheus", rule_files=RULE_FILES
    ) as prometheus:
        rules = alerting_rules(prometheus.rules())

    assert sorted(rules) == sorted(shipped_alert_names())
    anchors = {github_anchor(heading) for heading in _HEADING.findall(RUNBOOK.read_text())}
    for name, rule in rules.items():
        assert rule["labels"].get("severity") in SEVERITIES, (name, rule["labels"])
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(annotations), (name, annotations)
        assert "$labels" in annotations["summary"] + annotations["description"], name
        url, _, anchor = annotations["runbook_url"].partition("#")
        assert url == RUNBOOK_URL, (name, annotations["runbook_url"])
        assert anchor == name.lower(), (name, annotations["runbook_url"])
        assert anchor in anchors, f"{name}: docs/runbook.md has no section #{anchor}"


# --- live: the stalled rule on real agents ------------------------------------------------------


def lowered_copy(rule: JsonDict) -> JsonDict:
    """A rule group holding `rule` with its trailing threshold lowered and no `for`."""
    match = _TRAILING_THRESHOLD.match(rule["query"])
    assert match, f"{rule['name']}: expression does not end in `> <threshold>`: {rule['query']}"
    assert float(match["threshold"]) >= 60, f"shipped threshold is not minutes: {match[0]}"
    return {
        "name": COPY_GROUP,
        "interval": "1s",
        "rules": [
            {
                "alert": rule["name"],
                "expr": f"{match['expr']} > {LOWERED_SECONDS}",
                "for": "0s",
                "labels": {**rule["labels"], **COPY_LABEL},
                "annotations": rule["annotations"],
            }
        ],
    }


def stalled_alerts(prometheus: LocalPrometheus, run_id: str) -> list[JsonDict]:
    """Pending or firing alerts of the lowered copy for `run_id`."""
    return [
        alert
        for alert in prometheus.alerts()
        if alert["labels"].get("alertname") == STALLED
        and alert["labels"].get("run_id") == run_id
        and alert["labels"].get("rule_copy") == COPY_LABEL["rule_copy"]
    ]


def wait_until(what: str, timeout: float, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s")
        time.sleep(POLL_SECONDS)


def evaluated_at(group: JsonDict) -> float:
    """A rule group's last evaluation as Unix time (Prometheus gives RFC 3339 UTC, in ns)."""
    match = _RFC3339_UTC.match(group["lastEvaluation"])
    assert match, f"unexpected lastEvaluation: {group['lastEvaluation']!r}"
    seconds = datetime.strptime(match["seconds"], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    return seconds.timestamp() + float(f"0.{match['fraction'] or 0}")


def scraped_and_evaluated_after(
    prometheus: LocalPrometheus, instances: Sequence[str], moment: float
) -> None:
    """Wait until every agent was scraped after `moment`, and the copy evaluated after that."""
    result = prometheus.wait_for(
        f'timestamp(up{{job="{AGENT_JOB}"}}) > {moment + TIMESTAMP_MARGIN:.3f}',
        lambda series: {s["metric"]["instance"] for s in series} >= set(instances),
        SCRAPE_TIMEOUT,
        description=f"a scrape of every agent after {moment:.3f}",
    )
    scraped = max(sample_value(s) for s in result)

    def copy_evaluated() -> bool:
        return evaluated_at(copy_group(prometheus.rules())) > scraped

    wait_until("an evaluation of the lowered rule after the scrape", SCRAPE_TIMEOUT, copy_evaluated)


def alert_history(prometheus: LocalPrometheus, selector: str, since: float) -> list[JsonDict]:
    """`ALERTS` samples (pending or firing) matching `selector` from `since` until now."""
    window = int(time.time() - since)
    assert window >= 1, f"a window of {window}s"
    return prometheus.query(f"count_over_time(ALERTS{{{selector}}}[{window}s])")


def load_lowered_copy(prometheus: LocalPrometheus, copy_file: Path) -> JsonDict:
    """Write the lowered copy of the shipped stalled rule into `copy_file`, reload, and return
    the shipped rule as Prometheus parsed it."""
    shipped = alerting_rules(prometheus.rules())[STALLED]
    copy_file.write_text(json.dumps({"groups": [lowered_copy(shipped)]}))
    prometheus.reload()
    [copy] = copy_group(prometheus.rules())["rules"]
    assert copy["name"] == STALLED
    assert copy["labels"] == {**shipped["labels"], **COPY_LABEL}, copy
    assert copy["query"].endswith(f"> {LOWERED_SECONDS}"), copy["query"]
    return shipped


def wait_for_firing(prometheus: LocalPrometheus, run_id: str, timeout: float) -> JsonDict:
    """The one firing alert of the lowered copy for `run_id`, once there is one."""
    deadline = time.monotonic() + timeout
    while True:
        firing = [a for a in stalled_alerts(prometheus, run_id) if a["state"] == "firing"]
        if firing or time.monotonic() >= deadline:
            break
        time.sleep(POLL_SECONDS)
    phases = f'etcd_rdzv_phase{{run_id="{run_id}"}} == 1'
    assert firing, (
        f"{STALLED} (threshold {LOWERED_SECONDS}s) did not fire within {timeout:.0f}s"
        f"; alerts: {prometheus.alerts()}\nphases: {prometheus.query(phases)}"
    )
    [alert] = firing
    return alert


def assert_shipped_rules_quiet_and_healthy(prometheus: LocalPrometheus) -> None:
    """No shipped alert is pending or firing, and every rule evaluates without error."""
    others = [a for a in prometheus.alerts() if a["labels"].get("rule_copy") is None]
    assert others == [], others
    broken = [
        (rule["name"], rule.get("lastError"))
        for group in prometheus.rules()
        for rule in group["rules"]
        if rule.get("health") != "ok"
    ]
    assert broken == [], broken


@pytest.mark.timeout(120)
@only_etcd_api("v3")  # the alert reads agent metrics, the same over either API
def test_stalled_alert_fires_for_a_node_held_in_one_phase(
    tmp_path: Path, etcd: LocalEtcd, run_id: str
) -> None:
    started = time.time()
    copy_file = tmp_path / "lowered.rules.json"
    copy_file.write_text(json.dumps({"groups": []}))
    with reserved_loopback_ports(2) as ports:
        lone, late = (f"{LOOPBACK}:{port}" for port in ports)
        prometheus = start_local_prometheus(
            {
                "scrape_configs": [
                    scrape_config(AGENT_JOB, [lone, late]),
                    scrape_config(ETCD_JOB, [etcd.endpoint]),
                ]
            },
            data_dir=tmp_path / "prometheus",
            rule_files=[*RULE_FILES, copy_file],
        )
    with (
        prometheus,
        ParticipantGroup(
            tmp_path / "participants",
            endpoint=etcd.endpoint,
            run_id=run_id,
            min_nodes=2,
            max_nodes=2,
            conf=CONF,
        ) as group,
    ):
        shipped = load_lowered_copy(prometheus, copy_file)

        participants: list[Participant] = []
        for port in ports:
            participants += group.start(1, backend=BACKEND, conf={"metrics_port": str(port)})
        first, second = participants
        prometheus.wait_for_up(AGENT_JOB, 2, FIRST_SCRAPE_TIMEOUT)

        # The first node joins alone and waits for a second: held in frozen_wait.
        held = time.time()
        first.send({"cmd": "rendezvous"})
        alert = wait_for_firing(prometheus, run_id, ALERT_TIMEOUT)
        fired = time.time()
        assert alert["labels"] == {
            "alertname": STALLED,
            **shipped["labels"],
            **COPY_LABEL,
            "instance": lone,
            "job": AGENT_JOB,
            "run_id": run_id,
            "phase": "frozen_wait",
        }
        assert float(alert["value"]) > LOWERED_SECONDS
        annotations = alert["annotations"]
        assert lone in annotations["summary"] and "frozen_wait" in annotations["summary"]
        assert run_id in annotations["description"], annotations
        assert annotations["runbook_url"] == shipped["annotations"]["runbook_url"]
        # It fired because of the hold: no sooner than the threshold after it began.
        assert fired - held > LOWERED_SECONDS

        # The second node arrives: both complete, and the alert resolves.
        results = [
            second.rendezvous(RENDEZVOUS_TIMEOUT),
            first.expect_rendezvous(RENDEZVOUS_TIMEOUT),
        ]
        check_membership(results)
        assert {r["world_size"] for r in results} == {2}
        wait_until(
            f"{STALLED} resolved after the rendezvous completed",
            SCRAPE_TIMEOUT,
            lambda: not stalled_alerts(prometheus, run_id),
        )
        resolved = time.time()

        # Both nodes stay done for longer than the threshold: no alert for either.
        scraped_and_evaluated_after(prometheus, [lone, late], resolved + LOWERED_SECONDS + 1)
        done = prometheus.query(f'etcd_rdzv_phase{{run_id="{run_id}", phase="done"}} == 1')
        assert {s["metric"]["instance"] for s in done} == {lone, late}
        run = f'alertname="{STALLED}", run_id="{run_id}"'
        assert alert_history(prometheus, run, resolved) == []
        # The second node was idle (done) past the threshold before it took part: never alerted.
        assert alert_history(prometheus, f'{run}, instance="{late}"', started) == []

        # Nothing else fired, and every shipped rule evaluates cleanly on real series.
        assert_shipped_rules_quiet_and_healthy(prometheus)
