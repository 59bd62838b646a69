"""What an agent says of a version's participants is what it knows, in either key layout.

Under claims (etcd v3) a joinable state document lists nobody: joins are keys of their own.
An agent that read such a document mid-wait used to report 0 participants in its
`rendezvous_waiting` lines and its `etcd_rdzv_participants` gauge while it had itself joined.
"""

from __future__ import annotations

from typing import Any

import pytest

from etcd_rdzv.config import RendezvousConfig, parse_endpoints
from etcd_rdzv.errors import RendezvousTimeoutError
from etcd_rdzv.kv.memory import MemoryEtcd
from etcd_rdzv.rendezvous import EtcdRendezvous
from etcd_rdzv.telemetry import Observer


class StatesSeen(Observer):
    def __init__(self) -> None:
        self.seen: list[tuple[int | None, str, int]] = []

    def state_seen(self, version: int | None, status: str, participants: int) -> None:
        self.seen.append((version, status, participants))

    def transition(self, *args: Any) -> None:
        pass


def test_a_lone_claimant_knows_it_joined_whenever_it_reads_the_joinable_state() -> None:
    observer = StatesSeen()
    config = RendezvousConfig(
        run_id="alone", endpoints=parse_endpoints("memory:1"), min_nodes=2, max_nodes=2,
        timeout=0.3,
    )  # fmt: skip
    rendezvous = EtcdRendezvous(MemoryEtcd().client(), config, observer)
    rendezvous.prepare()
    try:
        with pytest.raises(RendezvousTimeoutError):
            rendezvous.next_rendezvous()
    finally:
        rendezvous.stop()
    joinable = [seen for seen in observer.seen if seen[1] == "joinable"]
    claimed = joinable.index((1, "joinable", 1))
    # Read again at the deadline and by the next attempt: still this node's claim.
    assert joinable[claimed + 1 :], observer.seen
    assert all(participants == 1 for _, _, participants in joinable[claimed:]), observer.seen
