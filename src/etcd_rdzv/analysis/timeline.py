"""Rebuild each version's per-node phase timeline and name the nodes that held it up."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from etcd_rdzv.analysis.spans import AnalysisError, Span

PHASES = (
    "setup",
    "join",
    "last_call",
    "frozen_wait",
    "confirm",
    "final_wait",
    "wait_next_version",
)
# A last arrival this far behind the others is called a straggler.
DEFAULT_LATE_THRESHOLD_SECONDS = 0.5
# Phases a node enters only once the version froze: their `rdzv.participants` is its final size.
_FROZEN_SIZE_PHASES = frozenset({"frozen_wait", "wait_next_version"})

# Node statuses within a version.
COMPLETED = "completed"  # confirmed, and its final wait ended well
NEVER_CONFIRMED = "never_confirmed"  # joined, but no successful confirm
ENDED_WITH_ERROR = "ended_with_error"  # confirmed, then its last phase failed
ENDED_WITH_RETRY = "ended_with_retry"  # confirmed, then the version moved on under it
NOT_JOINED = "not_joined"  # only setup or waiting spans in this version


@dataclass(frozen=True)
class Bar:
    phase: str
    start_ns: int
    end_ns: int
    outcome: str

    @property
    def seconds(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


@dataclass(frozen=True)
class Retry:
    node: str
    version: int | None
    phase: str | None
    reason: str
    attempt: int | None
    detail: str | None
    time_ns: int


@dataclass(frozen=True)
class Failure:
    node: str
    span: str
    message: str
    time_ns: int


@dataclass
class NodeTimeline:
    node: str
    bars: list[Bar]
    rank: int | None = None
    status: str = NOT_JOINED

    @property
    def joined_ns(self) -> int | None:
        joins = [bar.start_ns for bar in self.bars if bar.phase == "join"]
        return min(joins) if joins else None

    @property
    def confirmed_ns(self) -> int | None:
        confirms = [b.end_ns for b in self.bars if b.phase == "confirm" and b.outcome == "ok"]
        return max(confirms) if confirms else None

    @property
    def start_ns(self) -> int:
        return min(bar.start_ns for bar in self.bars)

    @property
    def end_ns(self) -> int:
        return max(bar.end_ns for bar in self.bars)


@dataclass(frozen=True)
class Straggler:
    node: str
    kind: str  # "late_arrival" or "never_confirmed"
    held_back_seconds: float
    waited_in: str | None  # the phase the others were in while held back
    detail: str


@dataclass
class VersionReport:
    version: int
    nodes: list[NodeTimeline]
    stragglers: list[Straggler] = field(default_factory=list)
    last_arrival: str | None = None
    last_arrival_behind_seconds: float | None = None
    # The nodes' min_nodes (`rdzv.min_nodes`), and how many of those never joined a version
    # that never froze: then they, not the nodes present, held it up.
    min_nodes: int | None = None
    never_arrived: int = 0
    # How many took part, as the spans' `rdzv.participants` say: the frozen size once a node saw
    # it frozen, else the most that had joined; None when no span says.
    world_size: int | None = None

    @property
    def untraced_ranks(self) -> list[int]:
        """Ranks the version had that no node's spans name: their node left no trace here."""
        if self.world_size is None:
            return []
        traced = {node.rank for node in self.nodes}
        return [rank for rank in range(self.world_size) if rank not in traced]

    @property
    def start_ns(self) -> int:
        return min(node.start_ns for node in self.nodes)

    @property
    def end_ns(self) -> int:
        """The last successful final wait's end; the last phase's end if none succeeded."""
        finals = [
            bar.end_ns
            for node in self.nodes
            for bar in node.bars
            if bar.phase == "final_wait" and bar.outcome == "ok"
        ]
        return max(finals) if finals else max(node.end_ns for node in self.nodes)

    @property
    def seconds(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9

    @property
    def complete(self) -> bool:
        joined = [node for node in self.nodes if node.status != NOT_JOINED]
        return bool(joined) and all(node.status == COMPLETED for node in joined)

    @property
    def phase_seconds(self) -> dict[str, float]:
        """Time per phase, summed over nodes, in protocol order."""
        totals: dict[str, float] = defaultdict(float)
        for node in self.nodes:
            for bar in node.bars:
                totals[bar.phase] += bar.seconds
        return {phase: totals[phase] for phase in _ordered(totals)}

    @property
    def busiest_phase(self) -> str | None:
        totals = self.phase_seconds
        return max(totals, key=lambda phase: totals[phase]) if totals else None


@dataclass
class RunReport:
    run_id: str
    versions: list[VersionReport]
    retries: list[Retry]
    failures: list[Failure]

    @property
    def nodes(self) -> list[str]:
        return sorted({node.node for version in self.versions for node in version.nodes})


def analyze(
    spans: Iterable[Span],
    run_id: str | None = None,
    late_threshold: float = DEFAULT_LATE_THRESHOLD_SECONDS,
) -> list[RunReport]:
    """One report per run id (only `run_id`'s when given), versions in order."""
    by_run: dict[str, list[Span]] = defaultdict(list)
    for span in spans:
        if span.run_id is not None and span.node is not None:
            by_run[span.run_id].append(span)
    if run_id is not None:
        if run_id not in by_run:
            found = ", ".join(sorted(by_run)) or "none"
            raise AnalysisError(f"no spans for run id {run_id!r} (run ids found: {found})")
        by_run = {run_id: by_run[run_id]}
    if not by_run:
        raise AnalysisError("no etcd-rdzv spans (with rdzv.run_id and rdzv.node) in the input")
    return [_analyze_run(rid, by_run[rid], late_threshold) for rid in sorted(by_run)]


def _analyze_run(run_id: str, spans: list[Span], late_threshold: float) -> RunReport:
    spans = sorted(_unique(spans), key=lambda span: (span.start_ns, span.end_ns))
    by_version: dict[int, dict[str, list[Span]]] = defaultdict(lambda: defaultdict(list))
    for span, version in _phase_spans_with_versions(spans):
        assert span.node is not None
        by_version[version][span.node].append(span)
    versions = [
        _analyze_version(version, nodes, late_threshold)
        for version, nodes in sorted(by_version.items())
    ]
    return RunReport(run_id, versions, _retries(spans), _failures(spans))


def _unique(spans: Iterable[Span]) -> list[Span]:
    # The same file given twice, or a file and a Jaeger export of it: count each span once.
    seen: dict[tuple[str, str], Span] = {}
    for span in spans:
        seen.setdefault((span.trace_id, span.span_id), span)
    return list(seen.values())


def _phase_spans_with_versions(spans: Sequence[Span]) -> list[tuple[Span, int]]:
    """Phase spans and their version; a span without one (a setup that started over before
    it knew the version) belongs to the node's next version, else to its previous one."""
    by_node: dict[str, list[Span]] = defaultdict(list)
    for span in spans:
        if span.phase is not None and span.node is not None:
            by_node[span.node].append(span)
    placed: list[tuple[Span, int]] = []
    for node_spans in by_node.values():
        known = [span.version for span in node_spans]
        for index, span in enumerate(node_spans):
            version = span.version
            if version is None:
                later = [v for v in known[index + 1 :] if v is not None]
                earlier = [v for v in known[:index] if v is not None]
                version = later[0] if later else (earlier[-1] if earlier else None)
            if version is not None:
                placed.append((span, version))
    return placed


def _analyze_version(
    version: int, nodes: dict[str, list[Span]], late_threshold: float
) -> VersionReport:
    timelines = [_node_timeline(node, spans) for node, spans in sorted(nodes.items())]
    report = VersionReport(
        version, timelines, min_nodes=_min_nodes(nodes), world_size=_world_size(nodes)
    )
    joined = [node for node in timelines if node.joined_ns is not None]
    # A rank whose node left no spans still arrived: count it, not as a node that never came.
    arrived = max(len(joined), report.world_size or 0)
    # Nodes confirm only once the version froze: without any confirmation it never did.
    froze = any(bar.phase == "confirm" for node in timelines for bar in node.bars)
    if not froze and report.min_nodes is not None and arrived < report.min_nodes:
        # Waiting for nodes that never came: the ones present held nobody back.
        report.never_arrived = report.min_nodes - arrived
    if len(joined) >= 2:
        last = max(joined, key=lambda node: node.joined_ns or 0)
        others = [node.joined_ns or 0 for node in joined if node is not last]
        behind = ((last.joined_ns or 0) - statistics.median(others)) / 1e9
        report.last_arrival, report.last_arrival_behind_seconds = last.node, behind
        if behind >= late_threshold and not report.never_arrived:
            waited_in = _phase_at([n for n in joined if n is not last], last.joined_ns or 0)
            report.stragglers.append(
                Straggler(
                    node=last.node,
                    kind="late_arrival",
                    held_back_seconds=behind,
                    waited_in=waited_in,
                    detail=(
                        f"joined {behind:.3f} s after the median of the others"
                        + (f", who waited in {waited_in}" if waited_in else "")
                    ),
                )
            )
    for node in timelines:
        if node.status == NEVER_CONFIRMED and froze:
            report.stragglers.append(_never_confirmed(node, timelines))
    return report


def _min_nodes(nodes: dict[str, list[Span]]) -> int | None:
    """The min_nodes the version's nodes said they run with (the most common, if they differ)."""
    values = Counter(
        value
        for spans in nodes.values()
        for span in spans
        if isinstance(value := span.attributes.get("rdzv.min_nodes"), int)
    )
    return values.most_common(1)[0][0] if values else None


def _world_size(nodes: dict[str, list[Span]]) -> int | None:
    """The version's size: as frozen, where a span saw it so, else the most joined that a join
    saw (a join claimed too late has no rank, and names max_nodes rather than who joined)."""
    frozen: list[int] = []
    joined: list[int] = []
    for span in (span for spans in nodes.values() for span in spans):
        participants = span.attributes.get("rdzv.participants")
        if not isinstance(participants, int) or isinstance(participants, bool):
            continue
        if span.phase in _FROZEN_SIZE_PHASES:
            frozen.append(participants)
        elif span.phase == "join" and (span.rank is not None or "rdzv.place" in span.attributes):
            # A join with a place but no rank yet: a rank policy ranks it at the freeze.
            joined.append(participants)
    sizes = frozen or joined
    return max(sizes) if sizes else None


def _node_timeline(node: str, spans: list[Span]) -> NodeTimeline:
    bars = [Bar(str(s.phase), s.start_ns, s.end_ns, s.outcome) for s in spans]
    ranks = [span.rank for span in spans if span.rank is not None]
    timeline = NodeTimeline(node, bars, rank=ranks[-1] if ranks else None)
    if timeline.joined_ns is None:
        timeline.status = NOT_JOINED
    elif timeline.confirmed_ns is None:
        timeline.status = NEVER_CONFIRMED
    elif any(b.phase == "final_wait" and b.outcome == "ok" for b in bars):
        timeline.status = COMPLETED
    else:
        last = max(bars, key=lambda bar: bar.end_ns)
        timeline.status = ENDED_WITH_RETRY if last.outcome == "retry" else ENDED_WITH_ERROR
    return timeline


def _never_confirmed(node: NodeTimeline, timelines: list[NodeTimeline]) -> Straggler:
    others = [other for other in timelines if other is not node and other.bars]
    confirmed = [other.confirmed_ns for other in others if other.confirmed_ns is not None]
    last_bar = max(node.bars, key=lambda bar: bar.end_ns)
    seen_until = (
        f"last seen in {last_bar.phase} ({last_bar.outcome}) "
        f"{(last_bar.end_ns - node.start_ns) / 1e9:.3f} s after it started"
    )
    if not others:
        return Straggler(node.node, NEVER_CONFIRMED, 0.0, None, f"never confirmed; {seen_until}")
    others_end = max(other.end_ns for other in others)
    if confirmed:
        # The others were done confirming; everything after that was spent waiting for it.
        since = max(confirmed)
        what = "after confirming"
    else:
        since = max(other.joined_ns or other.start_ns for other in others)
        what = "after joining"
    held = max(0.0, (others_end - since) / 1e9)
    waited_in = _phase_at(others, since + (others_end - since) // 2)
    detail = f"never confirmed; {seen_until}; the others waited {held:.3f} s {what}" + (
        f", in {waited_in}" if waited_in else ""
    )
    return Straggler(node.node, NEVER_CONFIRMED, held, waited_in, detail)


def _phase_at(nodes: Iterable[NodeTimeline], at_ns: int) -> str | None:
    """The phase most of `nodes` were in at `at_ns`."""
    phases = Counter(
        bar.phase for node in nodes for bar in node.bars if bar.start_ns <= at_ns <= bar.end_ns
    )
    return phases.most_common(1)[0][0] if phases else None


def _retries(spans: Iterable[Span]) -> list[Retry]:
    retries = []
    for span in spans:
        for event in span.events:
            if event.name != "retry":
                continue
            attempt = event.attributes.get("rdzv.attempt")
            phase = event.attributes.get("rdzv.phase", span.phase)
            detail = event.attributes.get("rdzv.detail")
            retries.append(
                Retry(
                    node=str(span.node),
                    version=span.version,
                    phase=None if phase is None else str(phase),
                    reason=str(event.attributes.get("rdzv.reason", "unknown")),
                    attempt=attempt if isinstance(attempt, int) else None,
                    detail=None if detail is None else str(detail),
                    time_ns=event.time_ns,
                )
            )
    return sorted(retries, key=lambda retry: retry.time_ns)


def _failures(spans: Iterable[Span]) -> list[Failure]:
    failures = []
    for span in spans:
        if span.outcome != "error":
            continue
        messages = [
            str(event.attributes.get("exception.message", event.attributes.get("message", "")))
            for event in span.events
            if event.name == "exception"
        ]
        message = next((m for m in messages if m), "failed")
        failures.append(Failure(str(span.node), span.name, message, span.end_ns))
    return sorted(failures, key=lambda failure: failure.time_ns)


def _ordered(phases: Iterable[str]) -> list[str]:
    present = set(phases)
    return [p for p in PHASES if p in present] + sorted(present - set(PHASES))


# --- rendering ---------------------------------------------------------------------------------


def to_json(reports: Sequence[RunReport]) -> dict[str, Any]:
    """The `--json` document; field names are stable."""
    return {"runs": [_run_json(report) for report in reports]}


def _seconds(ns: int | None) -> float | None:
    return None if ns is None else round(ns / 1e9, 6)


def _run_json(report: RunReport) -> dict[str, Any]:
    return {
        "run_id": report.run_id,
        "nodes": report.nodes,
        "versions": [
            {
                "version": v.version,
                "start": _seconds(v.start_ns),
                "end": _seconds(v.end_ns),
                "seconds": round(v.seconds, 6),
                "complete": v.complete,
                "busiest_phase": v.busiest_phase,
                "phase_seconds": {k: round(s, 6) for k, s in v.phase_seconds.items()},
                "last_arrival": None
                if v.last_arrival is None
                else {
                    "node": v.last_arrival,
                    "behind_seconds": round(v.last_arrival_behind_seconds or 0.0, 6),
                },
                "min_nodes": v.min_nodes,
                "never_arrived": v.never_arrived,
                "world_size": v.world_size,
                "untraced_ranks": v.untraced_ranks,
                "stragglers": [
                    {
                        "node": s.node,
                        "kind": s.kind,
                        "held_back_seconds": round(s.held_back_seconds, 6),
                        "waited_in": s.waited_in,
                        "detail": s.detail,
                    }
                    for s in v.stragglers
                ],
                "nodes": [
                    {
                        "node": n.node,
                        "rank": n.rank,
                        "status": n.status,
                        "joined_at": _seconds(n.joined_ns),
                        "confirmed_at": _seconds(n.confirmed_ns),
                        "finished_at": _seconds(n.end_ns),
                        "phases": [
                            {
                                "phase": b.phase,
                                "start": _seconds(b.start_ns),
                                "end": _seconds(b.end_ns),
                                "seconds": round(b.seconds, 6),
                                "outcome": b.outcome,
                            }
                            for b in n.bars
                        ],
                    }
                    for n in v.nodes
                ],
            }
            for v in report.versions
        ],
        "retries": [
            {
                "node": r.node,
                "version": r.version,
                "phase": r.phase,
                "reason": r.reason,
                "attempt": r.attempt,
                "detail": r.detail,
                "at": _seconds(r.time_ns),
            }
            for r in report.retries
        ],
        "failures": [
            {"node": f.node, "span": f.span, "message": f.message, "at": _seconds(f.time_ns)}
            for f in report.failures
        ],
    }


def to_text(reports: Sequence[RunReport]) -> str:
    """The report in plain words."""
    lines: list[str] = []
    for report in reports:
        lines.append(
            f"run {report.run_id}: {len(report.nodes)} node(s), {len(report.versions)} version(s)"
        )
        for v in report.versions:
            lines.extend(_version_text(v))
        lines.extend(_retries_text(report))
        for failure in report.failures:
            lines.append(f"  failed: {failure.node} {failure.span}: {failure.message}")
    return "\n".join(lines) + "\n"


def _version_text(v: VersionReport) -> list[str]:
    state = "complete" if v.complete else "incomplete"
    lines = [f"  version {v.version}: {v.seconds:.3f} s, {state}, {len(v.nodes)} node(s)"]
    if v.never_arrived and v.min_nodes is not None:
        present = v.min_nodes - v.never_arrived
        lines.append(
            f"    never arrived: {v.never_arrived} of the {v.min_nodes} nodes it needs "
            f"(min_nodes); the {present} present waited for them, and held nobody back"
        )
    if v.untraced_ranks:
        them = "them" if len(v.untraced_ranks) > 1 else "it"
        lines.append(
            f"    {_ranks_text(v.untraced_ranks)} never traced: the version had {v.world_size} "
            f"participants and no spans name {them} (a trace file missing, or a node that died "
            "before exporting)"
        )
    if v.last_arrival is not None:
        lines.append(
            f"    last to arrive: {v.last_arrival}, "
            f"{v.last_arrival_behind_seconds or 0.0:.3f} s after the median of the others"
        )
    for straggler in v.stragglers:
        what = "arrived late" if straggler.kind == "late_arrival" else "never confirmed"
        lines.append(
            f"    straggler: {straggler.node} {what}, held the others back "
            f"{straggler.held_back_seconds:.3f} s ({straggler.detail})"
        )
    totals = v.phase_seconds
    if v.busiest_phase is not None:
        spread = ", ".join(f"{phase} {s:.3f} s" for phase, s in totals.items())
        lines.append(f"    most time in: {v.busiest_phase} (summed over nodes: {spread})")
    for node in v.nodes:
        rank = "-" if node.rank is None else str(node.rank)
        phases = " ".join(
            f"{bar.phase} {bar.seconds:.3f}s" + ("" if bar.outcome == "ok" else f"[{bar.outcome}]")
            for bar in node.bars
        )
        lines.append(f"    {node.node} rank {rank} {node.status}: {phases}")
    return lines


def _ranks_text(ranks: Sequence[int]) -> str:
    """`rank 2`, `ranks 0, 2`."""
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def _retries_text(report: RunReport) -> list[str]:
    if not report.retries:
        return ["  retries: none"]
    lines = [f"  retries: {len(report.retries)}"]
    by_node: dict[str, Counter[tuple[str, str]]] = defaultdict(Counter)
    for retry in report.retries:
        by_node[retry.node][(retry.phase or "etcd", retry.reason)] += 1
    for node, counts in sorted(by_node.items()):
        spread = ", ".join(f"{phase}/{reason} x{n}" for (phase, reason), n in counts.items())
        lines.append(f"    {node}: {spread}")
    return lines
