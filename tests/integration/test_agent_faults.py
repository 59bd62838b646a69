"""Agents that die or stall in the middle of a rendezvous, with real processes and real signals.

Each test kills one participant with SIGKILL at one protocol point (participant.py
`--die-at`, through the product's observer seam), or pauses one with SIGSTOP, and then
checks that the others either complete a new version without it in bounded time or, where
fewer than min_nodes remain, fail with a `RendezvousTimeoutError`: never a hang, and never
two memberships for one version (`check_membership` over every record of the scenario).

Which `--die-at` point is which phase, and what ends the survivors' wait:

- `setup` (setup; it wrote the placeholder that opens the next version): the placeholder's
  TTL (half the keep-alive TTL) ends it.
- `join` (join; its join applied, it holds a rank of a joinable version): the version
  freezes with its rank; no confirmation comes, and the frozen state's TTL (the keep-alive
  TTL) ends it.
- `last_call` (last call, as the node holding it): nobody freezes the version; over v2 the
  joinable state's TTL (the keep-alive TTL) ends it, over v3 (claims, where that state has no
  TTL) a node that joined after the holder tears it down one joinable TTL after the window.
- `frozen` (frozen wait; frozen, not confirmed yet): the frozen state's TTL (the keep-alive
  TTL).
- `confirm` (confirm; its confirmation applied, its keep-alive key exists): nothing ends it:
  the version completes with the dead member, and the survivors' next rendezvous (torchrun's,
  after the failed worker) tears it down at once. If the dead node was rank 0, it never
  published its master address (it does so next, while waiting for the final state): the
  others, waiting for the address, see its keep-alive key gone and rendezvous again on their own.
- `final` (final wait; its version went final): a node waiting for the next version sees its
  keep-alive key expire (keep-alive TTL) and tears the version down; the members, told by
  num_nodes_waiting, rendezvous again.

The setup, joinable and frozen TTLs follow the keep-alive TTL (`ProtocolTtls.from_keep_alive`:
torch's 5/10/10 s for its 10 s default; 1/2/2 s for the 2 s here). Recovery times (from the
SIGKILL to the survivors' completed version) are printed, kept as the test's
`recovery_seconds` properties, and appended to the file `ETCD_RDZV_RECOVERY_LOG` names.

Where the dead node's rank matters (it dies after confirming), it is not rank 0, which
publishes the master address the others wait for; rank 0's death has its own test,
`test_rank_zero_killed_before_publishing_its_address_does_not_hang_the_others`.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from etcd_rdzv.config import ProtocolTtls
from etcd_rdzv.kv import KeyNotFound, KeyValue
from etcd_rdzv_devtools.local_etcd import LocalEtcd
from tests.conftest import etcd_keys
from tests.support.harness import (
    Participant,
    ParticipantGroup,
    StandbyPool,
    check_membership,
    joined_ranks,
    wait_ready,
)
from tests.support.waiting import wait_until

BACKEND = "etcd-rdzv"
KEEP_ALIVE_TTL = 2.0
LAST_CALL = 1.0
TIMEOUT = 30.0
FAST = {
    "keep_alive_ttl": f"{KEEP_ALIVE_TTL:g}",
    "last_call_timeout": f"{LAST_CALL:g}",
    "timeout": f"{TIMEOUT:g}",
}
TTLS = ProtocolTtls.from_keep_alive(KEEP_ALIVE_TTL)
# A v3 lease is granted one second longer than its TTL; v2 rounds TTLs up to whole seconds.
LEASE_SLACK = 1.0
# Expiry ticks of etcd (half a second), watches, and a loaded 2-core machine.
MARGIN = 2.5
# Bounds on waiting for one answer: never a hang, even when the product misbehaves.
ANSWER_TIMEOUT = TIMEOUT + 10.0
REQUEST_TIMEOUT = 10.0
HELD_TIMEOUT = 20.0

Record = dict[str, Any]


@pytest.fixture(scope="module")
def standby(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandbyPool]:
    """Participants that import torch while an earlier test waits on a TTL."""
    with StandbyPool(tmp_path_factory.mktemp("standby"), size=4) as pool:
        yield pool


class Faults:
    """One test's run: its participants, its etcd, and the recording of its recovery."""

    def __init__(
        self, request: pytest.FixtureRequest, *, etcd: LocalEtcd, kv: KeyValue, run_id: str,
        standby: StandbyPool,
    ) -> None:  # fmt: skip
        self.node = request.node
        self.tmp_path: Path = request.getfixturevalue("tmp_path")
        self.etcd = etcd
        self.kv = kv
        self.run_id = run_id
        self.standby = standby

    def group(self, min_nodes: int = 2, max_nodes: int = 3, **conf: str) -> ParticipantGroup:
        """Elastic (2 to 3 nodes) unless told otherwise: three nodes freeze a version at once,
        two complete one after the last call."""
        return ParticipantGroup(
            self.tmp_path / self.run_id, endpoint=self.etcd.endpoint, run_id=self.run_id,
            min_nodes=min_nodes, max_nodes=max_nodes, conf={**FAST, **conf},
            standby=self.standby,
        )  # fmt: skip

    def state(self) -> dict[str, Any]:
        """The run's state document, or {} while there is none."""
        try:
            value = self.kv.get(f"/torchelastic/p2p/run_{self.run_id}/rdzv/active_version").value
        except KeyNotFound:
            return {}
        state: dict[str, Any] = json.loads(value)
        return state

    def join_first(self, participant: Participant) -> None:
        """Let `participant` open version 1 and take rank 0 before anyone else comes."""
        participant.send({"cmd": "rendezvous"})
        wait_until(
            f"{participant.name} joined version 1 as rank 0",
            lambda: joined_ranks(self.kv, self.run_id) == [0],
            timeout=REQUEST_TIMEOUT,
        )

    def report(self, fault: str, seconds: float) -> None:
        self.node.user_properties.append((f"recovery_seconds {fault}", round(seconds, 2)))
        api = os.environ.get("ETCD_RDZV_ETCD_API", "?")
        print(f"recovery after {fault} [{api}]: {seconds:.2f}s")
        log = os.environ.get("ETCD_RDZV_RECOVERY_LOG")
        if log:
            with open(log, "a", encoding="utf-8") as out:
                entry = {"fault": fault, "api": api, "seconds": round(seconds, 2)}
                out.write(json.dumps(entry) + "\n")


