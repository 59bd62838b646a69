"""The in-memory etcd's own knobs: a clock the test moves, and faults it injects.

What it shares with etcd is checked by the contract suite (tests/integration/test_kv.py, the
`memory` cases); these are what a simulation drives it with.
"""

from __future__ import annotations

import pytest

from etcd_rdzv.errors import EtcdUnavailableError
from etcd_rdzv.kv import AlreadyExists, KeyNotFound, OutcomeUnknown
from etcd_rdzv.kv.memory import MemoryEtcd
from etcd_rdzv.telemetry import Observer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Requests(Observer):
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def etcd_request(self, operation: str, result: str, seconds: float) -> None:
        self.seen.append((operation, result))


def test_leases_expire_on_the_injected_clock_a_second_later_than_asked() -> None:
    clock = Clock()
    etcd = MemoryEtcd(clock=clock)
    kv = etcd.client()
    written = kv.put("/run/rank_0", "me", ttl=2)
    clock.now += 2.9
    assert kv.get("/run/rank_0").value == "me"
    kv.refresh("/run/rank_0", 2)  # three more seconds from now
    clock.now += 2.9
    assert etcd.keys("/run/") == {"/run/rank_0"}
    clock.now += 0.2
    with pytest.raises(KeyNotFound):
        kv.get("/run/rank_0")
    with pytest.raises(KeyNotFound):
        kv.refresh("/run/rank_0", 2)
    # The expiry is an event at a revision of its own, as a deletion is.
    change = kv.watch("/run", written.revision, timeout=1, recursive=True)
    assert change is not None and change.key == "/run/rank_0" and change.deleted


def test_an_outage_fails_every_request_until_it_ends() -> None:
    etcd = MemoryEtcd()
    requests = Requests()
    kv = etcd.client(requests)
    kv.put("/k", "v")
    etcd.faults.unavailable = True
    with pytest.raises(EtcdUnavailableError):
        kv.get("/k")
    with pytest.raises(EtcdUnavailableError):
        kv.put("/k", "w")
    etcd.faults.unavailable = False
    assert kv.get("/k").value == "v"
    assert requests.seen == [("put", "ok"), ("get", "unavailable"), ("put", "unavailable"),
                             ("get", "ok")]  # fmt: skip


@pytest.mark.parametrize("applied", [True, False], ids=["applied", "not-applied"])
def test_a_lost_answer_may_or_may_not_have_applied(applied: bool) -> None:
    etcd = MemoryEtcd()
    requests = Requests()
    kv = etcd.client(requests)
    etcd.faults.lose_next_answers = [applied]
    with pytest.raises(OutcomeUnknown):
        kv.create("/rank", "mine")
    assert ("/rank" in etcd.keys("/")) is applied
    # One answer lost, the next one arrives: the caller re-reads and decides.
    if applied:
        with pytest.raises(AlreadyExists):
            kv.create("/rank", "mine")
    else:
        kv.create("/rank", "mine")
    assert requests.seen[0] == ("create", "outcome_unknown")
    # Unconditional requests are never lost this way: re-sending them is harmless.
    etcd.faults.lose_next_answers = [True]
    kv.put("/other", "x")
    assert etcd.faults.lose_next_answers == [True]


def test_a_refused_write_whose_answer_is_lost_is_unknown_too() -> None:
    etcd = MemoryEtcd()
    kv = etcd.client()
    held = kv.put("/state", "1")
    kv.put("/state", "2")
    etcd.faults.lose_next_answers = [True]
    with pytest.raises(OutcomeUnknown):
        kv.compare_and_swap("/state", "3", held)
    assert kv.get("/state").value == "2"
