"""The scale model's counting (benchmarks/scale_model.py), on scripted calls and small runs.

The numbers it prints depend on the protocol and change with it; what must hold is the
counting itself: each call counted once, each call mapped onto the v3 transport's requests,
each response's bytes counted for the node it was sent to, and totals that are the nodes' sum.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from benchmarks.scale_model import (
    CREATION,
    RENDEZVOUS,
    CountingKeyValue,
    lease_response,
    put_response,
    range_response,
    run_model,
    txn_response,
    watch_created,
    watch_events,
)

from etcd_rdzv.kv import CompareFailed, Entry
from etcd_rdzv.kv.base import Change
from tests.simulation.engine import Simulation

KEY_VALUE_METHODS = frozenset(
    {"get", "create", "put", "compare_and_swap", "claim", "compare_and_delete", "refresh",
     "ensure_directory", "list", "watch", "time_left"}
)  # fmt: skip


def run(sim: Simulation, *bodies: Callable[[], None]) -> None:
    """Run `bodies` as actors of their own until nothing is left to run."""
    for index, body in enumerate(bodies):
        sim.spawn(f"actor{index}", f"actor{index}/main", body)
    while sim.run_step():
        pass
    assert not sim.errors


def test_a_watch_event_is_counted_for_each_watcher_and_each_call_once() -> None:
    sim = Simulation(seed=7)
    writer, alice, bob = (CountingKeyValue(sim, name) for name in ("w", "a", "b"))
    written: list[Entry] = []
    run(sim, lambda: written.extend([writer.put("/r/k", "v1"), writer.create("/r/t", "t", ttl=5)]))
    read: dict[str, Entry] = {}
    value = "x" * 1000

    def watcher(name: str, kv: CountingKeyValue) -> Callable[[], None]:
        def body() -> None:
            read[name] = kv.get("/r/k")
            assert kv.watch("/r/k", read[name].read_revision, timeout=60) is not None

        return body

    def write_later() -> None:
        sim.sleep(5.0)  # the watchers are watching by then
        written.append(writer.put("/r/k", value))

    run(sim, watcher("alice", alice), watcher("bob", bob), write_later)
    first, lease_key, last = written
    assert writer.tally.calls == Counter(put=2, create=1)
    assert writer.tally.requests == Counter(Put=2, LeaseGrant=1, Txn=1)
    assert writer.tally.sent == Counter(
        Put=put_response(first.revision) + put_response(last.revision),
        # The lease is granted before the transaction, at the store's revision then.
        LeaseGrant=lease_response(first.revision, 6),
        Txn=txn_response(lease_key.revision, True, [put_response(lease_key.revision)]),
    )
    event = watch_events(last.revision, [Change("/r/k", value, last.revision)])
    assert event > len(value)
    for name, kv in (("alice", alice), ("bob", bob)):
        # Nothing moved between the read and the watch: no read to cover a gap.
        assert kv.tally.calls == Counter(get=1, watch=1)
        assert kv.tally.requests == Counter(Range=1, Watch=1)
        opened = read[name].read_revision
        assert kv.tally.sent == Counter(
            Range=range_response(opened, [read[name]]), Watch=watch_created(opened) + event
        )
    # Nothing was counted as creation but what the phase was when it was made.
    assert writer.tallies[RENDEZVOUS].total_requests == 0


def test_a_watch_opened_after_the_store_moved_reads_the_key_once() -> None:
    sim = Simulation(seed=3)
    watcher, writer = CountingKeyValue(sim, "a"), CountingKeyValue(sim, "w")
    entries: list[Entry] = []
    run(sim, lambda: entries.extend([writer.put("/r/k", "v1"), writer.put("/r/other", "o")]))
    key, other = entries
    # The watch starts from the first write; the store is at the second: the key's value
    # (unchanged since) is read, then the watch waits and times out.
    seen: list[Change | None] = []
    run(sim, lambda: seen.append(watcher.watch("/r/k", key.revision, timeout=1.0)))
    assert seen == [None]
    assert watcher.tally.requests == Counter(Watch=1, Range=1)
    unchanged = Entry("/r/k", "v1", key.revision, other.revision)
    assert watcher.tally.sent == Counter(
        Watch=watch_created(other.revision), Range=range_response(other.revision, [unchanged])
    )


def test_a_refused_claim_reads_the_guard_and_leaves_its_lease_spare() -> None:
    sim = Simulation(seed=5)
    kv = CountingKeyValue(sim, "a")
    state: list[Entry] = []
    refused: list[CompareFailed] = []

    def body() -> None:
        stale = kv.put("/r/state", "joinable")
        state.append(kv.put("/r/state", "frozen " + "p" * 500))
        try:
            kv.claim("/r/rank_0", "me", guard=stale, queue="/r/rank_", ttl=10)
        except CompareFailed as refusal:
            refused.append(refusal)
        # Within a second: the spare lease serves it, no second grant.
        kv.create("/r/rank_0", "me", ttl=10)

    run(sim, body)
    assert refused and refused[0].current == state[0]
    assert kv.tally.calls == Counter(put=2, claim=1, create=1)
    assert kv.tally.requests == Counter(Put=2, LeaseGrant=1, Txn=2)
    revision = state[0].revision
    created = revision + 1
    assert kv.tally.sent["Txn"] == txn_response(
        revision, False, [range_response(revision, [state[0]])]
    ) + txn_response(created, True, [put_response(created)])


def test_a_directory_marker_costs_a_read_and_its_creation_once() -> None:
    sim = Simulation(seed=11)
    first, second = CountingKeyValue(sim, "a"), CountingKeyValue(sim, "b")
    run(sim, lambda: first.ensure_directory("/run", ttl=60))
    run(sim, lambda: second.ensure_directory("/run", ttl=60), lambda: first.ensure_directory("/p"))
    assert first.tally.requests == Counter(Range=1, LeaseGrant=1, Txn=1)
    assert first.tally.calls == Counter(ensure_directory=2)  # the second: no TTL, no request
    assert second.tally.requests == Counter(Range=1)


class Spy(CountingKeyValue):
    """Counts the interface's calls as they are made, independently of the model's tally."""

    def __init__(self, sim: Simulation, node: str) -> None:
        super().__init__(sim, node)
        self.made: Counter[str] = Counter()

    def __getattribute__(self, name: str) -> Any:
        if name in KEY_VALUE_METHODS:
            object.__getattribute__(self, "made")[name] += 1
        return object.__getattribute__(self, name)


@pytest.mark.parametrize("nodes", [2, 4])
def test_a_rendezvous_is_counted_call_by_call_and_node_by_node(nodes: int) -> None:
    spies: list[Spy] = []

    def client(sim: Simulation, node: str) -> Spy:
        spies.append(Spy(sim, node))
        return spies[-1]

    model = run_model(nodes, seed=1, client=client)
    totals = model.node_totals()
    assert len(totals) == len(spies) == nodes
    for spy, total in zip(spies, totals, strict=True):
        assert +total.calls == +spy.made
        calls, requests = total.calls, total.requests
        # The requests that are one per call.
        assert requests["Watch"] == calls["watch"]
        assert requests["Put"] == calls["put"]
        assert requests["LeaseKeepAlive"] == calls["refresh"]
        writes = ("create", "compare_and_swap", "claim", "compare_and_delete")
        assert requests["Txn"] >= sum(calls[write] for write in writes)
        assert requests["Range"] >= calls["get"] + calls["list"]
        assert set(total.sent) == set(requests)  # every request was answered with bytes
        assert spy.tallies[CREATION].calls["ensure_directory"] >= 1
        assert spy.tallies[RENDEZVOUS].calls["claim"] == 2  # join and confirm
    whole = model.total()
    assert whole.total_requests == sum(total.total_requests for total in totals)
    assert whole.total_bytes == sum(total.total_bytes for total in totals)
    summary = model.summary()
    assert summary["requests_total"] == whole.total_requests
    assert summary["requests_per_node"] == whole.total_requests / nodes
    assert summary["bytes_per_node"] == whole.total_bytes / nodes