@pytest.fixture
def faults(
    request: pytest.FixtureRequest, etcd: LocalEtcd, kv: KeyValue, run_id: str,
    standby: StandbyPool,
) -> Faults:  # fmt: skip
    return Faults(request, etcd=etcd, kv=kv, run_id=run_id, standby=standby)


def send_rendezvous(participants: Iterable[Participant]) -> None:
    for participant in participants:
        participant.send({"cmd": "rendezvous"})


def collect(participants: Iterable[Participant], timeout: float = ANSWER_TIMEOUT) -> list[Record]:
    deadline = time.monotonic() + timeout
    return [p.expect_rendezvous(max(0.0, deadline - time.monotonic())) for p in participants]


def sigkill(participant: Participant) -> float:
    """SIGKILL (and reap) it; the moment the signal was sent."""
    killed_at = time.monotonic()
    participant.kill(signal.SIGKILL)
    assert participant.process.returncode == -signal.SIGKILL
    return killed_at


def recovery(results: list[Record], since: float) -> float:
    """Seconds from `since` until the last of `results` arrived."""
    return max(float(r["received_at"]) for r in results) - since


def only(results: list[Record], key: str) -> Any:
    values = {r[key] for r in results}
    assert len(values) == 1, f"results disagree on {key}: {values}"
    return values.pop()


def assert_without(results: list[Record], dead: Participant, world_size: int) -> None:
    assert only(results, "world_size") == world_size
    assert dead.pid not in {r["pid"] for r in results}


# --- SIGKILL in each phase -----------------------------------------------------------------


