"""Stall analysis over recorded rendezvous traces: `etcd-rdzv analyze`.

`spans` reads OTLP JSON lines and Jaeger JSON into one `Span` type, `timeline` rebuilds each
version's per-node phases and finds stragglers and absent ranks, `chart` lays them out as rows
and legend marks, `plot` draws that, `command` is the CLI.
"""

from etcd_rdzv.analysis.spans import AnalysisError, Span, SpanEvent, read_spans
from etcd_rdzv.analysis.timeline import RunReport, analyze

__all__ = ["AnalysisError", "RunReport", "Span", "SpanEvent", "analyze", "read_spans"]
