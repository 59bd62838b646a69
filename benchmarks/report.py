"""A benchmark run for people: tables (printed and in the docs), JSON and a plot."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from benchmarks.rounds import REFERENCE, RecoveryResult, RoundResult
from benchmarks.summary import RankPolicyCost, Summary, Target, TelemetryCost

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
_GIB = 1024**3
_COLUMNS = ("setup", "median", "min", "max", "vs torch `etcd`", "first node", "CPU s/node",
            "etcd requests", "per node", "rendezvous only", "etcd bytes sent/node",
            "etcd CPU s/node")  # fmt: skip


@dataclass
class Results:
    command: str
    date: str
    minutes: float
    machine: dict[str, str]
    settings: dict[str, Any]
    pool: dict[str, Any]
    rounds: list[RoundResult]
    recoveries: list[RecoveryResult]
    summaries: list[Summary]
    telemetry_costs: list[TelemetryCost]
    rank_policy_costs: list[RankPolicyCost]
    targets: list[Target]

    @property
    def nodes(self) -> list[int]:
        return sorted({s.nodes for s in self.summaries})


def layout(rounds: Sequence[RoundResult], nodes: int) -> str:
    """How the nodes of N were spread over the worker processes."""
    chosen = next((r for r in rounds if r.nodes == nodes and r.workers), None)
    if chosen is None:
        return "no round ran"
    return f"{chosen.workers} processes x {chosen.nodes_per_worker} node(s)"


def machine() -> dict[str, str]:
    """Where the figures come from, read from the machine itself."""
    etcd = subprocess.run(["etcd", "--version"], capture_output=True, text=True, check=False)
    meminfo = Path("/proc/meminfo").read_text(encoding="ascii").split()
    release = dict(
        line.split("=", 1)
        for line in Path("/etc/os-release").read_text(encoding="utf-8").splitlines()
        if "=" in line
    )
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), platform.machine(),
    )  # fmt: skip
    return {
        "cores": str(os.cpu_count()),
        "cpu": model,
        "memory": f"{int(meminfo[meminfo.index('MemTotal:') + 1]) * 1024 / _GIB:.1f} GiB",
        "os": f"{release.get('PRETTY_NAME', platform.system()).strip(chr(34))}, "
        f"Linux {platform.release()}",
        "python": platform.python_version(),
        "etcd": etcd.stdout.splitlines()[0].removeprefix("etcd Version: ") if etcd.stdout else "?",
        "torch": version("torch"),
    }


def progress_line(result: RoundResult) -> str:
    what = result.setup + (", re-rendezvous" if result.re_rendezvous else "")
    head = f"N={result.nodes:<4} round {result.round + 1}  {what:50}"
    if result.status != "ok":
        return f"{head} {result.status.upper()}: {(result.error or '').splitlines()[0]}"
    requests = "" if result.requests is None else f", {result.requests} etcd requests"
    return f"{head} {result.wall_seconds:8.3f} s{requests}"


def recovery_line(result: RecoveryResult) -> str:
    head = f"recovery N={result.nodes} round {result.round + 1}  {result.setup:30}"
    if result.status != "ok":
        return f"{head} {result.status.upper()}: {(result.error or '').splitlines()[0]}"
    return f"{head} {result.recovery_seconds:8.3f} s"


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.3f} s"


def _milliseconds(value: float | None) -> str:
    return "" if value is None else f"{1e3 * value:+.1f} ms"


def _percent(value: float | None) -> str:
    return "" if value is None else f"{value:+.1%}"


def _difference(cost: RankPolicyCost, value: Callable[[Summary], float | None]) -> float | None:
    mine, theirs = value(cost.policy), value(cost.baseline)
    return None if mine is None or theirs is None else mine - theirs


_POLICY_COLUMNS = ("N", "rendezvous", "setup", "rank_policy", "median", "min", "max",
                   "CPU ms/node", "etcd requests/node", "requests, rendezvous only",
                   "etcd bytes sent/node", "bytes, rendezvous only",
                   "etcd CPU ms/node")  # fmt: skip


def _policy_rows(costs: Sequence[RankPolicyCost]) -> list[tuple[str, ...]]:
    """Per N, fresh run and re-rendezvous: the baseline, the policy, and the policy minus the
    baseline."""

    def ms(value: float | None) -> str:
        return "" if value is None else f"{1e3 * value:.1f}"

    def signed(value: float | None, shown: Callable[[float | None], str]) -> str:
        text = shown(value)
        return text if value is None or value < 0 or not text else f"+{text}"

    rows: list[tuple[str, ...]] = []
    for c in costs:
        for s, policy in ((c.baseline, "join_order"), (c.policy, c.rank_policy)):
            rows.append((
                str(c.nodes), c.rendezvous, s.setup, policy, _seconds(s.median_seconds),
                _seconds(s.min_seconds), _seconds(s.max_seconds), ms(s.cpu_seconds_per_node),
                _number(s.requests_per_node), _number(s.rendezvous_requests_per_node),
                _bytes(s.sent_bytes_per_node), _bytes(s.rendezvous_sent_bytes_per_node),
                ms(s.etcd_cpu_seconds_per_node),
            ))  # fmt: skip
        rows.append((
            str(c.nodes), c.rendezvous, "difference", f"{c.rank_policy} - join_order",
            f"{signed(_difference(c, lambda x: x.median_seconds), _seconds)} "
            f"({_percent(c.cost)})", "", "",
            signed(_difference(c, lambda x: x.cpu_seconds_per_node), ms),
            signed(_difference(c, lambda x: x.requests_per_node), _number),
            signed(_difference(c, lambda x: x.rendezvous_requests_per_node), _number),
            signed(_difference(c, lambda x: x.sent_bytes_per_node), _bytes),
            signed(_difference(c, lambda x: x.rendezvous_sent_bytes_per_node), _bytes),
            signed(_difference(c, lambda x: x.etcd_cpu_seconds_per_node), ms),
        ))  # fmt: skip
    return rows


def _cpu(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:,.1f}".removesuffix(".0")


def _bytes(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value / 1024:,.1f} KiB" if abs(value) >= 1024 else f"{value:,.0f} B"


def _ratio(summary: Summary) -> str:
    if summary.setup == REFERENCE:
        return "reference" if summary.speedup else ""
    if summary.speedup is None:
        return ""
    if summary.speedup >= 1:
        return f"{summary.speedup:.1f}x faster"
    return f"{1 / summary.speedup:.1f}x slower"


def _rows(summaries: Sequence[Summary], nodes: int) -> list[tuple[str, ...]]:
    rows = []
    for s in (s for s in summaries if s.nodes == nodes):
        if not (s.rounds_ok or s.rounds_failed or s.rounds_timed_out or s.skipped):
            continue  # not run at this N (above --all-setups-up-to)
        name = s.setup + (" †" if _note(s) else "")
        if not s.rounds_ok:
            outcome = "timed out" if s.rounds_timed_out else "failed" if s.rounds_failed else ""
            rows.append((name, outcome or "skipped") + ("",) * (len(_COLUMNS) - 2))
            continue
        rows.append((
            name, _seconds(s.median_seconds), _seconds(s.min_seconds), _seconds(s.max_seconds),
            _ratio(s), _seconds(s.first_node_seconds), _cpu(s.cpu_seconds_per_node),
            _number(s.requests), _number(s.requests_per_node),
            _number(s.rendezvous_requests_per_node), _bytes(s.sent_bytes_per_node),
            _cpu(s.etcd_cpu_seconds_per_node),
        ))  # fmt: skip
    return rows


def _note(summary: Summary) -> str:
    """Why a setup has fewer good rounds than asked, if it has."""
    parts = []
    if summary.rounds_failed or summary.rounds_timed_out:
        parts.append(
            f"{summary.rounds_ok} rounds ok, {summary.rounds_failed} failed, "
            f"{summary.rounds_timed_out} timed out (see the JSON for each error)"
        )
    if summary.skipped:
        parts.append(f"skipped the rest: {summary.skipped}")
    return "; ".join(parts)


def _notes(summaries: Sequence[Summary], nodes: int) -> list[str]:
    return [f"† {s.setup}: {_note(s)}" for s in summaries if s.nodes == nodes and _note(s)]


def table(summaries: Sequence[Summary], rounds: Sequence[RoundResult], nodes: int) -> str:
    """The printed table of one N."""
    title = f"\nN = {nodes} ({layout(rounds, nodes)}); seconds from the release to the last return"
    lines = [title, _aligned([_COLUMNS, *_rows(summaries, nodes)]), *_notes(summaries, nodes)]
    return "\n".join(lines)


def _aligned(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _recovery_rows(recoveries: Sequence[RecoveryResult]) -> list[tuple[str, ...]]:
    return [
        (r.setup, str(r.nodes), str(r.round + 1), r.status, _seconds(r.recovery_seconds),
         _seconds(r.first_seconds))
        for r in recoveries
    ]  # fmt: skip


_RECOVERY_COLUMNS = ("setup", "N", "round", "status", "kill to last survivor", "to first survivor")


def _verdict(target: Target) -> str:
    return {True: "met", False: "missed", None: "not measured"}[target.met]


def text(results: Results) -> str:
    """Everything after the per-N tables: recovery, telemetry cost, targets."""
    lines = []
    if results.recoveries:
        lines.append("\nRecovery: SIGKILL of one node after a rendezvous to the survivors' next")
        lines.append(_aligned([_RECOVERY_COLUMNS, *_recovery_rows(results.recoveries)]))
    lines.append("\nTelemetry cost, (on - off) / off on the medians:")
    lines += [
        f"  {c.transport} N={c.nodes}: {c.cost:+.1%}, CPU per node "
        f"{_milliseconds(c.cpu_seconds_per_node)}"
        for c in results.telemetry_costs
    ]
    if results.rank_policy_costs:
        lines.append("\nRank policies, against join order in the same run (medians):")
        lines.append(_aligned([_POLICY_COLUMNS, *_policy_rows(results.rank_policy_costs)]))
    lines.append("\nTargets:")
    lines += [f"  [{_verdict(t)}] {t.name}: {t.detail}" for t in results.targets]
    return "\n".join(lines)


def write_json(results: Results, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dataclasses.asdict(results)
    for entry, result in zip(data["rounds"], results.rounds, strict=True):
        entry["requests"] = result.requests
        entry["sent_bytes"] = result.sent_bytes
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def plot(results: Results, path: Path) -> None:
    """Median latency against N, every setup, log-log; bars from the fastest to the slowest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5.5))
    timeout = float(results.settings["round_timeout"])
    any_timed_out = False
    for setup in dict.fromkeys(s.setup for s in results.summaries):
        mine = [s for s in results.summaries if s.setup == setup]
        points = [s for s in mine if s.median_seconds]
        timed_out = [s.nodes for s in mine if not s.rounds_ok and s.rounds_timed_out]
        color = None
        if points:
            medians = [p.median_seconds or 0.0 for p in points]
            below = [m - (p.min_seconds or m) for p, m in zip(points, medians, strict=True)]
            above = [(p.max_seconds or m) - m for p, m in zip(points, medians, strict=True)]
            drawn = axes.errorbar(
                [p.nodes for p in points], medians, yerr=[below, above], marker="o", capsize=3,
                label=setup, linestyle="--" if setup.startswith("torch") else "-",
            )  # fmt: skip
            color = drawn.lines[0].get_color()
        if timed_out:
            # A round that timed out lasted longer than the timeout: drawn at the timeout.
            any_timed_out = True
            axes.scatter(timed_out, [timeout] * len(timed_out), marker="x", s=70, color=color,
                         label=None if points else f"{setup} (timed out)")  # fmt: skip
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xticks(results.nodes, [str(n) for n in results.nodes])
    axes.set_xlabel("nodes (N)")
    axes.set_ylabel("seconds from go to the last return (median)")
    title = f"Rendezvous latency on one local etcd ({results.machine['cores']} cores)"
    if any_timed_out:
        title += f"\nx: no round finished within the {timeout:g} s timeout"
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def docs_section(results: Results, plot_path: Path, docs_path: Path) -> str:
    m, pool, settings = results.machine, results.pool, results.settings
    peak_pool = max((r.pool_memory_bytes or 0 for r in results.rounds), default=0)
    peak_system = max((r.system_memory_bytes or 0 for r in results.rounds), default=0)
    layouts = "; ".join(f"N = {n}: {layout(results.rounds, n)}" for n in results.nodes)
    parts = [
        BEGIN,
        "<!-- Generated by benchmarks/rendezvous_latency.py: edits between these markers are "
        "overwritten by the next run. -->",
        "## Latest run (generated)",
        "",
        f"```bash\n{results.command}\n```",
        "",
        f"Run on {results.date} ({results.minutes:.0f} min). Machine: {m['cores']} cores "
        f"({m['cpu']}), {m['memory']}, {m['os']}, Python {m['python']}, etcd {m['etcd']}, "
        f"torch {m['torch']}.",
        "",
        "How it measures:",
        "- One local etcd serves every setup (v2 enabled). Each node is a rendezvous handler "
        "created through torch's registry, as torchrun creates it, with its own etcd client, "
        "in a worker process of its own; the worker processes are forked from one server that "
        f"imported torch once and are kept for the whole run ({layouts}). Creating the "
        "handlers is not timed.",
        "- All nodes are released together: armed workers wait on one pipe, and one write to "
        "it wakes them all. Time zero is the moment before that write; a round's time is the "
        'last node\'s `next_rendezvous()` return, "first node" the first return. On 2 cores, '
        "waking 128 processes takes a while: the JSON records when the last one ran "
        "(`last_woken_seconds`). min_nodes = max_nodes = N; every backend gets "
        f"last_call_timeout = {settings['last_call_timeout']} s.",
        "- Setups alternate round by round in a rotating order. Medians, min and max are over "
        f"the rounds. A round is bounded by {settings['round_timeout']:g} s (one past it is "
        "recorded as timed out and its workers are killed and replaced); a setup with a round "
        f"over {settings['slow_cap_seconds']:g} s runs no further rounds at that N or above.",
        f"Above N = {settings['all_setups_up_to']} only the setups "
        f"{', '.join(settings['large_setups'])} run (etcd-rdzv over v3, telemetry off and on).",
        *_rank_policy_note(settings),
        "- etcd requests are etcd's own counts (`etcd_http_received_total` for v2, "
        "`grpc_server_started_total` for v3) from handler creation to the last return; "
        '"rendezvous only" counts from the release. torch `c10d` keeps its state in a '
        "TCPStore: no etcd requests. Bytes sent are etcd's `etcd_network_client_grpc_sent_bytes_"
        "total` over the same span, per node: v3 only (etcd 3.4 counts no bytes of its v2 API); "
        "the JSON gateway re-encodes them with keys and values in base64, a third more.",
        "- CPU s/node: each worker process's CPU time (all its threads) from the release to its "
        "last node's return, summed and divided by N. etcd CPU s/node: the etcd process's CPU "
        "time over the same span (from /proc), divided by N.",
        "- Telemetry off: `metrics_port=off, log_level=WARNING, progress_interval=off`. On: the "
        "defaults (INFO logs, to each worker's log file), a trace file per node and metrics on "
        "a free loopback port.",
        f"- Worker pool: {pool['workers']} processes ready in {pool['start_seconds']:.1f} s; "
        f"memory at the peak {peak_pool / _GIB:.1f} GiB (proportional set size of the pool), "
        f"{peak_system / _GIB:.1f} GiB in use on the machine.",
    ]
    for nodes in results.nodes:
        parts += ["", f"### N = {nodes}", "", _markdown(_COLUMNS, _rows(results.summaries, nodes))]
        notes = _notes(results.summaries, nodes)
        parts += ["", *(f"- {note}" for note in notes)] if notes else []
    if results.recoveries:
        recovery_nodes = results.recoveries[0].nodes
        parts += [
            "", f"### Recovery, N = {recovery_nodes}", "",
            f"min_nodes = {recovery_nodes - 1}, max_nodes = {recovery_nodes}, last_call_timeout "
            f"= {settings['last_call_timeout']} s. After a rendezvous of all, the process of the "
            "node with the highest rank (never rank 0, whose death also moves the master, nor "
            "c10d's store host) is SIGKILLed and the survivors call `next_rendezvous()` at once; "
            "recovery is the kill to the last survivor's return, bounded by "
            f"{settings['recovery_timeout']:g} s. Every other setting is the backend's default "
            "(keep-alive TTLs, heartbeats).",
            "", _markdown(_RECOVERY_COLUMNS, _recovery_rows(results.recoveries)),
        ]  # fmt: skip
    parts += [
        "",
        "### Telemetry cost",
        "",
        "(on - off) / off on the median latencies; CPU per node on minus off.",
        "",
    ]
    parts.append(_markdown(
        ("transport", "N", "off", "on", "cost", "CPU per node added"),
        [(c.transport, str(c.nodes), _seconds(c.off_seconds), _seconds(c.on_seconds),
          f"{c.cost:+.1%}", _milliseconds(c.cpu_seconds_per_node))
         for c in results.telemetry_costs],
    ))  # fmt: skip
    if results.rank_policy_costs:
        parts += [
            "", "### Rank policies", "",
            "The same rounds: each rank-policy setup against the setup it differs from by its "
            "policy alone, in the rounds' fresh run and in their re-rendezvous; medians over "
            'the rounds, each third row the difference. A re-rendezvous creates no handler: '
            'its "etcd requests/node" and "etcd bytes sent/node" are its rendezvous only.',
            "", _markdown(_POLICY_COLUMNS, _policy_rows(results.rank_policy_costs)),
        ]  # fmt: skip
    parts += ["", "### Targets (judged on etcd-rdzv v3, telemetry off and on)", ""]
    parts += [f"- **{_verdict(t)}**: {t.name}. {t.detail}" for t in results.targets]
    image = Path(os.path.relpath(plot_path.absolute(), docs_path.absolute().parent))
    parts += ["", f"![Median rendezvous latency against N, log-log]({image.as_posix()})", END]
    return "\n".join(parts)


