"""etcd-rdzv analyze on traces of real rendezvous: a late node, and a node killed mid-way."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from etcd_rdzv.analysis.chart import (
    NEVER_ARRIVED,
    STRAGGLER,
    UNCONFIRMED,
    UNTRACED,
    Panel,
    legend_labels,
    panels,
)
from etcd_rdzv.analysis.spans import AnalysisError, read_spans
from etcd_rdzv.analysis.timeline import analyze
from etcd_rdzv.cli import main
from etcd_rdzv_devtools.local_etcd import LocalEtcd
from tests.support.harness import Participant, ParticipantGroup, check_membership

# Export each ended span within 0.1 s, so a node killed later has its earlier spans on file.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def node_of(participant: Participant, spans_file: Path) -> str:
    """The `rdzv.node` (host:pid) of `participant`, as found in the trace."""
    nodes = {s.node for s in read_spans([spans_file]) if s.node}
    (node,) = [n for n in nodes if n.endswith(f":{participant.pid}")]
    return node


def wait_for_span(trace_file: Path, name: str, pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            spans = read_spans([trace_file])
        except AnalysisError:
            spans = []  # not written yet
        if any(s.name == name and (s.node or "").endswith(f":{pid}") for s in spans):
            return
        assert time.monotonic() < deadline, f"no {name} span of pid {pid} within {timeout}s"
        time.sleep(0.05)


def analyze_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main(["analyze", *argv, "--json"]) == 0
    document: dict[str, Any] = json.loads(capsys.readouterr().out)
    return document


def chart(trace_file: Path, run_id: str) -> Panel:
    """The one version's chart, as `--plot` draws it."""
    (panel,) = panels(analyze(read_spans([trace_file]), run_id))
    return panel


def png_size(path: Path) -> tuple[int, int]:
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    height, width = matplotlib.image.imread(path).shape[:2]
    return width, height


