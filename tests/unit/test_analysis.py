"""etcd-rdzv analyze: readers, timelines and stragglers on small hand-written traces."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from etcd_rdzv.analysis import command
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
    if "min_nodes" in extra:
        attributes.append({"key": "rdzv.min_nodes", "value": {"intValue": str(extra["min_nodes"])}})
    return {
        "traceId": "ab" * 16,
        "spanId": f"{abs(hash((name, node, start))) % 16**16:016x}",
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
    (report,) = analyze(read_file(write(tmp_path, "t.jsonl", otlp_line(*waiting, *dead))))
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
    def waited(node: str, start: float) -> list[dict[str, Any]]:
        return [
            otlp_span("rendezvous.setup", node, start, start + 0.01, min_nodes=3),
            otlp_span("rendezvous.join", node, start + 0.01, start + 0.02, min_nodes=3),
            otlp_span(
                "rendezvous.frozen_wait", node, start + 0.02, 5.0, min_nodes=3, outcome="retry"
            ),
        ]

    (report,) = analyze(
        read_file(write(tmp_path, "t.jsonl", otlp_line(*waited("h:1", 0.0), *waited("h:2", 1.5))))
    )
    (version,) = report.versions
    assert (version.min_nodes, version.never_arrived, version.stragglers) == (3, 1, [])
    text = to_text([report])
    assert "never arrived: 1 of the 3 nodes it needs (min_nodes)" in text
    assert "straggler" not in text
    assert to_json([report])["runs"][0]["versions"][0]["never_arrived"] == 1


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
        "last_arrival", "min_nodes", "never_arrived", "stragglers", "nodes",
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
