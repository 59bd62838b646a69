"""Soak: 200 consecutive rendezvous rounds with random agent kills and restarts, per etcd API.

Run by `make soak` (not by `make test`): a few minutes. Three participants rendezvous again and
again, as torchrun's agents do after every restart. Now and then one is SIGKILLed, between
rounds or in the middle of one, and a fresh process takes its place. After every round the
membership invariant must hold. At the end: no thread, file descriptor or memory growth in the
participants that lived through it all, and no key of the run that would outlive the run's
TTL. The figures are printed (`-s`) for docs/reliability.md.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from etcd_rdzv.kv import KeyValue
from etcd_rdzv.local_etcd import LocalEtcd
from tests.conftest import etcd_keys
from tests.support.harness import (
    Participant,
    ParticipantGroup,
    check_membership,
    rendezvous_together,
)

ROUNDS = 200
NODES = 3
KILL_BETWEEN_ROUNDS = 0.06
KILL_MID_ROUND = 0.02
WARM_UP_ROUNDS = 20
KEEP_ALIVE_TTL = 2.0
RUN_TTL = 7200.0  # ProtocolTtls.run, torch's value
CONF = {"last_call_timeout": "1", "keep_alive_ttl": f"{KEEP_ALIVE_TTL:g}", "timeout": "120",
        "metrics_port": "off", "progress_interval": "off"}  # fmt: skip
# Growth allowed between the warm-up and the end, for the survivors of the whole soak.
MAX_RSS_GROWTH_KIB = 16 * 1024
MAX_THREAD_GROWTH = 0
MAX_FD_GROWTH = 0

pytestmark = [pytest.mark.soak, pytest.mark.timeout(900)]


@dataclass(frozen=True)
class Usage:
    rss_kib: int
    threads: int
    fds: int


def usage(participant: Participant) -> Usage:
    status = Path(f"/proc/{participant.pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return Usage(
        rss_kib=int(fields["VmRSS"].split()[0]),
        threads=int(fields["Threads"]),
        fds=len(os.listdir(f"/proc/{participant.pid}/fd")),
    )


def test_two_hundred_rounds_with_kills_and_restarts(
    tmp_path: Path, etcd: LocalEtcd, etcd_api: str, kv: KeyValue, run_id: str
) -> None:
    seed = int(os.environ.get("SOAK_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    print(f"\nsoak over {etcd_api}: seed {seed} (SOAK_SEED={seed} repeats it)")
    kills = {"between rounds": 0, "mid-round": 0}
    round_seconds: list[float] = []
    last_version = 0
    started = time.monotonic()
    with ParticipantGroup(
        tmp_path, endpoint=etcd.endpoint, run_id=run_id, min_nodes=NODES, max_nodes=NODES,
        conf=CONF,
    ) as group:  # fmt: skip
        live = group.start(NODES, backend="etcd-rdzv")
        originals = set(live)
        warm: dict[Participant, Usage] = {}
        for round_number in range(ROUNDS):
            round_started = time.monotonic()
            if round_number and rng.random() < KILL_BETWEEN_ROUNDS:
                live = replace_one(group, live, rng)
                kills["between rounds"] += 1
            if round_number and rng.random() < KILL_MID_ROUND:
                for participant in live:
                    participant.send({"cmd": "rendezvous"})
                time.sleep(rng.uniform(0.0, 0.05))  # the fault's timing, not a wait
                survivors = replace_one(group, live, rng)
                newcomer = survivors[-1]
                newcomer.send({"cmd": "rendezvous"})
                results = [p.expect_rendezvous(120) for p in survivors]
                live = survivors
                kills["mid-round"] += 1
            else:
                results = rendezvous_together(live, timeout=120)
            check_membership(results)
            versions = {int(r["version"]) for r in results}
            assert len(versions) == 1 and min(versions) > last_version, (round_number, results)
            last_version = versions.pop()
            round_seconds.append(time.monotonic() - round_started)
            if round_number == WARM_UP_ROUNDS:
                warm = {p: usage(p) for p in live if p in originals}
        end = {p: usage(p) for p in warm if p in live}
        elapsed = time.monotonic() - started
    median = sorted(round_seconds)[ROUNDS // 2]
    print(
        f"{ROUNDS} rounds in {elapsed:.0f}s (median round {median:.3f}s, slowest "
        f"{max(round_seconds):.1f}s), kills {kills}, last version {last_version}"
    )
    for participant, after in end.items():
        before = warm[participant]
        print(f"{participant.name}: after warm-up {before}, at the end {after}")
        assert after.threads - before.threads <= MAX_THREAD_GROWTH, (before, after)
        assert after.fds - before.fds <= MAX_FD_GROWTH, (before, after)
        assert after.rss_kib - before.rss_kib <= MAX_RSS_GROWTH_KIB, (before, after)
    no_key_outlives_the_run(etcd, etcd_api, kv, run_id)


def replace_one(
    group: ParticipantGroup, live: list[Participant], rng: random.Random
) -> list[Participant]:
    victim = rng.choice(live)
    victim.kill()
    (newcomer,) = group.start(1, backend="etcd-rdzv")
    return [p for p in live if p is not victim] + [newcomer]


def no_key_outlives_the_run(etcd: LocalEtcd, api: str, kv: KeyValue, run_id: str) -> None:
    """Every key of the run dies with the run: rank keys within their TTL, the rest with it."""
    run_path = f"/torchelastic/p2p/run_{run_id}"
    deadline = time.monotonic() + KEEP_ALIVE_TTL + 5
    while any("/rank_" in key for key in etcd_keys(etcd, api, run_path + "/")):
        assert time.monotonic() < deadline, "keep-alive keys outlived their TTL"
        time.sleep(0.2)
    keys = etcd_keys(etcd, api, run_path + "/")
    print(f"keys of the run left after the soak: {len(keys)}")
    if api == "v3":
        # Each is attached to a lease: its own, or the run's (refreshed by live agents only).
        unleased = [key for key in keys if not kv.get(key).lease]
        assert not unleased, unleased
        marker = kv.get(run_path)
        left = kv.time_left(marker)
        assert left is not None and 0 < left <= RUN_TTL + 1
        assert {kv.get(key).lease for key in keys if "/rank_" not in key} == {marker.lease}
    else:
        # Everything lives below the run directory, whose TTL ends them all.
        directory = kv.get(run_path)
        assert directory.ttl is not None and 0 < directory.ttl <= RUN_TTL
