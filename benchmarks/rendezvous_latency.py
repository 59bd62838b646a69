"""Rendezvous latency, etcd requests, CPU and recovery: etcd-rdzv against torch's backends.

One local etcd (3.4, v2 enabled) serves every setup: torch's `etcd`, `etcd-v2` and `c10d`
backends, and etcd-rdzv over v3 and v2 with telemetry off and on; and, at N = 64 by default,
etcd-rdzv over v3 with rank_policy=stable, its cost against join order, in a fresh run and in a
re-rendezvous of the same nodes. For each N, rounds of N nodes released together; setups
alternate round by round (in a rotating order), so drift in the machine hits them all alike.
Then recovery: a node SIGKILLed after a rendezvous, and the time until the survivors completed
the next one. Prints a table per N; writes JSON, a plot and the generated section of
docs/benchmarks.md. rounds.py says what is measured and how.

    .venv/bin/python benchmarks/rendezvous_latency.py --nodes 2 8 --rounds 1
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402
from benchmarks.pool import WorkerPool  # noqa: E402
from benchmarks.rounds import (  # noqa: E402
    Plan,
    RecoveryResult,
    RoundResult,
    Setup,
    all_setups,
    rank_policy_keys,
    rank_policy_pairs,
    run_recovery,
    run_round,
)
from benchmarks.summary import (  # noqa: E402
    judge,
    rank_policy_costs,
    summarize,
    summarize_again,
    telemetry_costs,
)
from etcd_rdzv_devtools.local_etcd import start_local_etcd  # noqa: E402

DEFAULT_NODES = (2, 8, 32, 64, 128, 256, 512, 1024)
# Above this N only the large setups run: torch's backends stop well before (the slow cap),
# and our v2 transport is not what a thousand nodes should use (issue 16 asks N = 1,024 of v3).
ALL_SETUPS_UP_TO = 256
LARGE_SETUPS = ("v3-off", "v3-on")
# The rank-policy setups (v3-stable) run at these N only, beside the setup they differ from by
# the policy alone (v3-off): the cost of the policy, at the size the issue asks about. There,
# the rounds of both go on with a re-rendezvous of the same nodes, measured too.
RANK_POLICY_NODES = (64,)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    setups = [setup.key for setup in all_setups()]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--nodes", type=int, nargs="+", default=list(DEFAULT_NODES), help="the N to measure")
    add("--rounds", type=int, default=3, help="rounds per setup and N")
    add(
        "--all-setups-up-to", type=int, default=ALL_SETUPS_UP_TO,
        help="above this N only --large-setups run",
    )  # fmt: skip
    add("--large-setups", nargs="+", choices=setups, default=list(LARGE_SETUPS))
    add("--setups", nargs="+", choices=setups, default=setups, help="all by default")
    add(
        "--rank-policy-nodes", type=int, nargs="*", default=list(RANK_POLICY_NODES),
        help="the N (of --nodes) at which the rank-policy setups (v3-stable) run, and no other; "
        "there, they and their baselines (v3-off) measure a re-rendezvous too",
    )  # fmt: skip
    add("--recovery-nodes", type=int, default=8, help="N for the recovery rounds; 0: none")
    add("--recovery-setups", nargs="+", choices=setups, default=None, help="default: --setups")
    add("--recovery-rounds", type=int, default=1)
    add("--recovery-timeout", type=float, default=120.0, help="seconds, from the kill")
    add("--last-call-timeout", type=int, default=1, help="seconds, the same for every backend")
    add("--round-timeout", type=float, default=180.0, help="seconds from go to the last return")
    add("--ready-timeout", type=float, default=300.0, help="seconds to create the handlers")
    add("--finish-timeout", type=float, default=60.0, help="seconds to shut handlers down")
    add(
        "--slow-cap-seconds", type=float, default=45.0,
        help="a setup with a round slower than this runs no more rounds at that N or above",
    )  # fmt: skip
    add("--max-workers", type=int, default=128, help="worker processes at most")
    add(
        "--threads-per-worker", type=int, default=None,
        help="nodes (threads) per worker process; default: 1, more only when N > max workers",
    )  # fmt: skip
    add("--work-dir", type=Path, default=None, help="logs and traces (default: under runs/)")
    add("--json", type=Path, default=ROOT / "runs/bench/results.json")
    add("--plot", type=Path, default=ROOT / "docs/benchmarks.png")
    add("--docs", type=Path, default=ROOT / "docs/benchmarks.md")
    add("--no-docs", action="store_true", help="do not update the docs' generated section")
    add(
        "--report-from", type=Path, default=None, metavar="JSON",
        help="measure nothing: judge and report the rounds of an earlier run's JSON again",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.report_from is not None:
        return report_again(args)
    # Each setup says all of its settings: none may come from this shell's environment.
    for name in [name for name in os.environ if name.startswith("ETCD_RDZV_")]:
        print(f"ignoring {name} from the environment")
        del os.environ[name]
    command = shlex.join([_shown_path(Path(sys.executable)), _shown_path(Path(__file__)),
                          *(sys.argv[1:] if argv is None else argv)])  # fmt: skip
    started = now()
    work_dir = args.work_dir or ROOT / "runs/bench" / started.strftime("work-%Y%m%d-%H%M%S")
    setups = [setup for setup in all_setups() if setup.key in args.setups]
    nodes = sorted(set(args.nodes))
    workers_needed = max([args.recovery_nodes] + [workers_for(n, args)[0] for n in nodes])

    with start_local_etcd() as etcd, WorkerPool(work_dir / "workers", args.ready_timeout) as pool:
        pool_started = time.monotonic()
        pool.take(workers_needed)
        pool_start_seconds = time.monotonic() - pool_started
        print(f"{workers_needed} workers ready in {pool_start_seconds:.1f} s (logs: {work_dir})")
        plan = Plan(
            etcd, pool, work_dir / "traces", args.last_call_timeout, args.ready_timeout,
            args.round_timeout, args.recovery_timeout, args.finish_timeout,
        )  # fmt: skip
        pool_info = {
            "workers": workers_needed,
            "start_seconds": pool_start_seconds,
            "idle_memory_bytes": pool.memory(),
        }
        rounds, skipped = measure_rounds(plan, setups, nodes, args)
        recovery_keys = args.recovery_setups or args.setups
        recovered = [setup for setup in all_setups() if setup.key in recovery_keys]
        recoveries = measure_recovery(plan, recovered, args)
        leftover = pool.close()
    pool_info |= {
        "worker_pids": pool.started_pids,
        "server_pids": sorted(pool.server_pids),
        "workers_left_running": leftover,
    }
    setups_run = [s.name for s in setups]
    summaries = summarize(rounds, setups_run, args.rounds, skipped)
    costs = telemetry_costs(summaries)
    results = report.Results(
        command=command,
        date=started.isoformat(timespec="seconds"),
        minutes=(now() - started).total_seconds() / 60,
        machine=report.machine(),
        settings={key: _as_json(value) for key, value in vars(args).items()},
        pool=pool_info,
        rounds=rounds,
        recoveries=recoveries,
        summaries=summaries,
        telemetry_costs=costs,
        rank_policy_costs=rank_policy_costs(
            summaries, summarize_again(rounds, setups_run), rank_policy_pairs(setups)
        ),
        targets=judge(summaries, costs),
    )
    print(report.text(results))
    report.write_json(results, args.json)
    report.plot(results, args.plot)
    if not args.no_docs:
        report.update_docs(results, args.docs, args.plot)
    print(f"wrote {args.json} and {args.plot}" + ("" if args.no_docs else f", {args.docs}"))
    return 0


def report_again(args: argparse.Namespace) -> int:
    """The report of an earlier run, from its JSON, with today's summaries and targets: for a
    change to the report, not to what is measured."""
    data = json.loads(args.report_from.read_text(encoding="utf-8"))
    rounds = [_restored(RoundResult, entry) for entry in data["rounds"]]
    recoveries = [_restored(RecoveryResult, entry) for entry in data["recoveries"]]
    setups = list(dict.fromkeys(summary["setup"] for summary in data["summaries"]))
    skipped = {s["setup"]: s["skipped"] for s in data["summaries"] if s.get("skipped")}
    summaries = summarize(rounds, setups, int(data["settings"]["rounds"]), skipped)
    costs = telemetry_costs(summaries)
    results = report.Results(
        command=data["command"], date=data["date"], minutes=data["minutes"],
        machine=data["machine"], settings=data["settings"], pool=data["pool"], rounds=rounds,
        recoveries=recoveries, summaries=summaries, telemetry_costs=costs,
        rank_policy_costs=rank_policy_costs(
            summaries, summarize_again(rounds, setups), rank_policy_pairs(all_setups())
        ),
        targets=judge(summaries, costs),
    )  # fmt: skip
    print(report.text(results))
    report.plot(results, args.plot)
    if not args.no_docs:
        report.update_docs(results, args.docs, args.plot)
    print(f"wrote {args.plot}" + ("" if args.no_docs else f" and {args.docs}"))
    return 0


_Restored = TypeVar("_Restored", RoundResult, RecoveryResult)


def _restored(kind: type[_Restored], entry: dict[str, Any]) -> _Restored:
    """A result as the JSON keeps it; fields it added (derived ones) are left out."""
    names = {f.name for f in dataclasses.fields(kind)}
    return kind(**{key: value for key, value in entry.items() if key in names})


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def workers_for(nodes: int, args: argparse.Namespace) -> tuple[int, int]:
    """(workers, nodes per worker) for N: one node per process unless N > --max-workers."""
    per_worker = args.threads_per_worker or -(-nodes // args.max_workers)
    return -(-nodes // per_worker), per_worker


def runs_at(setup: Setup, nodes: int, args: argparse.Namespace) -> bool:
    """Whether `setup` has rounds at N: a rank-policy setup at --rank-policy-nodes only; the
    others at every N up to --all-setups-up-to, and the large setups above it too."""
    if setup.policy_baseline is not None:
        return nodes in args.rank_policy_nodes
    return nodes <= args.all_setups_up_to or setup.key in args.large_setups


def measure_rounds(
    plan: Plan, setups: list[Setup], all_nodes: list[int], args: argparse.Namespace
) -> tuple[list[RoundResult], dict[str, str]]:
    """Every round; and the setups skipped by the slow cap, with the reason, by setup name."""
    rounds: list[RoundResult] = []
    skipped: dict[str, str] = {}
    paired = rank_policy_keys(setups)
    for nodes in all_nodes:
        _, per_worker = workers_for(nodes, args)
        chosen = [setup for setup in setups if runs_at(setup, nodes, args)]
        for round_index in range(args.rounds):
            # A rotating order, so that no setup always follows the same one.
            shift = round_index % max(1, len(chosen))
            for setup in chosen[shift:] + chosen[:shift]:
                if setup.name in skipped:
                    continue
                again = setup.key in paired and nodes in args.rank_policy_nodes
                result, *second = run_round(
                    plan, setup, nodes, round_index, per_worker, again=again
                )
                for measured in (result, *second):
                    rounds.append(measured)
                    print(report.progress_line(measured), flush=True)
                slow = result.status == "timeout" or (
                    result.wall_seconds is not None and result.wall_seconds > args.slow_cap_seconds
                )
                if slow:
                    took = "timed out" if result.wall_seconds is None else (
                        f"took {result.wall_seconds:.1f} s")  # fmt: skip
                    skipped[setup.name] = (
                        f"a round at N = {nodes} {took} (over the {args.slow_cap_seconds:g} s "
                        "cap): no further rounds at this N or above"
                    )
        summaries = summarize(rounds, [s.name for s in setups], args.rounds, skipped)
        print(report.table(summaries, rounds, nodes), flush=True)
    return rounds, skipped


def measure_recovery(
    plan: Plan, setups: list[Setup], args: argparse.Namespace
) -> list[RecoveryResult]:
    if args.recovery_nodes < 2:
        return []
    recoveries = []
    for round_index in range(args.recovery_rounds):
        for setup in setups:
            result = run_recovery(plan, setup, args.recovery_nodes, round_index)
            recoveries.append(result)
            print(report.recovery_line(result), flush=True)
    return recoveries


def _as_json(value: object) -> object:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list):
        return [_as_json(item) for item in value]
    return str(value)


def _shown_path(path: Path) -> str:
    """A path relative to the repository when it is inside, as one would type it."""
    resolved = path.absolute()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


if __name__ == "__main__":
    sys.exit(main())
