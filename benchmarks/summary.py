"""Rounds summed up per setup and N, the cost of telemetry and of rank policies, and the
targets (issues 8 and 16) judged."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from benchmarks.rounds import REFERENCE, RoundResult

# The setups the targets are judged on: etcd-rdzv's default transport, telemetry off and on.
JUDGED = ("etcd-rdzv v3, telemetry off", "etcd-rdzv v3, telemetry on")
TRANSPORTS = ("v3", "v2")
FRESH, AGAIN = "fresh run", "re-rendezvous"


@dataclass
class Summary:
    """One setup at one N, over its rounds."""

    setup: str
    nodes: int
    rounds_ok: int = 0
    rounds_timed_out: int = 0
    rounds_failed: int = 0
    skipped: str | None = None  # why it has fewer rounds than asked (the slow cap)
    median_seconds: float | None = None  # go to the last return, over the rounds
    min_seconds: float | None = None
    max_seconds: float | None = None
    first_node_seconds: float | None = None  # median over the rounds of the first return
    cpu_seconds_per_node: float | None = None
    requests: float | None = None  # handler creation and rendezvous; median over the rounds
    requests_per_node: float | None = None
    rendezvous_requests_per_node: float | None = None  # go to the last return only
    sent_bytes_per_node: float | None = None  # bytes etcd sent, creation and rendezvous (v3)
    rendezvous_sent_bytes_per_node: float | None = None  # go to the last return only
    etcd_cpu_seconds_per_node: float | None = None  # etcd's CPU, release to the last return
    speedup: float | None = None  # torch etcd's median / this median


@dataclass(frozen=True)
class TelemetryCost:
    transport: str
    nodes: int
    off_seconds: float
    on_seconds: float
    cost: float  # (on - off) / off, on the medians
    # CPU per node per rendezvous, on minus off (medians).
    cpu_seconds_per_node: float | None = None


@dataclass(frozen=True)
class RankPolicyCost:
    """A setup with a rank policy against the one that differs by its policy alone (join
    order), at one N: both summaries, medians over their rounds of the same run."""

    nodes: int
    rank_policy: str  # the policy setup's; the baseline's is join order
    baseline: Summary
    policy: Summary
    # What was measured: the rounds' rendezvous of a fresh run ("fresh run"), or the same
    # nodes' second one in that run ("re-rendezvous"), where the freezer finds rank memory.
    rendezvous: str = FRESH

    @property
    def cost(self) -> float | None:
        """(policy - baseline) / baseline on the median latencies."""
        base, mine = self.baseline.median_seconds, self.policy.median_seconds
        return None if not base or mine is None else (mine - base) / base


@dataclass(frozen=True)
class Target:
    name: str
    met: bool | None  # None: not measured in this run
    detail: str


def summarize(
    rounds: Sequence[RoundResult],
    setups: Sequence[str],
    rounds_asked: int,
    skipped: Mapping[str, str],
    re_rendezvous: bool = False,
) -> list[Summary]:
    """Per N and setup, the rounds' first rendezvous (or with `re_rendezvous`, their second)."""
    rounds = [r for r in rounds if r.re_rendezvous == re_rendezvous]
    summaries = []
    for nodes in sorted({r.nodes for r in rounds}):
        for setup in setups:
            mine = [r for r in rounds if r.setup == setup and r.nodes == nodes]
            summary = Summary(setup, nodes)
            summary.rounds_timed_out = sum(r.status == "timeout" for r in mine)
            summary.rounds_failed = sum(r.status == "failed" for r in mine)
            ok = [r for r in mine if r.status == "ok"]
            summary.rounds_ok = len(ok)
            if setup in skipped and len(mine) < rounds_asked:
                summary.skipped = skipped[setup]
            if ok:
                _fill(summary, ok)
            summaries.append(summary)
    for summary in summaries:
        reference = find(summaries, REFERENCE, summary.nodes)
        if reference and reference.median_seconds and summary.median_seconds:
            summary.speedup = reference.median_seconds / summary.median_seconds
    return summaries


def summarize_again(rounds: Sequence[RoundResult], setups: Sequence[str]) -> list[Summary]:
    """The rounds' re-rendezvous, summed up as `summarize` sums up their first."""
    return summarize(rounds, setups, 0, {}, re_rendezvous=True)


