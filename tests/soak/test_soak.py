"""Soak: 200 consecutive rendezvous rounds with random agent kills and restarts, per etcd API.

Run by `make soak` (not by `make test`): a few minutes. Three participants rendezvous again
and again, as torchrun's agents do after every restart. Now and then one is SIGKILLed,
between rounds or while the others are in a rendezvous, and a fresh process takes its place.
After every round the membership invariant must hold. At the end: no thread, file descriptor
or memory growth in the participant that lived through it all, and no key of the run that
would outlive the run's TTL. The figures are printed (`-s`) for docs/reliability.md.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from etcd_rdzv.kv import KeyValue
from etcd_rdzv_devtools.local_etcd import LocalEtcd
from tests.conftest import etcd_keys
from tests.support.harness import (
    JsonDict,
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
MAX_FD_GROWTH = 0  # files and pipes; sockets are bounded below instead
# Sockets are the transport's pooled connections to etcd: one per thread that has had a request
# in flight at the same time as the others (the rendezvous, the rank and the run keep-alive).
# How many of those overlaps happened by the warm-up is luck, so the pool may still grow by
# one or two after it, never past this: a leaked connection per round would pass it at once.
MAX_ETCD_CONNECTIONS = 3

pytestmark = [pytest.mark.soak, pytest.mark.timeout(900)]


@dataclass(frozen=True)
class Usage:
    rss_kib: int
    threads: int
    fds: int  # open file descriptors other than sockets
    sockets: int


def usage(participant: Participant) -> Usage:
    status = Path(f"/proc/{participant.pid}/status").read_text()
    descriptors = _descriptor_targets(participant.pid)
    sockets = sum(1 for target in descriptors if target.startswith("socket:"))
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return Usage(
        rss_kib=int(fields["VmRSS"].split()[0]),
        threads=int(fields["Threads"]),
        fds=len(descriptors) - sockets,
        sockets=sockets,
    )


def _descriptor_targets(pid: int) -> list[str]:
    """What each open descriptor of `pid` points at (`socket:[...]`, a path, `pipe:[...]`)."""
    targets = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except FileNotFoundError:
            continue  # closed between the listing and the read
    return targets


def test_two_hundred_rounds_with_kills_and_restarts(
    tmp_path: Path, etcd: LocalEtcd, etcd_api: str, kv: KeyValue, run_id: str
) -> None:
    seed = int(os.environ.get("SOAK_SEED", time.time_ns() % 1_000_000))
    print(f"\nsoak over {etcd_api}: seed {seed} (SOAK_SEED={seed} repeats it)")
    with ParticipantGroup(
        tmp_path, endpoint=etcd.endpoint, run_id=run_id, min_nodes=NODES, max_nodes=NODES,
        conf=CONF,
    ) as group:  # fmt: skip
        soak = Soak(group, random.Random(seed))
        for round_number in range(ROUNDS):
            soak.round(first=round_number == 0)
            if round_number == WARM_UP_ROUNDS:
                warm = {p: usage(p) for p in soak.live}
        end = {p: usage(p) for p in warm if p in soak.live}
    assert soak.steady in end
    median = sorted(soak.round_seconds)[ROUNDS // 2]
    print(
        f"{ROUNDS} rounds in {sum(soak.round_seconds):.0f}s (median round {median:.3f}s, slowest "
        f"{max(soak.round_seconds):.1f}s), kills {soak.kills}, last version {soak.last_version}"
    )
    for participant, after in end.items():
        before = warm[participant]
        print(f"{participant.name}: after warm-up {before}, at the end {after}")
        assert after.threads - before.threads <= MAX_THREAD_GROWTH, (before, after)
        assert after.fds - before.fds <= MAX_FD_GROWTH, (before, after)
        assert after.sockets <= MAX_ETCD_CONNECTIONS, (before, after)
        assert after.rss_kib - before.rss_kib <= MAX_RSS_GROWTH_KIB, (before, after)
    no_key_outlives_the_run(etcd, etcd_api, kv, run_id)


class Soak:
    """The agents of the soak, and what the rounds have shown so far."""

    def __init__(self, group: ParticipantGroup, rng: random.Random) -> None:
        self.group = group
        self.rng = rng
        self.live = group.start(NODES, backend="etcd-rdzv")
        # Never killed, so that its threads, descriptors and memory tell of every round.
        self.steady = self.live[0]
        self.kills = {"between rounds": 0, "mid-round": 0}
        self.round_seconds: list[float] = []
        self.last_version = 0

    def round(self, *, first: bool) -> None:
        started = time.monotonic()
        if not first and self.rng.random() < KILL_BETWEEN_ROUNDS:
            victim = self.kill_one()
            self.live = [p for p in self.live if p is not victim]
            self.live += self.group.start(1, backend="etcd-rdzv")
            self.kills["between rounds"] += 1
        if not first and self.rng.random() < KILL_MID_ROUND:
            results = self.kill_mid_round()
        else:
            results = rendezvous_together(self.live, timeout=120)
        self.check(results)
        self.round_seconds.append(time.monotonic() - started)

    def kill_mid_round(self) -> list[JsonDict]:
        """One agent dies while the others are in a rendezvous; a fresh one takes its place.

        The victim is not asked to rendezvous itself: had it been, it could finish the round
        and die before answering, and no test could tell that from dying inside it. Deaths at
        each point inside a rendezvous are tests/integration/test_agent_faults.py's job.
        """
        victim = self.rng.choice([p for p in self.live if p is not self.steady])
        survivors = [p for p in self.live if p is not victim]
        for participant in survivors:
            participant.send({"cmd": "rendezvous"})
        time.sleep(self.rng.uniform(0.0, 0.05))  # the fault's timing, not a wait
        victim.kill()
        self.kills["mid-round"] += 1
        (newcomer,) = self.group.start(1, backend="etcd-rdzv")
        newcomer.send({"cmd": "rendezvous"})
        self.live = [*survivors, newcomer]
        return [p.expect_rendezvous(120) for p in self.live]

    def kill_one(self) -> Participant:
        victim = self.rng.choice([p for p in self.live if p is not self.steady])
        victim.kill()
        return victim

    def check(self, results: list[JsonDict]) -> None:
        """The invariant, and every round in a version above the last."""
        check_membership(results)
        versions = {int(r["version"]) for r in results}
        assert len(versions) == 1 and min(versions) > self.last_version, results
        self.last_version = versions.pop()


def no_key_outlives_the_run(etcd: LocalEtcd, api: str, kv: KeyValue, run_id: str) -> None:
    """Every key of the run dies with the run: rank keys within their TTL, the rest with it."""
    run_path = f"/torchelastic/p2p/run_{run_id}"
    deadline = time.monotonic() + KEEP_ALIVE_TTL + 5
    while any("/rank_" in key for key in etcd_keys(etcd, api, run_path + "/")):
        assert time.monotonic() < deadline, "keep-alive keys outlived their TTL"
        time.sleep(0.2)
    keys = etcd_keys(etcd, api, run_path + "/")
    # The state, the counter and each version's store keys (MASTER_ADDR, MASTER_PORT), as torch.
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
