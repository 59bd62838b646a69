"""The state document and its transitions: torch-compatible, no I/O."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from etcd_rdzv import protocol
from etcd_rdzv.errors import CorruptStateError
from etcd_rdzv.protocol import Lifetime, RendezvousState, Status

KEY = "/torchelastic/p2p/run_r/rdzv/active_version"


def test_encoding_is_what_torch_reads() -> None:
    state = protocol.open_version(7)
    document = json.loads(state.encode())
    # torch compares versions as the strings it wrote: "7", never 7.
    assert document == {"status": "joinable", "version": "7", "participants": []}
    assert json.loads(protocol.setup().encode()) == {"status": "setup"}


def test_torch_documents_decode() -> None:
    torch_final = json.dumps(
        {"status": "final", "version": "3", "participants": [0, 1],
         "keep_alives": ["/k/rank_0", "/k/rank_1"], "num_workers_waiting": 2}
    )  # fmt: skip
    state = RendezvousState.decode(torch_final, KEY)
    assert state.status is Status.FINAL
    assert (state.version, state.world_size, state.num_workers_waiting) == (3, 2, 2)
    assert RendezvousState.decode(state.encode(), KEY) == state


def test_unknown_fields_survive_a_rewrite() -> None:
    raw = json.dumps({"status": "joinable", "version": "1", "participants": [], "x": {"y": 1}})
    joined = protocol.join(RendezvousState.decode(raw, KEY), min_nodes=2, max_nodes=3)
    assert json.loads(joined.state.encode())["x"] == {"y": 1}


def test_fixed_size_join_freezes_on_the_last_rank() -> None:
    state = protocol.open_version(1)
    ranks = []
    for _ in range(3):
        joined = protocol.join(state, min_nodes=3, max_nodes=3)
        ranks.append(joined.rank)
        state = joined.state
        assert not joined.holds_last_call
    assert ranks == [0, 1, 2]
    assert state.status is Status.FROZEN
    assert state.keep_alives == ()
    assert joined.lifetime is Lifetime.FROZEN


def test_elastic_join_hands_the_last_call_to_the_node_reaching_min() -> None:
    state = protocol.open_version(1)
    first = protocol.join(state, min_nodes=2, max_nodes=4)
    second = protocol.join(first.state, min_nodes=2, max_nodes=4)
    third = protocol.join(second.state, min_nodes=2, max_nodes=4)
    assert (first.lifetime, first.holds_last_call) == (Lifetime.PERMANENT, False)
    assert (second.lifetime, second.holds_last_call) == (Lifetime.JOINABLE, True)
    # Later joins keep the state ephemeral but do not take over the last call.
    assert (third.lifetime, third.holds_last_call) == (Lifetime.JOINABLE, False)
    assert third.state.status is Status.JOINABLE


def test_joining_a_non_joinable_or_full_state_is_a_logic_error() -> None:
    with pytest.raises(ValueError, match="cannot join a frozen"):
        protocol.join(protocol.freeze(protocol.open_version(1)), min_nodes=1, max_nodes=2)


def test_confirm_finalizes_on_the_last_keep_alive() -> None:
    frozen = protocol.freeze(protocol.join(protocol.RendezvousState(
        Status.JOINABLE, version=4, participants=(0,)), 1, 2).state)  # fmt: skip
    once = protocol.confirm(frozen, "/k/rank_0")
    assert not once.completed and once.lifetime is Lifetime.FROZEN
    twice = protocol.confirm(once.state, "/k/rank_1")
    assert twice.completed and twice.lifetime is Lifetime.PERMANENT
    assert twice.state.num_workers_waiting == 0
    assert twice.state.keep_alives == ("/k/rank_0", "/k/rank_1")


@pytest.mark.parametrize(
    ("position", "expected"),
    [
        # min 2, max 4: (rank, too late, freezes, holds the last call)
        (1, (0, False, False, False)),
        (2, (1, False, False, True)),
        (3, (2, False, False, False)),
        (4, (3, False, True, False)),
        (5, (4, True, False, False)),
    ],
)
def test_a_claims_position_decides_its_part(position: int, expected: tuple[object, ...]) -> None:
    claimed = protocol.claimed_rank(position, min_nodes=2, max_nodes=4)
    assert (claimed.rank, claimed.too_late, claimed.freezes, claimed.holds_last_call) == expected


def test_a_fixed_size_claim_that_fills_the_version_freezes_it_without_a_last_call() -> None:
    claimed = protocol.claimed_rank(3, min_nodes=3, max_nodes=3)
    assert (claimed.freezes, claimed.holds_last_call) == (True, False)
    with pytest.raises(ValueError):
        protocol.claimed_rank(0, min_nodes=1, max_nodes=1)


def test_freezing_claims_lists_the_counted_participants_and_completes_like_torch() -> None:
    joinable = protocol.open_version(7)
    frozen = protocol.freeze(joinable, world_size=3)
    assert (frozen.status, frozen.participants, frozen.keep_alives) == (
        Status.FROZEN, (0, 1, 2), (),
    )  # fmt: skip
    keys = [f"/run/rdzv/v_7/rank_{rank}" for rank in range(3)]
    final = protocol.complete(frozen, keys)
    # The same document torch's last confirmation writes.
    assert json.loads(final.encode()) == {
        "status": "final", "version": "7", "participants": [0, 1, 2], "keep_alives": keys,
        "num_workers_waiting": 0,
    }  # fmt: skip


def test_under_claims_a_document_counts_its_participants_instead_of_listing_them() -> None:
    """Issue 16: every node watching the state receives each frozen and final document, so
    listing N ranks and N keys there costs O(N^2) bytes per version; counted, O(N)."""
    keys = [f"/run/rdzv/v_7/rank_{rank}" for rank in range(1000)]
    frozen = protocol.freeze(protocol.open_version(7), world_size=1000)
    final = protocol.complete(frozen, keys, now=1.0)
    closed = protocol.close(protocol.announce_waiting(final))
    for state in (frozen, final, closed):
        raw = state.encode(counted=True)
        assert len(raw) < 300
        assert RendezvousState.decode(raw, KEY) == state
    assert json.loads(final.encode(counted=True))[protocol.COUNTED_FIELD] == {
        "participants": 1000, "keep_alive_prefix": "/run/rdzv/v_7/rank_",
    }  # fmt: skip
    # torch's layout keeps torch's document, and anything that is not ranks 0..n-1 with keys
    # differing by rank alone stays listed.
    assert len(final.encode()) > 1000 * len(keys[0])
    odd = replace(final, keep_alives=(*keys[:-1], "/elsewhere/rank_999"))
    assert "keep_alives" in json.loads(odd.encode(counted=True))
    assert RendezvousState.decode(odd.encode(counted=True), KEY) == odd
    joinable = protocol.open_version(8)
    assert json.loads(joinable.encode(counted=True)) == json.loads(joinable.encode())


def test_the_version_trace_travels_in_the_state_through_every_rewrite() -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    joinable = protocol.open_version(3, trace_context=traceparent)
    frozen = protocol.freeze(joinable, world_size=1)
    final = protocol.complete(frozen, ["/run/rdzv/v_3/rank_0"])
    decoded = RendezvousState.decode(final.encode(), "/run/rdzv/active_version")
    assert protocol.trace_context(decoded) == traceparent
    # A version opened without tracing (or by torch) has none.
    assert protocol.trace_context(protocol.open_version(4)) is None


def test_missing_keep_alives_are_found() -> None:
    state = RendezvousState(Status.FINAL, 2, (0, 1), ("/a", "/b"), 0)
    assert protocol.missing_keep_alives(state, {"/a"}) == ["/b"]
    assert protocol.missing_keep_alives(state, {"/a", "/b", "/c"}) == []


def test_announce_and_close() -> None:
    final = RendezvousState(Status.FINAL, 2, (0,), ("/a",), 0)
    assert protocol.announce_waiting(final).num_workers_waiting == 1
    closed = protocol.close(final)
    assert closed.status is Status.CLOSED and closed.version == 2
    assert json.loads(protocol.close(None).encode()) == {"status": "closed", "participants": []}


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("", "not JSON"),
        ("{trunc", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"status": "dancing"}', "unknown status"),
        ('{"status": "joinable", "participants": []}', "without a version"),
        ('{"status": "joinable", "version": "x", "participants": []}', "version is not an integer"),
        ('{"status": "joinable", "version": "1", "participants": [0, 0]}', "not the ranks"),
        ('{"status": "joinable", "version": "1", "participants": "0"}', "not a list of ranks"),
        ('{"status": "final", "version": "1", "participants": [0], "keep_alives": [1]}',
         "keep_alives is not a list of keys"),
        # Found by tests/integration/test_bad_state.py: each used to escape or be misread.
        ("[" * 100_000 + "]" * 100_000, "not JSON"),
        ('{"status": "joinable", "version": Infinity, "participants": []}', "not an integer"),
        ('{"status": "joinable", "version": 1.5, "participants": []}', "not an integer"),
        ('{"status": "joinable", "version": "-2", "participants": []}', "negative"),
        ('{"status": "final", "version": "1", "etcd_rdzv_counted": 3}', "not an object"),
        ('{"status": "final", "version": "1", "etcd_rdzv_counted": {"participants": -1}}',
         "counts no participants"),
        ('{"status": "final", "version": "1", "etcd_rdzv_counted": {"participants": 1e12}}',
         "counts no participants"),
        ('{"status": "final", "version": "1", "etcd_rdzv_counted": {"participants": 9999999999}}',
         "counts no participants"),
        ('{"status": "final", "version": "1", '
         '"etcd_rdzv_counted": {"participants": 2, "keep_alive_prefix": 5}}', "no key"),
    ],
)  # fmt: skip
def test_corrupt_documents_name_the_key_and_the_problem(raw: str, problem: str) -> None:
    with pytest.raises(CorruptStateError, match=problem) as caught:
        RendezvousState.decode(raw, KEY)
    assert caught.value.key == KEY
    assert KEY in str(caught.value)


@pytest.mark.parametrize(
    ("state", "member_of", "expected"),
    [
        (None, None, 0),  # nothing yet, not a member: nobody waits for us
        (RendezvousState(Status.FINAL, 3, (0, 1), ("/a", "/b"), 2), 3, 2),  # torch's count
        (RendezvousState(Status.FINAL, 3, (0, 1), ("/a", "/b"), 0), 3, 0),
        (RendezvousState(Status.FINAL, 3, (0,), ("/a",), 1), None, 1),  # before our first join
        # Our version is gone: whoever replaced it waits for us, even if nobody counted.
        (None, 3, 1),
        (RendezvousState(Status.SETUP), 3, 1),
        (RendezvousState(Status.JOINABLE, 4, (0, 1)), 3, 2),
        (RendezvousState(Status.FINAL, 4, (0,), ("/a",), 0), 3, 1),
        # A closed run waits for nobody: the job is over.
        (RendezvousState(Status.CLOSED, 3, (0, 1)), 3, 0),
    ],
)
def test_nodes_waiting(state: RendezvousState | None, member_of: int | None, expected: int) -> None:
    assert protocol.nodes_waiting(state, member_of) == expected


def test_transitions_record_when_the_status_began() -> None:
    opened = protocol.open_version(1, now=100.0)
    assert protocol.entered_at(opened) == 100.0
    joined = protocol.join(opened, min_nodes=2, max_nodes=2, now=105.0).state
    assert joined.status is Status.JOINABLE and protocol.entered_at(joined) == 100.0
    frozen = protocol.join(joined, min_nodes=2, max_nodes=2, now=107.0).state
    assert frozen.status is Status.FROZEN and protocol.entered_at(frozen) == 107.0
    # A torch node froze it, carrying our older stamp along: the stamp no longer counts.
    torch_frozen = json.loads(joined.encode()) | {"status": "frozen", "keep_alives": []}
    assert protocol.entered_at(RendezvousState.decode(json.dumps(torch_frozen), KEY)) is None
    # torch reads the stamped document as before: the field is extra to it.
    assert json.loads(frozen.encode())["status"] == "frozen"


def test_the_node_that_enters_a_status_signs_it_and_a_rewrite_within_it_keeps_the_signature() -> (
    None
):
    a, b = {"host": "vm-a", "pid": 1}, {"host": "vm-b", "pid": 2}
    opened = protocol.signed(protocol.open_version(1, now=10.0), a)
    assert protocol.entered_by(opened) == a
    joined = protocol.signed(protocol.join(opened, 2, 3, now=11.0).state, b)
    assert protocol.entered_by(joined) == a  # b joined; a still opened it
    frozen = protocol.signed(protocol.freeze(joined, now=12.0), b)
    assert protocol.entered_by(frozen) == b
    # A torch node freezing carries the old stamp through: it counts for no other status.
    torch_frozen = replace(joined, status=Status.FROZEN, keep_alives=())
    assert protocol.entered_by(torch_frozen) is None
    assert protocol.entered_at(torch_frozen) is None


def test_the_opener_records_its_time_limits_and_the_last_call_its_start() -> None:
    timing = protocol.Timing(30.0, 600.0, 10.0, 10.0, 9.0)
    opened = protocol.open_version(1, now=10.0, nodes=(2, 4), timing=timing)
    assert protocol.declared_timing(RendezvousState.decode(opened.encode(), "k")) == timing
    assert protocol.declared_timing(replace(opened, extra={})) is None
    first = protocol.join(opened, 2, 4, now=11.0).state
    assert protocol.last_call_since(first) is None  # below min: no last call yet
    second = protocol.join(first, 2, 4, now=12.5).state
    assert protocol.last_call_since(second) == 12.5
    third = protocol.join(second, 2, 4, now=13.0).state
    assert protocol.last_call_since(third) == 12.5  # later joins do not move it
    assert protocol.last_call_since(protocol.freeze(third, now=14.0)) is None
