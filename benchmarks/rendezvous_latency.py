"""Rendezvous latency and etcd requests: etcd-rdzv over v3 and v2 against torch's `etcd` backend.

Each round starts N participant processes (separate clients, torch already imported), releases
them together and measures the wall time from "go" to the last `next_rendezvous()` return, on
one local etcd that serves both APIs. etcd's own /metrics give the requests a round cost,
counted from before the participants start (their set-up requests included) to the last
return. Setups alternate round by round, so drift in the machine hits all of them alike.
Prints one table of medians per N.

    .venv/bin/python benchmarks/rendezvous_latency.py --nodes 8 32 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client.parser import text_string_to_metric_families
from tests.support.harness import ParticipantGroup, check_membership

from etcd_rdzv.local_etcd import LocalEtcd, start_local_etcd

TELEMETRY_OFF = {"metrics_port": "off", "log_level": "WARNING", "progress_interval": "off"}
# Requests etcd served: v2 HTTP requests, and v3 gRPC calls (the JSON gateway makes one each).
REQUEST_COUNTERS = ("etcd_http_received_total", "grpc_server_started_total")


@dataclass(frozen=True)
class Round:
    seconds: float
    requests: int


def etcd_requests(etcd: LocalEtcd) -> int:
    served = 0.0
    for family in text_string_to_metric_families(etcd.metrics_text()):
        for sample in family.samples:
            if sample.name in REQUEST_COUNTERS:
                served += sample.value
    return int(served)


def one_round(
    etcd: LocalEtcd, workdir: Path, backend: str, nodes: int, conf: Mapping[str, str]
) -> Round:
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    with ParticipantGroup(
        workdir / run_id, endpoint=etcd.endpoint, run_id=run_id, min_nodes=nodes,
        max_nodes=nodes, conf=conf,
    ) as group:  # fmt: skip
        before = etcd_requests(etcd)
        group.start(nodes, backend=backend)
        started = time.monotonic()
        results = group.rendezvous_all(timeout=300)
        elapsed = time.monotonic() - started
        requests = etcd_requests(etcd) - before
    check_membership(results)
    return Round(elapsed, requests)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[8])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        trace_file = str(workdir / "traces.jsonl")
        setups: dict[str, tuple[str, Mapping[str, str]]] = {
            "torch etcd": ("etcd", {}),
            "etcd-rdzv v3, telemetry off": ("etcd-rdzv", {**TELEMETRY_OFF, "etcd_api": "v3"}),
            "etcd-rdzv v2, telemetry off": ("etcd-rdzv", {**TELEMETRY_OFF, "etcd_api": "v2"}),
            "etcd-rdzv v3, telemetry on": (
                "etcd-rdzv", {"trace_file": trace_file, "etcd_api": "v3"},
            ),
        }  # fmt: skip
        with start_local_etcd(data_dir=workdir / "etcd") as etcd:
            for nodes in args.nodes:
                rounds: dict[str, list[Round]] = {name: [] for name in setups}
                for _ in range(args.rounds):
                    for name, (backend, conf) in setups.items():
                        rounds[name].append(one_round(etcd, workdir, backend, nodes, conf))
                print_table(nodes, args.rounds, rounds)
    return 0


def print_table(nodes: int, count: int, rounds: Mapping[str, list[Round]]) -> None:
    reference = statistics.median(r.seconds for r in rounds["torch etcd"])
    print(f"\nN = {nodes} participants, {count} rounds, wall time go -> last return")
    print(
        f"{'setup':30} {'median':>8} {'min':>8} {'max':>8} {'vs torch':>9} "
        f"{'requests':>9} {'per node':>9}"
    )
    for name, measured in rounds.items():
        seconds = [r.seconds for r in measured]
        median = statistics.median(seconds)
        requests = statistics.median(r.requests for r in measured)
        print(
            f"{name:30} {median:7.3f}s {min(seconds):7.3f}s {max(seconds):7.3f}s "
            f"{reference / median:8.1f}x {requests:9.0f} {requests / nodes:9.1f}"
        )
    off = statistics.median(r.seconds for r in rounds["etcd-rdzv v3, telemetry off"])
    on = statistics.median(r.seconds for r in rounds["etcd-rdzv v3, telemetry on"])
    print(f"telemetry cost over v3 (on vs off, medians): {100 * (on / off - 1):+.1f}%")


if __name__ == "__main__":
    sys.exit(main())