def test_agent_killed_in_setup_holding_the_placeholder(faults: Faults) -> None:
    with faults.group() as nodes:
        (victim,) = nodes.spawn(backend=BACKEND, die_at="setup")
        survivors = nodes.spawn(2, backend=BACKEND)
        wait_ready(nodes.members)
        victim.send({"cmd": "rendezvous"})
        held = victim.expect_held("setup", HELD_TIMEOUT)
        assert faults.state()["status"] == "setup"
        send_rendezvous(survivors)
        killed_at = sigkill(victim)
        results = collect(survivors)
    check_membership([held, *results])
    assert_without(results, victim, 2)
    seconds = recovery(results, killed_at)
    faults.report("setup", seconds)
    assert seconds <= TTLS.setup + LEASE_SLACK + LAST_CALL + MARGIN


def test_agent_killed_after_its_join(faults: Faults) -> None:
    with faults.group() as nodes:
        (victim,) = nodes.spawn(backend=BACKEND, die_at="join")
        survivors = nodes.spawn(2, backend=BACKEND)
        wait_ready(nodes.members)
        victim.send({"cmd": "rendezvous"})
        held = victim.expect_held("join", HELD_TIMEOUT)
        assert (held["version"], held["rank"]) == (1, 0)
        assert joined_ranks(faults.kv, faults.run_id) == [0]
        send_rendezvous(survivors)
        killed_at = sigkill(victim)
        results = collect(survivors)
    check_membership([held, *results])
    assert_without(results, victim, 2)
    # The version it joined froze with its rank and never completed.
    assert only(results, "version") > held["version"]
    seconds = recovery(results, killed_at)
    faults.report("join", seconds)
    # The frozen state's TTL (the third join froze it), then the next version's last call.
    assert seconds <= TTLS.frozen + LEASE_SLACK + LAST_CALL + MARGIN


def test_agent_killed_holding_the_last_call(faults: Faults) -> None:
    # Up to 4 nodes: a third join must not freeze the version in the holder's place.
    with faults.group(2, 4) as nodes:
        (victim,) = nodes.spawn(backend=BACKEND, die_at="last_call")
        first, last = nodes.spawn(2, backend=BACKEND)
        wait_ready(nodes.members)
        # Rank min_nodes-1 (1) holds the last call: the victim joins second.
        faults.join_first(first)
        victim.send({"cmd": "rendezvous"})
        held = victim.expect_held("last_call", HELD_TIMEOUT)
        assert (held["version"], held["rank"]) == (1, 1)
        assert faults.state()["status"] == "joinable"
        last.send({"cmd": "rendezvous"})
        killed_at = sigkill(victim)
        results = collect([first, last])
    check_membership([held, *results])
    assert_without(results, victim, 2)
    assert only(results, "version") > held["version"]
    seconds = recovery(results, killed_at)
    faults.report("last_call", seconds)
    # Nobody freezes the version: its joinable TTL ends it; then the next one's last call.
    assert seconds <= TTLS.joinable + LEASE_SLACK + LAST_CALL + MARGIN


def test_agent_killed_frozen_before_confirming(faults: Faults) -> None:
    with faults.group() as nodes:
        (victim,) = nodes.spawn(backend=BACKEND, die_at="frozen")
        survivors = nodes.spawn(2, backend=BACKEND)
        wait_ready(nodes.members)
        send_rendezvous(nodes.members)
        held = victim.expect_held("frozen", ANSWER_TIMEOUT)
        assert faults.state()["status"] == "frozen"
        killed_at = sigkill(victim)
        results = collect(survivors)
    check_membership([held, *results])
    assert_without(results, victim, 2)
    assert only(results, "version") > held["version"]
    seconds = recovery(results, killed_at)
    faults.report("frozen", seconds)
    assert seconds <= TTLS.frozen + LEASE_SLACK + LAST_CALL + MARGIN