def test_a_late_node_is_named_and_the_others_waited_in_frozen_wait(
    tmp_path: Path, etcd: LocalEtcd, run_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    trace_file = tmp_path / "traces.jsonl"
    conf = {"trace_file": str(trace_file), "last_call_timeout": "1"}
    with ParticipantGroup(
        tmp_path, endpoint=etcd.endpoint, run_id=run_id, min_nodes=3, max_nodes=3, conf=conf
    ) as group:
        early_a, early_b, late = group.start(3, backend="etcd-rdzv")
        early_a.send({"cmd": "rendezvous"})
        early_b.send({"cmd": "rendezvous"})
        time.sleep(1.5)  # the scenario itself: the third node starts 1.5 s late
        late.send({"cmd": "rendezvous"})
        check_membership([p.expect_rendezvous(60) for p in (early_a, early_b, late)])
        for participant in (early_a, early_b, late):
            assert participant.request({"cmd": "shutdown"}, 30)["value"] is True

    late_node = node_of(late, trace_file)
    assert main(["analyze", str(trace_file), "--run-id", run_id]) == 0
    text = capsys.readouterr().out
    assert f"straggler: {late_node} arrived late" in text
    assert "who waited in frozen_wait" in text and "most time in: frozen_wait" in text

    plot = tmp_path / "timeline.png"
    (run,) = analyze_json(capsys, str(trace_file), "--run-id", run_id, "--plot", str(plot))["runs"]
    (version,) = run["versions"]
    assert version["complete"] and version["busiest_phase"] == "frozen_wait"
    assert version["last_arrival"]["node"] == late_node
    (straggler,) = version["stragglers"]
    assert (straggler["node"], straggler["kind"], straggler["waited_in"]) == (
        late_node,
        "late_arrival",
        "frozen_wait",
    )
    assert 1.0 < straggler["held_back_seconds"] < 10
    assert len(version["nodes"]) == 3
    assert len(chart(trace_file, run_id).rows) == 3
    assert STRAGGLER in legend_labels([chart(trace_file, run_id)])
    width, _ = png_size(plot)

    # Without the late node's trace its rank still has a row, marked as never traced.
    late_rank = next(node["rank"] for node in version["nodes"] if node["node"] == late_node)
    two = tmp_path / "two.jsonl"
    two.write_text(
        "".join(
            line + "\n"
            for line in trace_file.read_text().splitlines()
            if f':{late.pid}"' not in line
        )
    )
    assert main(["analyze", str(two), "--plot", str(tmp_path / "two.png")]) == 0
    assert f"rank {late_rank} never traced: the version had 3 participants" in (
        capsys.readouterr().out
    )
    two_panel = chart(two, run_id)
    assert len(two_panel.rows) == 3
    assert (two_panel.rows[-1].label, two_panel.rows[-1].absent) == (
        f"rank {late_rank}: no trace",
        True,
    )
    labels = legend_labels([two_panel])
    assert UNTRACED in labels and STRAGGLER not in labels
    two_width, _ = png_size(tmp_path / "two.png")
    assert two_width == width


def test_a_node_killed_before_confirming_is_named_and_the_others_wait_in_final_wait(
    tmp_path: Path, etcd: LocalEtcd, run_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    trace_file = tmp_path / "traces.jsonl"
    conf = {"trace_file": str(trace_file), "timeout": "4", "last_call_timeout": "1"}
    with ParticipantGroup(
        tmp_path,
        endpoint=etcd.endpoint,
        run_id=run_id,
        min_nodes=3,
        max_nodes=3,
        conf=conf,
        env=FAST_EXPORT,
    ) as group:
        survivor, doomed, third = group.start(3, backend="etcd-rdzv")
        survivor.send({"cmd": "rendezvous"})
        doomed.send({"cmd": "rendezvous"})
        # Both have joined and wait for a third node; kill one once its join is on file.
        wait_for_span(trace_file, "rendezvous.join", doomed.pid, timeout=30)
        wait_for_span(trace_file, "rendezvous.join", survivor.pid, timeout=30)
        doomed_node = node_of(doomed, trace_file)
        doomed.kill()
        # The third joins the version with the dead node in it: it freezes, and the two live
        # nodes confirm and wait in final_wait for a confirmation that never comes.
        third.send({"cmd": "rendezvous"})
        # Both time out first; only then shut down (shutting down closes the run).
        errors = [participant.expect("error", 30) for participant in (survivor, third)]
        assert [error["type"] for error in errors] == ["RendezvousTimeoutError"] * 2, errors
        for participant in (survivor, third):
            assert participant.request({"cmd": "shutdown"}, 30)["value"] is True

    assert main(["analyze", str(trace_file), "--run-id", run_id]) == 0
    text = capsys.readouterr().out
    assert f"straggler: {doomed_node} never confirmed" in text
    assert "in final_wait" in text

    plot = tmp_path / "killed.png"
    (run,) = analyze_json(capsys, str(trace_file), "--run-id", run_id, "--plot", str(plot))["runs"]
    (version,) = run["versions"]
    assert not version["complete"]
    statuses = {node["node"]: node["status"] for node in version["nodes"]}
    assert statuses[doomed_node] == "never_confirmed"
    # The live nodes' final_wait ends at the deadline (outcome retry, reason deadline).
    others = [status for node, status in statuses.items() if node != doomed_node]
    assert len(others) == 2 and set(others) <= {"ended_with_retry", "ended_with_error"}
    (straggler,) = version["stragglers"]
    assert (straggler["node"], straggler["kind"], straggler["waited_in"]) == (
        doomed_node,
        "never_confirmed",
        "final_wait",
    )
    assert straggler["held_back_seconds"] > 0.5
    assert [f["span"] for f in run["failures"]] == ["rendezvous"] * 2
    assert all("did not complete within 4s" in f["message"] for f in run["failures"])
    png_size(plot)
    panel = chart(trace_file, run_id)
    (doomed_row,) = [row for row in panel.rows if row.label.startswith(doomed_node)]
    assert doomed_row.straggler and UNCONFIRMED in doomed_row.marks
    assert {STRAGGLER, UNCONFIRMED} <= set(legend_labels([panel]))


def test_malformed_and_mismatched_inputs_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"resourceSpans": []}\n{oops\n')
    cases = {
        str(tmp_path / "missing.jsonl"): "missing.jsonl: no such file",
        str(empty): f"no spans in {empty}",
        str(bad): f"{bad}:2: malformed JSON",
    }
    for path, message in cases.items():
        assert main(["analyze", path]) == 2
        captured = capsys.readouterr()
        assert message in captured.err and "Traceback" not in captured.err


def test_a_node_that_never_came_is_reported_and_the_present_ones_are_not_blamed(
    tmp_path: Path, etcd: LocalEtcd, run_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    trace_file = tmp_path / "traces.jsonl"
    conf = {"trace_file": str(trace_file), "timeout": "3"}
    with ParticipantGroup(
        tmp_path, endpoint=etcd.endpoint, run_id=run_id, min_nodes=3, max_nodes=3, conf=conf
    ) as group:
        present = group.start(2, backend="etcd-rdzv")  # the third node never starts
        for participant in present:
            participant.send({"cmd": "rendezvous"})
        for participant in present:
            assert participant.expect("error", 30)["type"] == "RendezvousTimeoutError"
            assert participant.request({"cmd": "shutdown"}, 30)["value"] is True

    plot = tmp_path / "never_arrived.png"
    assert main(["analyze", str(trace_file), "--run-id", run_id, "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "never arrived: 1 of the 3 nodes it needs (min_nodes); the 2 present" in text, text
    assert "straggler" not in text and "never traced" not in text, text
    (run,) = analyze_json(capsys, str(trace_file), "--run-id", run_id)["runs"]
    assert [(v["never_arrived"], v["stragglers"]) for v in run["versions"]] == [(1, [])]
    assert [v["untraced_ranks"] for v in run["versions"]] == [[]]
    png_size(plot)
    panel = chart(trace_file, run_id)
    assert panel.rows[-1].label == "1 node never arrived (min 3)"
    labels = legend_labels([panel])
    assert NEVER_ARRIVED in labels and STRAGGLER not in labels and UNTRACED not in labels
