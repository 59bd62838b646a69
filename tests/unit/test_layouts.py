"""Each key layout owns what its keys mean; the agent, `status` and the harness ask it."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from etcd_rdzv import protocol, rank_policy
from etcd_rdzv.config import RendezvousConfig, parse_endpoints
from etcd_rdzv.errors import ConfigurationError
from etcd_rdzv.kv.base import Entry
from etcd_rdzv.kv.memory import MemoryEtcd
from etcd_rdzv.layouts import (
    ClaimsLayout,
    Culprit,
    Departure,
    KeyLayout,
    NodeIdentity,
    RunPaths,
    TorchLayout,
    VersionEnd,
    departures,
    describe_rank,
    layout_of_client,
    rank_of,
    version_end,
    waiting_nodes,
)
from etcd_rdzv.protocol import RendezvousState, Status
from etcd_rdzv.rendezvous import EtcdRendezvous
from etcd_rdzv.status import read_snapshot, report

PATHS = RunPaths("/torchelastic/p2p/run_job")
TORCH, CLAIMS = TorchLayout(PATHS), ClaimsLayout(PATHS)


def opened(min_nodes: int = 2, max_nodes: int = 3) -> RendezvousState:
    return protocol.open_version(7, now=0.0, trace_context=None, nodes=(min_nodes, max_nodes))


def test_a_node_identity_reads_back_and_keeps_its_wire_format() -> None:
    identity = NodeIdentity("host-a", "10.0.0.1", 42, 30.0)
    # The bytes agents of earlier releases wrote, which `status` of this one must read.
    assert identity.encode() == '{"host":"host-a","addr":"10.0.0.1","pid":42,"ttl":30.0}'
    assert NodeIdentity.parse(identity.encode()) == identity


def test_a_joinable_document_says_who_joined_only_in_torchs_layout() -> None:
    joinable = opened()
    assert TORCH.lists_participants(joinable)
    assert not CLAIMS.lists_participants(joinable)
    # Claims counted: each one a participant, up to the max the opener declared.
    assert CLAIMS.participants(joinable, 2) == 2
    assert CLAIMS.participants(joinable, 5) == 3
    assert CLAIMS.participants(joinable, None) == 0  # not counted: nothing known
    assert TORCH.participants(replace(joinable, participants=(0, 1)), 9) == 2
    frozen = protocol.freeze(joinable, world_size=3)
    assert CLAIMS.lists_participants(frozen) and CLAIMS.participants(frozen, 9) == 3


@pytest.mark.parametrize(
    ("layout", "status", "listed", "confirmed"),
    [
        (TORCH, Status.FROZEN, (0,), frozenset({0})),
        (CLAIMS, Status.FROZEN, (), frozenset({0, 1})),  # the live keys are the confirmations
        (TORCH, Status.FINAL, (0, 1, 2), frozenset({0, 1, 2})),
        (CLAIMS, Status.FINAL, (0, 1, 2), frozenset({0, 1, 2})),
    ],
)
def test_which_ranks_confirmed_is_the_layouts_to_say(
    layout: KeyLayout, status: Status, listed: tuple[int, ...], confirmed: frozenset[int]
) -> None:
    state = RendezvousState(
        status, 7, participants=(0, 1, 2), keep_alives=tuple(PATHS.keep_alive(7, r) for r in listed)
    )
    # A key of a rank past the world size never counts (left over, or another run's bug).
    live = [PATHS.keep_alive(7, rank) for rank in (0, 1, 5)]
    assert layout.confirmed_ranks(state, live) == confirmed


def test_nobody_confirms_in_a_joinable_version() -> None:
    assert TORCH.confirmed_ranks(opened(), []) is None
    assert CLAIMS.confirmed_ranks(opened(), [PATHS.keep_alive(7, 0)]) is None


def test_over_an_etcd_with_transactions_status_reads_a_claims_run_truthfully() -> None:
    etcd = MemoryEtcd()
    kv = etcd.client()
    assert isinstance(layout_of_client(kv, PATHS), ClaimsLayout)
    frozen = protocol.freeze(opened(3, 3), world_size=3)
    kv.put(PATHS.active_version, frozen.encode())
    kv.put(PATHS.version_counter, "7")
    for rank, host in ((0, "a"), (1, "b")):
        kv.put(PATHS.keep_alive(7, rank), NodeIdentity(host, None, rank + 1, 30.0).encode(), 30)
    snapshot = read_snapshot(kv, "job", "/torchelastic/p2p")
    views = {view.rank: view for view in snapshot.ranks}
    assert [views[r].confirmed for r in (0, 1, 2)] == [True, True, False]
    assert views[1].identity == NodeIdentity("b", None, 2, 30.0)
    assert views[2].keep_alive is False and views[2].identity is None


def test_a_joinable_claims_run_lists_its_claimants_when_read() -> None:
    kv = MemoryEtcd().client()
    joinable = opened()
    entry = kv.put(PATHS.active_version, joinable.encode())
    for node in ("a", "b"):
        claimed = PATHS.join_claims(7) + node
        kv.claim(claimed, json.dumps({"host": node}), guard=entry, queue=PATHS.join_claims(7))
    listed = CLAIMS.with_participants(kv, joinable)
    assert listed.participants == (0, 1)
    assert TORCH.with_participants(kv, joinable) is joinable  # its document says it all


def test_the_run_configuration_chooses_the_layout_and_a_client_must_support_it() -> None:
    def config(api: str) -> RendezvousConfig:
        endpoints = parse_endpoints("memory:1")
        return RendezvousConfig("job", endpoints, 1, 1, etcd_api=api)  # type: ignore[arg-type]

    etcd = MemoryEtcd()
    assert isinstance(EtcdRendezvous(etcd.client(), config("v3")).layout, ClaimsLayout)
    # torch's layout runs over a client with claims too; claims over one without cannot.
    assert isinstance(EtcdRendezvous(etcd.client(), config("v2")).layout, TorchLayout)
    with pytest.raises(ConfigurationError, match="needs etcd v3's transactions"):
        EtcdRendezvous(etcd.client(claims=False), config("v3"))


def test_status_names_who_joined_under_claims_and_knows_the_sizes_the_opener_declared() -> None:
    kv = MemoryEtcd().client()
    joinable = opened(3, 3)
    entry = kv.put(PATHS.active_version, joinable.encode())
    kv.put(PATHS.version_counter, "7")
    for node in ("vm-a", "vm-b"):
        identity = NodeIdentity(node, None, 100, 30.0).encode()
        queue = PATHS.join_claims(7)
        kv.claim(queue + node, identity, guard=entry, queue=queue)
    snapshot = read_snapshot(kv, "job", "/torchelastic/p2p")
    assert [(r.rank, r.identity.host if r.identity else None) for r in snapshot.ranks] == [
        (0, "vm-a"),
        (1, "vm-b"),
    ]
    shown = report(snapshot, None, None)
    assert (shown.min_nodes, shown.max_nodes) == (3, 3)
    assert shown.diagnosis == "joinable with 2 participants (min 3, max 3): waiting for 1 more node"
    assert "vm-a" in shown.to_text() and "min unknown" not in shown.to_text()
    # Flags still win: for documents torch's backend wrote, which declare nothing.
    assert report(snapshot, 2, None).min_nodes == 2


def test_departures_and_endings_read_back_and_name_their_nodes() -> None:
    node = NodeIdentity("vm-a", "10.0.0.1", 42, 30.0, at=1_800_000_000.5)
    left = Departure(2, node, "rendezvous_again")
    ending = VersionEnd("keep_alive_missing", (Culprit(0, node), Culprit(1, None)), node)
    entries = [
        Entry(PATHS.departure(7, 2), left.encode(), 5, 9),
        Entry(PATHS.ending(7), ending.encode(), 6, 9),
        Entry(PATHS.keep_alive(7, 1), node.encode(), 4, 9),  # a keep-alive is no departure
        Entry(PATHS.departure(7, 3), "not json", 7, 9),  # garbage is ignored, not fatal
    ]
    assert departures(entries) == {2: left}
    assert version_end(entries, PATHS, 7) == ending
    assert version_end(entries, PATHS, 8) is None
    # A departure key is no keep-alive key: readers of ranks never mistake one for the other.
    assert rank_of(PATHS.departure(7, 2)) is None
    assert describe_rank(0, node) == "rank 0 (vm-a, pid 42)"
    assert describe_rank(1, None) == "rank 1"


def test_a_rank_view_tells_join_and_confirmation_times_and_a_departure() -> None:
    state = RendezvousState(Status.FROZEN, 7, (0, 1), keep_alives=())
    joined = (
        NodeIdentity("a", None, 1, 30.0, at=100.0),
        NodeIdentity("b", None, 2, 30.0, at=101.0),
    )
    confirmed = NodeIdentity("a", None, 1, 30.0, at=105.0)
    left = Departure(1, NodeIdentity("b", None, 2, 30.0, at=106.0), "rendezvous_again")
    entries = [
        Entry(PATHS.keep_alive(7, 0), confirmed.encode(), 3, 9),
        Entry(PATHS.departure(7, 1), left.encode(), 4, 9),
    ]
    first, second = CLAIMS.rank_views(state, entries, joined=joined)
    assert (first.joined_at, first.confirmed_at, first.left) == (100.0, 105.0, None)
    assert (second.joined_at, second.confirmed_at, second.left) == (101.0, None, left)
    assert second.identity == joined[1]


def test_waiting_nodes_say_who_they_are_where_the_state_only_counts_them() -> None:
    early = NodeIdentity("vm-c", None, 7, 30.0, at=200.0)
    late = NodeIdentity("vm-d", None, 8, 30.0, at=201.0)
    entries = [
        Entry(PATHS.waiting(7, "vm-d-8-bbbb"), late.encode(), 6, 9),
        Entry(PATHS.waiting(7, "vm-c-7-aaaa"), early.encode(), 5, 9),
        Entry(PATHS.keep_alive(7, 0), early.encode(), 4, 9),
    ]
    assert waiting_nodes(entries) == (early, late)
    assert rank_of(PATHS.waiting(7, "vm-c-7-aaaa")) is None


def test_under_a_rank_policy_every_reader_names_each_rank_by_the_policys_ranks() -> None:
    """The claims are in join order; the frozen document says which rank each place got.
    Reading the claims by place would name the wrong node for every rank that moved."""
    kv = MemoryEtcd().client()
    joinable = protocol.open_version(7, now=0.0, nodes=(3, 3), rank_policy="stable")
    entry = kv.put(PATHS.active_version, joinable.encode())
    kv.put(PATHS.version_counter, "7")
    queue = PATHS.join_claims(7)
    for name in ("vm-c", "vm-a", "vm-b"):
        identity = NodeIdentity(name, None, 100, 30.0, node_id=name).encode()
        kv.claim(queue + name, identity, guard=entry, queue=queue)
    # While joinable, nobody has a rank: a reader shows places.
    listed = CLAIMS.with_participants(kv, joinable)
    (view, *_) = CLAIMS.rank_views(listed, [], joined=CLAIMS.joined(kv, listed))
    assert view.place and view.identity is not None and view.identity.host == "vm-c"
    memory = rank_policy.RankMemory().after(6, ["vm-a", "vm-b", "vm-c"])
    kv.put(PATHS.rank_memory, memory.encode())
    decided = CLAIMS.decide_ranks(kv, rank_policy.RankPolicy("stable"), CLAIMS.join_claims(kv, 7))
    assert isinstance(decided, rank_policy.Assignment) and decided.ranks == (2, 0, 1)
    frozen = protocol.freeze(joinable, world_size=3, ranks=decided)
    kv.put(PATHS.active_version, CLAIMS.encode_state(frozen))
    assert [n.host if n else None for n in CLAIMS.joined(kv, frozen)] == ["vm-a", "vm-b", "vm-c"]
    assert CLAIMS.ids_by_rank(kv, frozen) == ["vm-a", "vm-b", "vm-c"]
    snapshot = read_snapshot(kv, "job", "/torchelastic/p2p")
    assert [(r.rank, r.identity.host if r.identity else None, r.previous_rank, r.place)
            for r in snapshot.ranks] == [(0, "vm-a", 0, False), (1, "vm-b", 1, False),
                                         (2, "vm-c", 2, False)]  # fmt: skip
    assert (
        "rank policy: stable; previous ranks from version 6"
        in report(snapshot, None, None).to_text()
    )


def test_a_version_torn_down_while_joinable_under_a_policy_blamed_a_place() -> None:
    node = NodeIdentity("vm-b", None, 42, 30.0)
    ending = VersionEnd("last_call_abandoned", (Culprit(1, node),), node, by_place=True)
    assert VersionEnd.parse(ending.encode()) == ending
    assert "by_place" not in VersionEnd("x", (), node).encode()  # the bytes as before
    assert describe_rank(1, node, place=True) == "place 1 (vm-b, pid 42)"