def test_agent_killed_after_confirming(faults: Faults) -> None:
    with faults.group() as nodes:
        (victim,) = nodes.spawn(backend=BACKEND, die_at="confirm")
        # The others wait at a gate before confirming, so the victim confirms first and dies
        # while its version is still frozen.
        first, second = survivors = nodes.spawn(2, backend=BACKEND, gate_at="frozen")
        wait_ready(nodes.members)
        faults.join_first(first)
        send_rendezvous([victim, second])
        gates = [s.expect_held("frozen", ANSWER_TIMEOUT) for s in survivors]
        held = victim.expect_held("confirm", ANSWER_TIMEOUT)
        assert {g["version"] for g in gates} == {held["version"]}
        assert faults.state()["status"] == "frozen"
        killed_at = sigkill(victim)
        for survivor in survivors:
            survivor.release()
        completed = collect(survivors)
        # It had confirmed, so its version completes with it; the survivors then rendezvous
        # again, as torchrun's agents do once its worker failed.
        send_rendezvous(survivors)
        results = collect(survivors)
    check_membership([held, *completed, *results])
    assert only(completed, "version") == held["version"]
    assert only(completed, "world_size") == 3
    assert_without(results, victim, 2)
    seconds = recovery(results, killed_at)
    faults.report("confirm", seconds)
    assert seconds <= KEEP_ALIVE_TTL + LEASE_SLACK + LAST_CALL + MARGIN


def test_agent_killed_after_the_version_went_final(faults: Faults) -> None:
    with faults.group() as nodes:
        (victim,) = nodes.spawn(backend=BACKEND, die_at="final")
        members = nodes.spawn(2, backend=BACKEND)
        (newcomer,) = nodes.spawn(backend=BACKEND)
        wait_ready(nodes.members)
        faults.join_first(members[0])
        send_rendezvous([victim, members[1]])
        held = victim.expect_held("final", ANSWER_TIMEOUT)
        completed = collect(members)
        # A node arrives for the next version: it watches the members' keep-alive keys.
        newcomer.send({"cmd": "rendezvous"})
        wait_until(
            "the newcomer announced itself waiting",
            lambda: faults.state().get("num_workers_waiting") == 1,
            timeout=REQUEST_TIMEOUT,
        )
        killed_at = sigkill(victim)
        # Nobody else acts: the newcomer alone must notice the victim's keep-alive expire.
        detected = wait_until(
            "the newcomer tore the final version down",
            lambda: faults.state().get("version") not in (None, "1"),
            timeout=KEEP_ALIVE_TTL + LEASE_SLACK + MARGIN + 5,
        )
        # torchrun's agents poll num_nodes_waiting and re-rendezvous when it is positive.
        observed = [m.num_nodes_waiting(REQUEST_TIMEOUT) for m in members]
        assert all(o["value"] > 0 for o in observed), observed
        send_rendezvous(members)
        results = collect([*members, newcomer])
    check_membership([held, *completed, *observed, *results])
    assert only(completed, "version") == held["version"] == 1
    assert only(completed, "world_size") == 3
    assert_without(results, victim, 3)
    seconds = recovery(results, killed_at)
    faults.report("final", seconds)
    assert detected <= KEEP_ALIVE_TTL + LEASE_SLACK + MARGIN
    assert seconds <= KEEP_ALIVE_TTL + LEASE_SLACK + LAST_CALL + MARGIN


def test_too_few_survivors_fail_with_a_timeout_not_a_hang(faults: Faults) -> None:
    timeout = 5.0
    with faults.group(3, 3, timeout=f"{timeout:g}") as nodes:
        (victim,) = nodes.spawn(backend=BACKEND, die_at="final")
        survivors = nodes.spawn(2, backend=BACKEND)
        wait_ready(nodes.members)
        faults.join_first(survivors[0])
        send_rendezvous([victim, survivors[1]])
        held = victim.expect_held("final", ANSWER_TIMEOUT)
        completed = collect(survivors)
        killed_at = sigkill(victim)
        send_rendezvous(survivors)
        errors = [s.expect("error", timeout + MARGIN + 5) for s in survivors]
        failed_after = max(s.last_answer_at or 0.0 for s in survivors) - killed_at
    check_membership([held, *completed])
    assert only(completed, "world_size") == 3
    for error in errors:
        assert error["type"] == "RendezvousTimeoutError", error
        assert f"within {timeout:g}s (min 3, max 3 nodes)" in error["message"]
        assert "joinable with 2 participants" in error["message"], error["message"]
    faults.report("final, fixed size: timeout error", failed_after)
    assert failed_after <= timeout + MARGIN


