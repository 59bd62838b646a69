"""`etcd-rdzv analyze FILE...`: where did a rendezvous spend its time, and who held it up."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from etcd_rdzv.analysis.spans import AnalysisError, read_spans
from etcd_rdzv.analysis.timeline import DEFAULT_LATE_THRESHOLD_SECONDS, analyze, to_json, to_text

EXIT_INPUT_ERROR = 2


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `analyze` parser to `subparsers` (from `ArgumentParser.add_subparsers`)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "analyze",
        help="report per-version timelines, stragglers and retries from recorded traces",
        description=(
            "Read etcd-rdzv spans from OTLP JSON lines files (the trace_file output; several "
            "files may be given or concatenated) or Jaeger JSON exports, and report per "
            "version: how long it took, who arrived last or never confirmed and how long that "
            "held the others back, where the time went, and the retries of each node."
        ),
    )
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="trace files")
    parser.add_argument("--run-id", help="only this run (default: every run in the files)")
    parser.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="also draw a Gantt chart per version"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument(
        "--late-threshold",
        type=float,
        default=DEFAULT_LATE_THRESHOLD_SECONDS,
        metavar="SECONDS",
        help="call the last arrival a straggler from this many seconds behind "
        f"(default {DEFAULT_LATE_THRESHOLD_SECONDS:g})",
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        reports = analyze(read_spans(args.files), args.run_id, args.late_threshold)
        if args.plot is not None:
            from etcd_rdzv.analysis.plot import plot

            plot(reports, args.plot)
    except AnalysisError as error:
        print(f"etcd-rdzv analyze: error: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    if args.json:
        print(json.dumps(to_json(reports), indent=2))
    else:
        sys.stdout.write(to_text(reports))
        if args.plot is not None:
            print(f"plot written to {args.plot}")
    return 0
