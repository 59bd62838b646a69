"""What the Gantt chart shows, as data: per version its rows, their segments and their marks.

`plot` only draws this, so what the picture says, absent ranks and the legend included, is
decided and tested here without matplotlib.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from etcd_rdzv.analysis.timeline import NEVER_CONFIRMED, PHASES, RunReport, VersionReport

# The marks besides the phases' colours, in legend order. Each is the legend's label for it.
RETRY = "ended in retry"  # a phase bar that started over
ERROR = "ended in error"  # a phase bar that failed
STRAGGLER = "straggler"  # the rows of the nodes that held the others back
UNCONFIRMED = "never confirmed"  # a straggler's stretch from its last span to the version's end
UNTRACED = "no trace"  # a row for a rank of the version that no spans name
NEVER_ARRIVED = "never arrived"  # a row for the nodes below min_nodes that never joined
MARKS = (RETRY, ERROR, STRAGGLER, UNCONFIRMED, UNTRACED, NEVER_ARRIVED)
# Segments that draw something absent rather than a phase.
ABSENCES = frozenset({UNCONFIRMED, UNTRACED, NEVER_ARRIVED})


@dataclass(frozen=True)
class Segment:
    """One bar: a phase (hatched unless it ended ok), or a stretch in which something was absent."""

    start: float  # seconds since the version's first phase
    seconds: float
    kind: str  # the phase, or one of ABSENCES
    outcome: str = "ok"

    @property
    def outcome_mark(self) -> str | None:
        if self.outcome == "ok":
            return None
        return RETRY if self.outcome == "retry" else ERROR

    @property
    def marks(self) -> tuple[str, ...]:
        return (self.kind,) if self.outcome_mark is None else (self.kind, self.outcome_mark)


@dataclass(frozen=True)
class Row:
    label: str
    segments: tuple[Segment, ...]
    straggler: bool = False
    absent: bool = False  # no spans behind it: the row stands for what is missing

    @property
    def marks(self) -> set[str]:
        drawn = {mark for segment in self.segments for mark in segment.marks}
        return drawn | {STRAGGLER} if self.straggler else drawn


@dataclass(frozen=True)
class Panel:
    title: str
    rows: tuple[Row, ...]


def panels(reports: Sequence[RunReport]) -> list[Panel]:
    """One panel per version, in the reports' order."""
    return [version_panel(report.run_id, v) for report in reports for v in report.versions]


def version_panel(run_id: str, version: VersionReport) -> Panel:
    """A row per traced node, then a row per untraced rank, then one for the nodes that never
    arrived: what left no spans still has its place."""
    state = "complete" if version.complete else "incomplete"
    title = f"run {run_id}, version {version.version}: {version.seconds:.3f} s, {state}"
    absent_rows = [
        _absent_row(f"rank {rank}: no trace", UNTRACED, version) for rank in version.untraced_ranks
    ]
    if version.never_arrived:
        nodes = "node" if version.never_arrived == 1 else "nodes"
        label = f"{version.never_arrived} {nodes} never arrived (min {version.min_nodes})"
        absent_rows.append(_absent_row(label, NEVER_ARRIVED, version))
    return Panel(title, (*_node_rows(version), *absent_rows))


def legend_labels(drawn_panels: Iterable[Panel]) -> list[str]:
    """A label for every mark the panels draw and for none they do not: phases in protocol
    order, then the other marks."""
    drawn = {mark for panel in drawn_panels for row in panel.rows for mark in row.marks}
    other_phases = sorted(drawn - set(PHASES) - set(MARKS))
    return [p for p in PHASES if p in drawn] + other_phases + [m for m in MARKS if m in drawn]


def _node_rows(version: VersionReport) -> list[Row]:
    origin = version.start_ns
    stragglers = {s.node for s in version.stragglers}
    unconfirmed = {s.node for s in version.stragglers if s.kind == NEVER_CONFIRMED}
    rows = []
    for node in version.nodes:
        segments = [
            Segment((bar.start_ns - origin) / 1e9, bar.seconds, bar.phase, bar.outcome)
            for bar in node.bars
        ]
        gone_ns = version.end_ns - node.end_ns
        if node.node in unconfirmed and gone_ns > 0:
            # From its last span on, the others waited for a confirmation that never came.
            segments.append(Segment((node.end_ns - origin) / 1e9, gone_ns / 1e9, UNCONFIRMED))
        label = node.node if node.rank is None else f"{node.node} (rank {node.rank})"
        rows.append(Row(label, tuple(segments), straggler=node.node in stragglers))
    return rows


def _absent_row(label: str, kind: str, version: VersionReport) -> Row:
    return Row(label, (Segment(0.0, version.seconds, kind),), absent=True)