def test_rank_zero_killed_before_publishing_its_address_does_not_hang_the_others(
    faults: Faults,
) -> None:
    with faults.group() as nodes:
        # Rank 0 publishes its address while it waits for the final state, right after its
        # confirmation: held there, it dies without one, and the others' version goes final.
        (victim,) = nodes.spawn(backend=BACKEND, die_at="confirm")
        survivors = nodes.spawn(2, backend=BACKEND)
        wait_ready(nodes.members)
        faults.join_first(victim)
        send_rendezvous(survivors)
        held = victim.expect_held("confirm", ANSWER_TIMEOUT)
        assert held["rank"] == 0
        killed_at = sigkill(victim)
        # Their version is final, but it can never start: its rank 0 published no address.
        # Once rank 0's keep-alive key is gone, they leave it and form a version of two.
        results = collect(survivors)
    check_membership([held, *results])
    assert_without(results, victim, 2)
    seconds = recovery(results, killed_at)
    faults.report("confirm, rank 0", seconds)
    # The keep-alive key expires, then a check of it (every keep-alive TTL), then last call.
    assert seconds <= 2 * KEEP_ALIVE_TTL + LEASE_SLACK + LAST_CALL + MARGIN


# --- SIGSTOP longer than the keep-alive TTL ----------------------------------------------


def test_paused_member_is_replaced_and_rejoins_a_later_version_when_resumed(
    faults: Faults, etcd_api: str
) -> None:
    with faults.group() as nodes:
        paused, *others = nodes.start(3, backend=BACKEND)
        send_rendezvous(nodes.members)
        first = collect(nodes.members)
        refresher = "etcd-rdzv-keepalive-rank"
        assert refresher in paused.request({"cmd": "threads"}, REQUEST_TIMEOUT)["value"]
        [stale_rank] = [r["rank"] for r in first if r["pid"] == paused.pid]
        stale_key = f"/torchelastic/p2p/run_{faults.run_id}/rdzv/v_1/rank_{stale_rank}"

        def stale_key_present() -> bool:
            return stale_key in etcd_keys(faults.etcd, etcd_api, stale_key)

        paused.pause()
        paused_at = time.monotonic()
        # Its workers stopped making progress: the others' agents rendezvous again.
        send_rendezvous(others)
        replaced = collect(others)
        wait_until(
            "the paused member's keep-alive key expired",
            lambda: not stale_key_present(),
            timeout=KEEP_ALIVE_TTL + LEASE_SLACK + MARGIN,
        )
        assert time.monotonic() - paused_at > KEEP_ALIVE_TTL
        paused.resume()

        # Resumed, it learns its version is gone instead of carrying on with its rank...
        stale_view = paused.num_nodes_waiting(REQUEST_TIMEOUT)
        assert stale_view["value"] > 0, stale_view
        # ...and its refresher of the old rank stops instead of renewing it.
        wait_until(
            "the stale rank's keep-alive refresher stopped",
            lambda: refresher not in paused.request({"cmd": "threads"}, REQUEST_TIMEOUT)["value"],
            timeout=KEEP_ALIVE_TTL + MARGIN,
        )
        assert not stale_key_present()

        # Asked to rendezvous, it waits for the next version; the members see it waiting.
        paused.send({"cmd": "rendezvous"})
        seen: list[Record] = []

        def members_see_it_waiting() -> bool:
            seen.append(others[0].num_nodes_waiting(REQUEST_TIMEOUT))
            return bool(seen[-1]["value"] > 0)

        wait_until("the members see the resumed node waiting", members_see_it_waiting, 10)
        send_rendezvous(others)
        rejoined = collect([paused, *others])
    check_membership([*first, *replaced, stale_view, *seen, *rejoined])
    assert only(first, "version") == 1
    assert_without(replaced, paused, 2)
    assert only(replaced, "version") > 1
    assert only(rejoined, "world_size") == 3
    assert only(rejoined, "version") > only(replaced, "version")
    faults.report("SIGSTOP: the others re-form", recovery(replaced, paused_at))
    faults.report("SIGSTOP: resumed node rejoins", recovery(rejoined, paused_at))
