"""etcd-rdzv analyze: readers, timelines and stragglers on small hand-written traces."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from etcd_rdzv.analysis import command
from etcd_rdzv.analysis.chart import (
    ERROR,
    NEVER_ARRIVED,
    RETRY,
    STRAGGLER,
    UNCONFIRMED,
    UNTRACED,
    Panel,
    legend_labels,
    panels,
)
from etcd_rdzv.analysis.spans import AnalysisError, Span, SpanEvent, read_file
from etcd_rdzv.analysis.timeline import NEVER_CONFIRMED, analyze, to_json, to_text

S = 1_000_000_000  # ns per second
T0 = 1_700_000_000 * S


def otlp_span(
    name: str, node: str, start: float, end: float, version: int | None = 1, **extra: Any
) -> dict[str, Any]:
    attributes: list[dict[str, Any]] = [
        {"key": "rdzv.run_id", "value": {"stringValue": "job"}},
        {"key": "rdzv.node", "value": {"stringValue": node}},
    ]
    if version is not None:
        attributes.append({"key": "rdzv.version", "value": {"intValue": str(version)}})
    if "outcome" in extra:
        attributes.append({"key": "rdzv.outcome", "value": {"stringValue": extra["outcome"]}})
    for key in ("min_nodes", "rank", "participants"):
        if key in extra:
            attributes.append({"key": f"rdzv.{key}", "value": {"intValue": str(extra[key])}})
    return {
        "traceId": "ab" * 16,
        "spanId": f"{abs(hash((name, node, start, version))) % 16**16:016x}",
        "name": name,
        "startTimeUnixNano": str(T0 + int(start * S)),
        "endTimeUnixNano": str(T0 + int(end * S)),
        "attributes": attributes,
        "events": extra.get("events", []),
        "status": {"code": "STATUS_CODE_ERROR"} if extra.get("error") else {},
    }


def otlp_line(*spans: dict[str, Any]) -> str:
    return json.dumps({"resourceSpans": [{"resource": {}, "scopeSpans": [{"spans": spans}]}]})


def phases(node: str, late: float = 0.0, confirm: bool = True) -> list[dict[str, Any]]:
    spans = [
        otlp_span("rendezvous.setup", node, late, late + 0.01),
        otlp_span("rendezvous.join", node, late + 0.01, late + 0.02),
        otlp_span("rendezvous.frozen_wait", node, late + 0.02, 2.0),
    ]
    if confirm:
        spans += [
            otlp_span("rendezvous.confirm", node, 2.0, 2.1),
            otlp_span("rendezvous.final_wait", node, 2.1, 2.2),
        ]
    return spans


def member(
    node: str, rank: int, world_size: int, late: float = 0.0, version: int = 1
) -> list[dict[str, Any]]:
    """`phases` with the rank and participants real agents annotate (torch's layout); each
    version 3 s after the one before."""
    at = 3.0 * (version - 1)
    begin = at + late
    ranked = {"rank": rank, "version": version}
    return [
        otlp_span("rendezvous.setup", node, begin, begin + 0.01, version=version),
        otlp_span(
            "rendezvous.join", node, begin + 0.01, begin + 0.02, participants=rank + 1, **ranked
        ),
        otlp_span(
            "rendezvous.frozen_wait",
            node,
            begin + 0.02,
            at + 2.0,
            participants=world_size,
            **ranked,
        ),
        otlp_span("rendezvous.confirm", node, at + 2.0, at + 2.1, **ranked),
        otlp_span("rendezvous.final_wait", node, at + 2.1, at + 2.2, **ranked),
    ]


def waited_for_more(
    node: str, start: float, min_nodes: int, rank: int | None = None
) -> list[dict[str, Any]]:
    """A node that joined a version that never froze, and waited until its timeout."""
    ranked = {} if rank is None else {"rank": rank, "participants": rank + 1}
    return [
        otlp_span("rendezvous.setup", node, start, start + 0.01, min_nodes=min_nodes),
        otlp_span(
            "rendezvous.join", node, start + 0.01, start + 0.02, min_nodes=min_nodes, **ranked
        ),
        otlp_span(
            "rendezvous.frozen_wait",
            node,
            start + 0.02,
            5.0,
            min_nodes=min_nodes,
            outcome="retry",
            **({} if rank is None else {"rank": rank}),
        ),
    ]


def killed_before_confirming() -> list[dict[str, Any]]:
    """h:2 joined and died; h:1 confirmed and failed waiting for it in final_wait."""
    waiting = [
        otlp_span("rendezvous.setup", "h:1", 0.0, 0.01),
        otlp_span("rendezvous.join", "h:1", 0.01, 0.02),
        otlp_span("rendezvous.frozen_wait", "h:1", 0.02, 1.0),
        otlp_span("rendezvous.confirm", "h:1", 1.0, 1.1),
        otlp_span("rendezvous.final_wait", "h:1", 1.1, 5.1, outcome="error", error=True),
    ]
    dead = [  # killed in frozen_wait: only its ended spans were exported
        otlp_span("rendezvous.setup", "h:2", 0.0, 0.01),
        otlp_span("rendezvous.join", "h:2", 0.01, 0.03),
    ]
    return waiting + dead


RETRY_EVENT = {
    "name": "retry",
    "timeUnixNano": str(T0 + S // 100),
    "attributes": [
        {"key": "rdzv.phase", "value": {"stringValue": "join"}},
        {"key": "rdzv.reason", "value": {"stringValue": "compare_failed"}},
        {"key": "rdzv.attempt", "value": {"intValue": "1"}},
    ],
}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="etcd-rdzv")
    command.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def test_otlp_lines_from_several_agents_are_read_and_merged(tmp_path: Path) -> None:
    lines = [otlp_line(*phases("h:1")), otlp_line(*phases("h:2")), ""]
    spans = read_file(write(tmp_path, "t.jsonl", "\n".join(lines)))
    assert len(spans) == 10
    join = next(s for s in spans if s.name == "rendezvous.join" and s.node == "h:1")
    assert (join.phase, join.version, join.run_id, join.outcome) == ("join", 1, "job", "ok")
    assert join.seconds == pytest.approx(0.01)


def test_jaeger_export_is_normalized_like_otlp(tmp_path: Path) -> None:
    def tag(key: str, kind: str, value: Any) -> dict[str, Any]:
        return {"key": key, "type": kind, "value": value}

    span = {
        "traceID": "t1",
        "spanID": "s2",
        "operationName": "rendezvous.confirm",
        "references": [{"refType": "CHILD_OF", "traceID": "t1", "spanID": "s1"}],
        "startTime": 1_700_000_000_000_000,
        "duration": 250_000,
        "tags": [
            tag("rdzv.run_id", "string", "job"),
            tag("rdzv.node", "string", "h:7"),
            tag("rdzv.version", "int64", 3),
            tag("rdzv.outcome", "string", "retry"),
            tag("otel.status_code", "string", "ERROR"),
        ],
        "logs": [
            {
                "timestamp": 1_700_000_000_100_000,
                "fields": [
                    tag("event", "string", "retry"),
                    tag("rdzv.reason", "string", "compare_failed"),
                    tag("rdzv.attempt", "int64", 2),
                ],
            }
        ],
        "processID": "p1",
    }
    export = {"data": [{"traceID": "t1", "spans": [span], "processes": {"p1": {}}}]}
    (read,) = read_file(write(tmp_path, "jaeger.json", json.dumps(export, indent=2)))
    assert read == Span(
        trace_id="t1",
        span_id="s2",
        parent_span_id="s1",
        name="rendezvous.confirm",
        start_ns=T0,
        end_ns=T0 + 250_000_000,
        attributes={
            "rdzv.run_id": "job",
            "rdzv.node": "h:7",
            "rdzv.version": 3,
            "rdzv.outcome": "retry",
            "otel.status_code": "ERROR",
        },
        events=(
            SpanEvent(
                "retry", T0 + 100_000_000, {"rdzv.reason": "compare_failed", "rdzv.attempt": 2}
            ),
        ),
        error=True,
        source=str(tmp_path / "jaeger.json"),
    )
    assert read.outcome == "retry" and read.version == 3


def test_late_arrival_is_the_straggler_and_frozen_wait_the_busiest_phase(tmp_path: Path) -> None:
    spans = [*phases("h:1"), *phases("h:2", late=0.005), *phases("h:3", late=1.5)]
    spans[1]["events"] = [RETRY_EVENT]
    (report,) = analyze(read_file(write(tmp_path, "t.jsonl", otlp_line(*spans))))
    (version,) = report.versions
    assert version.complete and version.seconds == pytest.approx(2.2)
    assert version.last_arrival == "h:3"
    (straggler,) = version.stragglers
    assert (straggler.node, straggler.kind, straggler.waited_in) == (
        "h:3",
        "late_arrival",
        "frozen_wait",
    )
    assert straggler.held_back_seconds == pytest.approx(1.4975, abs=1e-3)
    assert version.busiest_phase == "frozen_wait"
    (retry,) = report.retries
    assert (retry.node, retry.phase, retry.reason, retry.attempt) == (
        "h:1",
        "join",
        "compare_failed",
        1,
    )


def test_node_that_joined_but_never_confirmed_is_named_with_the_wait_it_caused(
    tmp_path: Path,
) -> None:
    (report,) = analyze(
        read_file(write(tmp_path, "t.jsonl", otlp_line(*killed_before_confirming())))
    )
    (version,) = report.versions
    assert not version.complete
    statuses = {node.node: node.status for node in version.nodes}
    assert statuses == {"h:1": "ended_with_error", "h:2": NEVER_CONFIRMED}
    stragglers = [s for s in version.stragglers if s.kind == NEVER_CONFIRMED]
    assert [(s.node, s.waited_in) for s in stragglers] == [("h:2", "final_wait")]
    assert stragglers[0].held_back_seconds == pytest.approx(4.0)
    assert [failure.node for failure in report.failures] == ["h:1"]


def test_nodes_that_never_came_are_reported_and_those_present_are_not_blamed(
    tmp_path: Path,
) -> None:
    # min 3, two nodes came, 1.5 s apart, and waited until their timeout: the version never
    # froze. Neither of them held anything up; the node that never came did.
    spans = [*waited_for_more("h:1", 0.0, min_nodes=3), *waited_for_more("h:2", 1.5, min_nodes=3)]
    (report,) = analyze(read_file(write(tmp_path, "t.jsonl", otlp_line(*spans))))
    (version,) = report.versions
    assert (version.min_nodes, version.never_arrived, version.stragglers) == (3, 1, [])
    text = to_text([report])
    assert "never arrived: 1 of the 3 nodes it needs (min_nodes)" in text
    assert "straggler" not in text
    assert to_json([report])["runs"][0]["versions"][0]["never_arrived"] == 1


def test_a_rank_without_spans_is_reported_as_never_traced(tmp_path: Path) -> None:
    # The version froze with 3 participants; rank 2's node left no trace file.
    spans = [*member("h:1", 0, world_size=3), *member("h:2", 1, world_size=3)]
    (report,) = analyze(read_file(write(tmp_path, "t.jsonl", otlp_line(*spans))))
    (version,) = report.versions
    assert (version.world_size, version.untraced_ranks, version.never_arrived) == (3, [2], 0)
    text = to_text([report])
    assert "    rank 2 never traced: the version had 3 participants and no spans name it" in text
    document = to_json([report])["runs"][0]["versions"][0]
    assert (document["world_size"], document["untraced_ranks"]) == (3, [2])


def test_the_frozen_size_counts_and_a_too_late_claim_names_no_rank(tmp_path: Path) -> None:
    # Claims: a claim after the version filled names max_nodes as participants and no rank.
    too_late = otlp_span("rendezvous.join", "h:3", 0.5, 0.6, participants=8, outcome="retry")
    spans = [*member("h:1", 0, world_size=2), *member("h:2", 1, world_size=2), too_late]
    (report,) = analyze(read_file(write(tmp_path, "t.jsonl", otlp_line(*spans))))
    (version,) = report.versions
    assert (version.world_size, version.untraced_ranks) == (2, [])
    assert "never traced" not in to_text([report])


def test_an_untraced_rank_arrived_and_is_not_counted_as_never_arrived(tmp_path: Path) -> None:
    # min 4, never froze: ranks 1 and 2 traced, and rank 2's join saw 3 participants, so rank 0
    # joined too, untraced. One node never came, not two.
    spans = [
        *waited_for_more("h:1", 0.0, min_nodes=4, rank=1),
        *waited_for_more("h:2", 0.5, min_nodes=4, rank=2),
    ]
    (report,) = analyze(read_file(write(tmp_path, "t.jsonl", otlp_line(*spans))))
    (version,) = report.versions
    assert (version.world_size, version.untraced_ranks, version.never_arrived) == (3, [0], 1)
    text = to_text([report])
    assert "never arrived: 1 of the 4 nodes it needs (min_nodes); the 3 present" in text
    assert "rank 0 never traced" in text


def test_a_setup_without_version_belongs_to_the_nodes_next_version(tmp_path: Path) -> None:
    spans = [
        otlp_span("rendezvous.setup", "h:1", -0.1, 0.0, version=None, outcome="retry"),
        *phases("h:1"),
    ]
    (report,) = analyze(read_file(write(tmp_path, "t.jsonl", otlp_line(*spans))))
    assert [bar.phase for bar in report.versions[0].nodes[0].bars][:2] == ["setup", "setup"]


def test_json_report_has_stable_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "t.jsonl", otlp_line(*phases("h:1"), *phases("h:2", late=1.0)))
    assert run_cli(["analyze", str(path), "--json", "--run-id", "job"]) == 0
    (run,) = json.loads(capsys.readouterr().out)["runs"]
    assert set(run) == {"run_id", "nodes", "versions", "retries", "failures"}
    (version,) = run["versions"]
    assert set(version) == {
        "version", "start", "end", "seconds", "complete", "busiest_phase", "phase_seconds",
        "last_arrival", "min_nodes", "never_arrived", "world_size", "untraced_ranks", "stragglers",
        "nodes",
    }  # fmt: skip
    assert version["stragglers"][0]["node"] == "h:2"
    assert set(version["nodes"][0]) == {
        "node", "rank", "status", "joined_at", "confirmed_at", "finished_at", "phases",
    }  # fmt: skip
    assert run == to_json(analyze(read_file(path)))["runs"][0]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "no spans in {path}: the file is empty"),
        ("\n  \n", "no spans in {path}: the file is empty"),
        (otlp_line() + "\n", "no spans in {path}"),
        (otlp_line(*phases("h:1")) + "\n{not json\n", "{path}:2: malformed JSON"),
        ('{"hello": 1}\n', "{path}:1: not an OTLP or Jaeger trace document"),
    ],
)
def test_bad_input_is_a_clear_error_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    path = write(tmp_path, "t.jsonl", content)
    assert run_cli(["analyze", str(path)]) == 2
    captured = capsys.readouterr()
    assert message.format(path=path) in captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_missing_file_and_unknown_run_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(["analyze", str(tmp_path / "nope.jsonl")]) == 2
    assert f"{tmp_path / 'nope.jsonl'}: no such file" in capsys.readouterr().err
    path = write(tmp_path, "t.jsonl", otlp_line(*phases("h:1")))
    assert run_cli(["analyze", str(path), "--run-id", "other"]) == 2
    assert "no spans for run id 'other' (run ids found: job)" in capsys.readouterr().err
    with pytest.raises(AnalysisError, match="no etcd-rdzv spans"):
        analyze([])


def test_plot_without_matplotlib_says_how_to_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    path = write(tmp_path, "t.jsonl", otlp_line(*phases("h:1")))
    assert run_cli(["analyze", str(path), "--plot", str(tmp_path / "t.png")]) == 2
    assert "pip install etcd-rdzv[plot]" in capsys.readouterr().err
    assert not (tmp_path / "t.png").exists()


# --- the chart, as data ------------------------------------------------------------------------


def chart_of(tmp_path: Path, spans: list[dict[str, Any]]) -> list[Panel]:
    return panels(analyze(read_file(write(tmp_path, "t.jsonl", otlp_line(*spans)))))


COMPLETED_PHASES = ["setup", "join", "frozen_wait", "confirm", "final_wait"]


def test_the_legend_has_no_straggler_when_no_drawn_row_is_one(tmp_path: Path) -> None:
    chart = chart_of(tmp_path, [*member("h:1", 0, 2), *member("h:2", 1, 2, late=0.005)])
    assert not any(row.straggler for panel in chart for row in panel.rows)
    assert legend_labels(chart) == COMPLETED_PHASES


def test_the_legend_has_straggler_when_a_drawn_row_is_one(tmp_path: Path) -> None:
    spans = [*member("h:1", 0, 2), *member("h:2", 1, 2, late=1.5)]
    # h:1's setup started over: its bar is hatched, and the legend says what that means.
    spans[0] = otlp_span("rendezvous.setup", "h:1", 0.0, 0.01, outcome="retry")
    (panel,) = chart_of(tmp_path, spans)
    assert [(row.label, row.straggler) for row in panel.rows] == [
        ("h:1 (rank 0)", False),
        ("h:2 (rank 1)", True),
    ]
    assert legend_labels([panel]) == [*COMPLETED_PHASES, RETRY, STRAGGLER]


def test_an_untraced_rank_has_a_row_across_the_version_and_its_legend_entry(
    tmp_path: Path,
) -> None:
    (panel,) = chart_of(tmp_path, [*member("h:1", 0, 3), *member("h:2", 1, 3)])
    assert [row.label for row in panel.rows] == ["h:1 (rank 0)", "h:2 (rank 1)", "rank 2: no trace"]
    missing = panel.rows[-1]
    assert missing.absent and not missing.straggler
    (across,) = missing.segments
    assert (across.kind, across.start) == (UNTRACED, 0.0)
    assert across.seconds == pytest.approx(2.2)
    assert legend_labels([panel]) == [*COMPLETED_PHASES, UNTRACED]


def test_nodes_that_never_arrived_have_one_row_and_no_straggler(tmp_path: Path) -> None:
    spans = [*waited_for_more("h:1", 0.0, min_nodes=4), *waited_for_more("h:2", 1.5, min_nodes=4)]
    (panel,) = chart_of(tmp_path, spans)
    assert [row.label for row in panel.rows] == ["h:1", "h:2", "2 nodes never arrived (min 4)"]
    assert [segment.kind for segment in panel.rows[-1].segments] == [NEVER_ARRIVED]
    assert legend_labels([panel]) == ["setup", "join", "frozen_wait", RETRY, NEVER_ARRIVED]


def test_a_node_that_never_confirmed_is_drawn_absent_until_the_version_ends(
    tmp_path: Path,
) -> None:
    (panel,) = chart_of(tmp_path, killed_before_confirming())
    survivor, dead = panel.rows
    assert dead.straggler and not survivor.straggler
    gone = dead.segments[-1]
    assert gone.kind == UNCONFIRMED
    assert gone.start == pytest.approx(0.03) and gone.seconds == pytest.approx(5.07)
    assert UNCONFIRMED not in survivor.marks
    assert legend_labels([panel]) == [*COMPLETED_PHASES, ERROR, STRAGGLER, UNCONFIRMED]


def test_the_legend_covers_the_marks_of_every_drawn_version(tmp_path: Path) -> None:
    # Version 2 lost rank 1's trace: its row is drawn there only, and the legend names it.
    spans = [
        *member("h:1", 0, world_size=2),
        *member("h:2", 1, world_size=2),
        *member("h:1", 0, world_size=2, version=2),
    ]
    chart = chart_of(tmp_path, spans)
    assert [row.label for row in chart[0].rows] == ["h:1 (rank 0)", "h:2 (rank 1)"]
    assert [row.label for row in chart[1].rows] == ["h:1 (rank 0)", "rank 1: no trace"]
    assert legend_labels(chart) == [*COMPLETED_PHASES, UNTRACED]


def test_plot_writes_a_png_with_a_row_for_the_untraced_rank(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import matplotlib.image

    def plotted(world_size: int) -> tuple[int, int]:
        spans = [*member("h:1", 0, world_size), *member("h:2", 1, world_size)]
        path = write(tmp_path, f"w{world_size}.jsonl", otlp_line(*spans))
        png = tmp_path / f"w{world_size}.png"
        assert run_cli(["analyze", str(path), "--plot", str(png)]) == 0
        assert f"plot written to {png}" in capsys.readouterr().out
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width = matplotlib.image.imread(png).shape[:2]
        return width, height

    (width, height), (width_with_missing, height_with_missing) = plotted(2), plotted(3)
    assert width_with_missing == width and height_with_missing > height
