"""What `etcd-rdzv status` predicts: a pure function of one reading of the run's keys."""

from __future__ import annotations

from dataclasses import replace

from etcd_rdzv import protocol
from etcd_rdzv.forecast import Outlook, RunReading, forecast
from etcd_rdzv.layouts import Departure, NodeIdentity, RankView
from etcd_rdzv.protocol import RendezvousState, Status, Timing

TIMING = Timing(
    last_call_timeout=30.0, timeout=600.0, joinable_ttl=10.0, frozen_ttl=10.0, keep_alive_ttl=9.0
)
T0 = 1_800_000_000.0  # a unix time: the version opened then


def node(rank: int, **fields: object) -> RankView:
    identity = NodeIdentity(f"vm-{'abcdef'[rank]}", None, 1000 + rank, 9.0)
    defaults: dict[str, object] = {
        "keep_alive_key": f"/run/rdzv/v_1/rank_{rank}",
        "keep_alive": False,
        "confirmed": None,
        "identity": identity,
    }
    return RankView(rank=rank, **{**defaults, **fields})  # type: ignore[arg-type]


def joinable(n: int) -> RendezvousState:
    opened = protocol.open_version(1, now=T0, nodes=(2, 4), timing=TIMING)
    return replace(opened, participants=tuple(range(n)))


def reading(state: RendezvousState, ranks: list[RankView], now: float, **kw: object) -> RunReading:
    options: dict[str, object] = {
        "nodes": (2, 4),
        "timing": protocol.declared_timing(state),
        "joins_by_claims": True,
    }
    options.update(kw)
    return RunReading(state, ranks, now, **options)  # type: ignore[arg-type]


def test_below_min_the_first_node_times_out_unless_enough_nodes_join() -> None:
    state = joinable(1)
    (outlook,) = forecast(reading(state, [node(0, joined_at=T0 + 1)], T0 + 5, nodes=(3, 3)))
    assert outlook == Outlook(
        "rank 0 (vm-a, pid 1000) times out (timeout 600 s) and its agent fails",
        at=T0 + 1 + 600,
        unless="2 more nodes join",
    )


def test_in_the_last_call_its_holder_freezes_when_it_ends() -> None:
    # min 2: the second claim (rank 1) holds the last call from its join.
    ranks = [node(0, joined_at=T0), node(1, joined_at=T0 + 4)]
    (outlook,) = forecast(reading(joinable(2), ranks, T0 + 10))
    assert outlook.what == "rank 1 (vm-b, pid 1001) freezes it with 2"
    assert outlook.at == T0 + 4 + 30
    assert outlook.unless is not None and outlook.unless.startswith("more nodes join first")


def test_in_torchs_layout_the_last_call_began_when_the_state_says() -> None:
    state = protocol.open_version(1, now=T0, nodes=(2, 3), timing=TIMING)
    state = protocol.join(state, 2, 3, now=T0 + 1).state
    state = protocol.join(state, 2, 3, now=T0 + 7).state  # reaches min: the last call begins
    ranks = [node(0), node(1)]
    (outlook,) = forecast(reading(state, ranks, T0 + 8, nodes=(2, 3), joins_by_claims=False))
    assert outlook.at == T0 + 7 + 30
    assert outlook.unless == "1 more node joins first (then it freezes at once with it)"


def test_an_overdue_last_call_is_torn_down_by_the_node_that_backs_it_up() -> None:
    ranks = [node(0, joined_at=T0), node(1, joined_at=T0 + 1), node(2, joined_at=T0 + 3)]
    now = T0 + 1 + 30 + 5  # five seconds after the last call should have ended
    (outlook,) = forecast(reading(joinable(3), ranks, now))
    # decisions.abandoned_after: rank 2 (joined after the holder) waits a joinable TTL more.
    assert outlook.at == T0 + 3 + 30 + 10
    assert outlook.what.startswith("rank 2 (vm-c, pid 1002) tears the version down")
    assert "rank 1 (vm-b, pid 1001) held the last call and is 5 s late" in outlook.what


def test_an_overdue_last_call_in_torchs_layout_ends_when_the_state_expires() -> None:
    state = protocol.join(protocol.open_version(1, now=T0, timing=TIMING), 1, 3, now=T0).state
    now = T0 + 40
    ranks = [node(0)]
    (outlook,) = forecast(
        reading(state, ranks, now, nodes=(1, 3), joins_by_claims=False, state_expires_in=4.0)
    )
    assert outlook.at == now + 4
    assert outlook.what.startswith("the joinable state expires and every node starts over")