def _rank_policy_note(settings: dict[str, Any]) -> list[str]:
    """How the rank-policy setups run; nothing for a run from before they existed."""
    if "rank_policy_nodes" not in settings:
        return []
    at = ", ".join(str(n) for n in settings["rank_policy_nodes"] or []) or "no N"
    return [
        "- Each etcd-rdzv node has its own `node_id=node<i>` (all share this machine's host "
        "name, the default node id). The rank-policy setup (`v3-stable`: v3, telemetry off, "
        f"`rank_policy=stable`) runs at N = {at} only, against v3 telemetry off (join order, "
        "the default) in the same rounds. Every round is a fresh run: its freezing node finds "
        "no rank memory yet. There, the rounds of both go on with a re-rendezvous: once all "
        "nodes returned, the same handlers are released together again and every node calls "
        "`next_rendezvous()` a second time (as after a failure), measured alike from that "
        "release; the freezer then finds the first version's ranks."
    ]


def update_docs(results: Results, docs_path: Path, plot_path: Path) -> None:
    """Replace the generated section, or add it below the title; the rest stays as it is."""
    section = docs_section(results, plot_path, docs_path)
    text = docs_path.read_text(encoding="utf-8") if docs_path.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        before, rest = text.split(BEGIN, 1)
        after = rest.split(END, 1)[1]
        text = before + section + after
    else:
        lines = text.splitlines(keepends=True)
        title = next((i for i, line in enumerate(lines) if line.startswith("# ")), -1)
        head, tail = "".join(lines[: title + 1]), "".join(lines[title + 1 :])
        gap = "" if tail.startswith("\n") else "\n"
        text = f"{head}\n{section}\n{gap}{tail}"
    docs_path.parent.mkdir(parents=True, exist_ok=True)
    docs_path.write_text(text, encoding="utf-8")
