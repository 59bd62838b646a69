"""The benchmark harness (`make bench`) end to end, small: N = 2, one round of every setup
(the rank-policy one too: --rank-policy-nodes 2, where it and its baseline go on with a
re-rendezvous of the same nodes).

It runs the real command as a separate process, with its own etcd and worker pool, writing
its JSON, plot and docs section into the test's directory (never the real docs/). Recovery
runs at N = 3 for a few setups: torch's backends take about 15 s each to recover (they wait
out the dead node's keep-alive), so one of them stands for all three.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from benchmarks.pool import pid_alive

from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "rendezvous_latency.py"
SETUPS = {
    "torch etcd": True,  # whether its requests go to etcd
    "torch etcd-v2": True,
    "torch c10d": False,
    "etcd-rdzv v3, telemetry off": True,
    "etcd-rdzv v3, telemetry on": True,
    "etcd-rdzv v2, telemetry off": True,
    "etcd-rdzv v2, telemetry on": True,
    "etcd-rdzv v3, telemetry off, stable": True,
}
# The setups whose rounds go on with a re-rendezvous at --rank-policy-nodes: the rank-policy
# setup and its baseline.
AGAIN = {"etcd-rdzv v3, telemetry off", "etcd-rdzv v3, telemetry off, stable"}
RECOVERY_SETUPS = {"torch-c10d": "torch c10d", "v3-off": "etcd-rdzv v3, telemetry off",
                   "v2-on": "etcd-rdzv v2, telemetry on"}  # fmt: skip
NARRATIVE = "# Benchmarks\n\nWritten by people; the harness must leave it as it is.\n"
RUN_TIMEOUT = 240.0
PROCESSES_GONE_TIMEOUT = 15.0


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench")
    (out / "benchmarks.md").write_text(NARRATIVE, encoding="utf-8")
    command = [
        sys.executable, str(SCRIPT), "--nodes", "2", "--rounds", "1", "--rank-policy-nodes", "2",
        "--recovery-nodes", "3", "--recovery-setups", *RECOVERY_SETUPS,
        "--work-dir", str(out / "work"), "--json", str(out / "results.json"),
        "--plot", str(out / "plot.png"), "--docs", str(out / "benchmarks.md"),
    ]  # fmt: skip
    finished = subprocess.run(
        command, capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=out, check=False
    )
    assert finished.returncode == 0, f"{finished.stdout}\n{finished.stderr}"
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    return out, results, finished.stdout


def test_every_setup_ran_one_checked_round_with_sane_figures(
    run: tuple[Path, dict[str, Any], str],
) -> None:
    _, results, _ = run
    rounds = {(r["setup"], r["re_rendezvous"]): r for r in results["rounds"]}
    expected = {(setup, False) for setup in SETUPS} | {(setup, True) for setup in AGAIN}
    assert set(rounds) == expected and len(results["rounds"]) == len(expected)
    for (setup, again), measured in rounds.items():
        assert measured["status"] == "ok", measured["error"]
        assert measured["membership_checked"], setup
        assert measured["nodes"] == 2 and len(measured["node_seconds"]) == 2
        assert 0 < measured["first_seconds"] <= measured["wall_seconds"] < 60, measured
        assert measured["cpu_seconds_per_node"] > 0, measured
        if SETUPS[setup]:
            assert measured["requests_rendezvous"] > 0 and measured["requests"] > 0, measured
        else:
            assert measured["requests"] is None, measured
        if again:
            # No handler created: the re-rendezvous's counts are its own, bytes included.
            assert measured["requests_create"] == measured["sent_bytes_create"] == 0, measured
            assert measured["sent_bytes"] == measured["sent_bytes_rendezvous"] > 0, measured
    summaries = {s["setup"]: s for s in results["summaries"]}
    assert summaries["torch etcd"]["speedup"] == pytest.approx(1.0)
    assert all(summaries[setup]["median_seconds"] > 0 for setup in SETUPS)
    # stable against join order (v3-off), the same run: the fresh run, then the re-rendezvous.
    fresh, again = results["rank_policy_costs"]
    assert (fresh["rendezvous"], again["rendezvous"]) == ("fresh run", "re-rendezvous")
    for cost in (fresh, again):
        assert cost["nodes"] == 2 and cost["rank_policy"] == "stable"
        assert cost["baseline"]["setup"] == "etcd-rdzv v3, telemetry off"
        assert cost["policy"]["setup"] == "etcd-rdzv v3, telemetry off, stable"
        assert cost["policy"]["rounds_ok"] == cost["baseline"]["rounds_ok"] == 1
        assert cost["policy"]["rendezvous_sent_bytes_per_node"] > 0
    # The summaries and tables per N are of the first rendezvous only.
    assert summaries["etcd-rdzv v3, telemetry off"] == fresh["baseline"]


def test_recovery_is_measured_from_the_kill(run: tuple[Path, dict[str, Any], str]) -> None:
    _, results, _ = run
    recoveries = {r["setup"]: r for r in results["recoveries"]}
    assert set(recoveries) == set(RECOVERY_SETUPS.values())
    for recovery in recoveries.values():
        assert recovery["status"] == "ok", recovery["error"]
        assert recovery["membership_checked"] and recovery["nodes"] == 3
        assert 0 < recovery["first_seconds"] <= recovery["recovery_seconds"], recovery


def test_report_files_are_written_and_the_narrative_kept(
    run: tuple[Path, dict[str, Any], str],
) -> None:
    out, results, stdout = run
    assert (out / "plot.png").read_bytes().startswith(b"\x89PNG")
    docs = (out / "benchmarks.md").read_text(encoding="utf-8")
    assert docs.startswith("# Benchmarks\n\n<!-- bench:begin -->")
    assert docs.count("<!-- bench:begin -->") == docs.count("<!-- bench:end -->") == 1
    assert docs.endswith(NARRATIVE.removeprefix("# Benchmarks\n"))
    assert "### N = 2" in docs and "![" in docs and "(plot.png)" in docs
    assert "### Rank policies" in docs
    for rendezvous in ("fresh run", "re-rendezvous"):
        assert f"| 2 | {rendezvous} | difference | stable - join_order |" in docs
    assert "N = 2" in stdout and "Targets:" in stdout and "Rank policies" in stdout
    assert "stable, re-rendezvous" in stdout and "re-rendezvous  difference" in stdout
    assert {t["name"] for t in results["targets"]} and results["machine"]["cores"]


def test_every_process_the_harness_started_is_gone(run: tuple[Path, dict[str, Any], str]) -> None:
    _, results, _ = run
    pool = results["pool"]
    assert pool["workers_left_running"] == []
    started = [*pool["worker_pids"], *pool["server_pids"]]
    # 3 workers (recovery's N), a fresh one after each recovery kill but the last, and the
    # server they were forked from.
    assert len(pool["worker_pids"]) == 3 + len(RECOVERY_SETUPS) - 1 and pool["server_pids"]
    wait_until(
        f"no process of {started} running",
        lambda: not any(pid_alive(pid) for pid in started),
        PROCESSES_GONE_TIMEOUT,
    )