def test_frozen_starts_over_without_the_unconfirmed_when_the_state_expires() -> None:
    state = protocol.freeze(joinable(3), now=T0 + 30)
    ranks = [node(0, confirmed=True), node(1, confirmed=False), node(2, confirmed=True)]
    (outlook,) = forecast(reading(state, ranks, T0 + 31, state_expires_in=9.0))
    assert outlook == Outlook(
        "the frozen state expires and every node starts over without rank 1 (vm-b, pid 1001)",
        at=T0 + 31 + 9,
        unless="it confirms first",
    )


def final(n: int, waiting: int = 0) -> RendezvousState:
    keys = [f"/run/rdzv/v_1/rank_{r}" for r in range(n)]
    return replace(
        protocol.complete(protocol.freeze(joinable(n), now=T0), keys, now=T0),
        num_workers_waiting=waiting,
    )


def test_final_with_a_lost_member_names_it_and_says_when_the_others_follow() -> None:
    ranks = [node(0), node(1, keep_alive=True, expires_in=8.0)]
    (outlook,) = forecast(reading(final(2), ranks, T0 + 60))
    assert outlook.at is None
    assert outlook.what.startswith("its members rendezvous again without rank 0 (vm-a, pid 1000)")


def test_final_with_a_member_that_left_blames_nobody() -> None:
    left = Departure(0, NodeIdentity("vm-a", None, 1000, 9.0, at=T0 + 50), "rendezvous_again")
    ranks = [node(0, left=left), node(1, keep_alive=True, expires_in=8.0)]
    (outlook,) = forecast(reading(final(2, waiting=1), ranks, T0 + 60))
    assert outlook.what.startswith("rank 0 (vm-a, pid 1000) left to rendezvous again")


def test_a_keep_alive_not_renewed_says_when_it_expires() -> None:
    # TTL 9 s, renewed every 3 s: 8 s without a renewal is more than two periods and a second.
    ranks = [node(0, keep_alive=True, expires_in=1.0), node(1, keep_alive=True, expires_in=7.0)]
    (outlook,) = forecast(reading(final(2), ranks, T0 + 60))
    assert outlook.at == T0 + 61
    assert outlook.what.startswith("rank 0 (vm-a, pid 1000)'s keep-alive expires")
    assert outlook.unless == "its node renews it (last renewed 8 s ago; it renews every 3.0 s)"


def test_waiting_nodes_are_admitted_at_the_next_check() -> None:
    ranks = [node(r, keep_alive=True, expires_in=9.0) for r in range(2)]
    (outlook,) = forecast(reading(final(2, waiting=1), ranks, T0 + 60))
    assert outlook.what.startswith("the members rendezvous again to admit 1 waiting node")


def test_without_recorded_times_nothing_is_predicted_with_a_time() -> None:
    state = replace(joinable(2), extra={})  # as torch's nodes write it
    outlooks = forecast(reading(state, [node(0), node(1)], T0 + 10, timing=None))
    assert [o.at for o in outlooks] == [None]
    assert forecast(reading(final(2), [], T0, timing=None)) == ()
    closed = protocol.close(final(2), now=T0)
    assert forecast(reading(closed, [], T0)) == ()
    assert Status.CLOSED is closed.status


def test_under_a_rank_policy_a_joinable_version_names_places_not_ranks() -> None:
    # Nobody has a rank until the freeze decides them: "rank 1" would name the wrong node.
    opened = protocol.open_version(1, now=T0, nodes=(2, 4), timing=TIMING, rank_policy="stable")
    state = replace(opened, participants=(0, 1, 2))
    ranks = [node(0, joined_at=T0), node(1, joined_at=T0 + 1), node(2, joined_at=T0 + 3)]
    (outlook,) = forecast(reading(state, ranks, T0 + 1 + 30 + 5))
    assert outlook.what.startswith("place 2 (vm-c, pid 1002) tears the version down")
    assert "place 1 (vm-b, pid 1001) held the last call" in outlook.what
    assert outlook.unless == "place 1 freezes it first"
    alone = replace(opened, participants=(0,))
    (outlook,) = forecast(reading(alone, ranks[:1], T0 + 5, nodes=(3, 3)))
    assert outlook.what.startswith("place 0 (vm-a, pid 1000) times out")