def _median(values: Iterable[float | int | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _fill(summary: Summary, ok: list[RoundResult]) -> None:
    walls = [r.wall_seconds for r in ok if r.wall_seconds is not None]
    summary.median_seconds = statistics.median(walls)
    summary.min_seconds, summary.max_seconds = min(walls), max(walls)
    summary.first_node_seconds = _median(r.first_seconds for r in ok)
    summary.cpu_seconds_per_node = _median(r.cpu_seconds_per_node for r in ok)
    summary.requests = _median(r.requests for r in ok)
    rendezvous = _median(r.requests_rendezvous for r in ok)
    if summary.requests is not None and rendezvous is not None:
        summary.requests_per_node = summary.requests / summary.nodes
        summary.rendezvous_requests_per_node = rendezvous / summary.nodes
    etcd_cpu = _median(r.etcd_cpu_seconds for r in ok)
    summary.etcd_cpu_seconds_per_node = None if etcd_cpu is None else etcd_cpu / summary.nodes
    sent = _median(r.sent_bytes for r in ok)
    summary.sent_bytes_per_node = None if sent is None else sent / summary.nodes
    sent = _median(r.sent_bytes_rendezvous for r in ok)
    summary.rendezvous_sent_bytes_per_node = None if sent is None else sent / summary.nodes


def find(summaries: Iterable[Summary], setup: str, nodes: int) -> Summary | None:
    return next((s for s in summaries if s.setup == setup and s.nodes == nodes), None)


def telemetry_costs(summaries: Sequence[Summary]) -> list[TelemetryCost]:
    costs = []
    for nodes in sorted({s.nodes for s in summaries}):
        for api in TRANSPORTS:
            off = find(summaries, f"etcd-rdzv {api}, telemetry off", nodes)
            on = find(summaries, f"etcd-rdzv {api}, telemetry on", nodes)
            if off and on and off.median_seconds and on.median_seconds:
                cost = (on.median_seconds - off.median_seconds) / off.median_seconds
                cpu = (
                    on.cpu_seconds_per_node - off.cpu_seconds_per_node
                    if on.cpu_seconds_per_node is not None and off.cpu_seconds_per_node is not None
                    else None
                )
                costs.append(
                    TelemetryCost(api, nodes, off.median_seconds, on.median_seconds, cost, cpu)
                )
    return costs


def rank_policy_costs(
    summaries: Sequence[Summary],
    again: Sequence[Summary],
    pairs: Sequence[tuple[str, str, str]],
) -> list[RankPolicyCost]:
    """Each (policy setup, baseline setup, policy) at every N where both completed a round:
    their fresh run (`summaries`), then their re-rendezvous (`again`) where both measured one."""
    costs = []
    for nodes in sorted({s.nodes for s in summaries}):
        for setup, baseline, policy in pairs:
            for rendezvous, chosen in ((FRESH, summaries), (AGAIN, again)):
                mine, theirs = find(chosen, setup, nodes), find(chosen, baseline, nodes)
                if mine and theirs and mine.median_seconds and theirs.median_seconds:
                    costs.append(RankPolicyCost(nodes, policy, theirs, mine, rendezvous))
    return costs


def judge(summaries: Sequence[Summary], costs: Sequence[TelemetryCost]) -> list[Target]:
    """Issue 8's and issue 16's targets, judged on etcd-rdzv v3 (issue 16's with telemetry on,
    the defaults a user gets)."""
    judged = [s for s in summaries if s.setup in JUDGED]
    on = [s for s in summaries if s.setup == JUDGED[1] and s.nodes >= 8]

    def at(nodes: int) -> list[Summary]:
        return [s for s in judged if s.nodes == nodes]

    def against(
        setup: str, value: Callable[[Summary], float | None]
    ) -> Callable[[Summary], float | None]:
        """The ratio of `setup`'s value to ours at the same N."""

        def ratio(ours: Summary) -> float | None:
            theirs = find(summaries, setup, ours.nodes)
            mine, other = value(ours), None if theirs is None else value(theirs)
            return None if not mine or other is None else other / mine

        return ratio

    def ran(setup: str, nodes: int) -> bool:
        """Whether `setup` completed a round at `nodes` (torch's stop at the slow cap)."""
        theirs = find(summaries, setup, nodes)
        return theirs is not None and theirs.median_seconds is not None

    v3_costs = [c for c in costs if c.transport == "v3"]
    largest = max((s.nodes for s in on if s.rounds_ok), default=None)
    return [
        _every(
            "≥5x faster than torch `etcd` at every N ≥ 8 where it completed",
            [s for s in judged if s.nodes >= 8 and ran("torch etcd", s.nodes)],
            lambda s: s.speedup, lambda v: f"{v:.1f}x", lambda v: v >= 5,
        ),
        _every(
            "≥2x faster than torch `c10d` at every N ≥ 8 where it completed, telemetry on",
            [s for s in on if ran("torch c10d", s.nodes)],
            against("torch c10d", lambda s: s.median_seconds), lambda v: f"{v:.1f}x",
            lambda v: v >= 2,
        ),
        _every(
            "CPU per node ≤ torch `c10d`'s at every N where it completed, telemetry on",
            [s for s in on if ran("torch c10d", s.nodes)],
            against("torch c10d", lambda s: s.cpu_seconds_per_node),
            lambda v: f"c10d's is {v:.2f}x ours", lambda v: v >= 1,
        ),
        _every(
            "< 0.1 s at N = 2", at(2),
            lambda s: s.median_seconds, lambda v: f"{v:.3f} s", lambda v: v < 0.1,
        ),
        _every(
            "≤ 15 etcd requests per node at N = 64", at(64),
            lambda s: s.requests_per_node, lambda v: f"{v:.1f}", lambda v: v <= 15,
        ),
        _every(
            "< 2 s at N = 128", at(128),
            lambda s: s.median_seconds, lambda v: f"{v:.3f} s", lambda v: v < 2,
        ),
        _completes(256, at(256)),
        _every(
            "N = 1,024 in < 10 s", at(1024),
            lambda s: s.median_seconds, lambda v: f"{v:.3f} s", lambda v: v < 10,
        ),
        _flat("etcd requests per node", on, 8, largest, lambda s: s.requests_per_node),
        _flat("bytes etcd sent per node", on, 8, largest, lambda s: s.sent_bytes_per_node),
        _telemetry_cost(v3_costs),
        _telemetry_cpu(v3_costs),
    ]  # fmt: skip


def _flat(
    what: str,
    chosen: list[Summary],
    smallest: int,
    largest: int | None,
    value: Callable[[Summary], float | None],
) -> Target:
    """Issue 16: `what` at the largest N measured is within 2x of N = `smallest`'s."""
    name = f"{what} flat in N: N = {smallest} vs the largest N within 2x, telemetry on"
    low = next((value(s) for s in chosen if s.nodes == smallest), None)
    high = next((value(s) for s in chosen if s.nodes == largest), None)
    if largest is None or low is None or high is None or not low:
        return Target(name, None, "not measured")
    ratio = high / low
    detail = f"N = {smallest}: {low:,.0f}; N = {largest}: {high:,.0f} ({ratio:.2f}x)"
    return Target(name, ratio < 2, detail)


def _every(
    name: str,
    chosen: list[Summary],
    value: Callable[[Summary], float | None],
    shown: Callable[[float], str],
    passes: Callable[[float], bool],
) -> Target:
    """Met when every chosen summary's value passes; not measured when one has none."""
    if not chosen:
        return Target(name, None, "not measured")
    parts, verdicts = [], []
    for summary in chosen:
        measured = value(summary)
        where = f"{summary.setup.removeprefix('etcd-rdzv ')}, N = {summary.nodes}"
        if measured is None:
            parts.append(f"{where}: not measured")
            continue
        parts.append(f"{where}: {shown(measured)}")
        verdicts.append(passes(measured))
    met = all(verdicts) if len(verdicts) == len(chosen) else None
    return Target(name, met, "; ".join(parts))


def _completes(nodes: int, chosen: list[Summary]) -> Target:
    name = f"N = {nodes} completes"
    if not chosen:
        return Target(name, None, "not measured")
    parts = [
        f"{s.setup.removeprefix('etcd-rdzv ')}: {s.rounds_ok} rounds ok, "
        f"{s.rounds_failed} failed, {s.rounds_timed_out} timed out"
        for s in chosen
    ]
    met = all(s.rounds_ok and not (s.rounds_failed or s.rounds_timed_out) for s in chosen)
    return Target(name, met, "; ".join(parts))


def _telemetry_cost(costs: list[TelemetryCost]) -> Target:
    name = "telemetry cost < 5% (v3, at every N)"
    if not costs:
        return Target(name, None, "not measured")
    detail = "; ".join(f"N = {c.nodes}: {c.cost:+.1%}" for c in costs)
    return Target(name, all(c.cost < 0.05 for c in costs), detail)


def _telemetry_cpu(costs: list[TelemetryCost]) -> Target:
    name = "telemetry adds < 1 ms of CPU per node (v3, at every N)"
    measured = [c for c in costs if c.cpu_seconds_per_node is not None]
    if not measured:
        return Target(name, None, "not measured")
    detail = "; ".join(
        f"N = {c.nodes}: {1e3 * (c.cpu_seconds_per_node or 0.0):+.1f} ms" for c in measured
    )
    return Target(name, all((c.cpu_seconds_per_node or 0.0) < 1e-3 for c in measured), detail)
