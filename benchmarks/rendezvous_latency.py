"""Rendezvous latency: etcd-rdzv against torch's `etcd` backend, and telemetry on vs off.

Each round starts N participant processes (separate clients, torch already imported), releases
them together and measures the wall time from "go" to the last `next_rendezvous()` return, on
one local etcd. Backends and telemetry modes alternate round by round, so drift in the machine
hits all of them alike. Prints a table of medians.

    .venv/bin/python benchmarks/rendezvous_latency.py --nodes 8 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.harness import ParticipantGroup, check_membership

from etcd_rdzv.local_etcd import LocalEtcd, start_local_etcd

TELEMETRY_OFF = {"metrics_port": "off", "log_level": "WARNING", "progress_interval": "off"}


def one_round(
    etcd: LocalEtcd, workdir: Path, backend: str, nodes: int, conf: Mapping[str, str]
) -> float:
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    with ParticipantGroup(
        workdir / run_id, endpoint=etcd.endpoint, run_id=run_id, min_nodes=nodes,
        max_nodes=nodes, conf=conf,
    ) as group:  # fmt: skip
        group.start(nodes, backend=backend)
        started = time.monotonic()
        results = group.rendezvous_all(timeout=300)
        elapsed = time.monotonic() - started
    check_membership(results)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        trace_file = str(workdir / "traces.jsonl")
        setups: dict[str, tuple[str, Mapping[str, str]]] = {
            "torch etcd": ("etcd", {}),
            "etcd-rdzv, telemetry off": ("etcd-rdzv", TELEMETRY_OFF),
            "etcd-rdzv, telemetry on": ("etcd-rdzv", {"trace_file": trace_file}),
        }
        times: dict[str, list[float]] = {name: [] for name in setups}
        with start_local_etcd(data_dir=workdir / "etcd") as etcd:
            for _ in range(args.rounds):
                for name, (backend, conf) in setups.items():
                    times[name].append(one_round(etcd, workdir, backend, args.nodes, conf))
    reference = statistics.median(times["torch etcd"])
    print(f"N = {args.nodes} participants, {args.rounds} rounds, wall time go -> last return")
    print(f"{'setup':28} {'median':>8} {'min':>8} {'max':>8} {'vs torch etcd':>14}")
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"{name:28} {median:7.3f}s {min(values):7.3f}s {max(values):7.3f}s "
            f"{reference / median:13.1f}x"
        )
    off = statistics.median(times["etcd-rdzv, telemetry off"])
    on = statistics.median(times["etcd-rdzv, telemetry on"])
    print(f"telemetry cost (on vs off, medians): {100 * (on / off - 1):+.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
