"""The protocol's decisions, as pure functions of what a node read: no etcd, no clock."""

from __future__ import annotations

from dataclasses import replace

import pytest

from etcd_rdzv import decisions, protocol
from etcd_rdzv.decisions import (
    DONE,
    WAIT,
    LastCallClock,
    Misfit,
    Refresh,
    Route,
    StartOver,
    Wait,
    Write,
)
from etcd_rdzv.protocol import Lifetime, RendezvousState, Status

V = 7


def joinable(participants: int = 0, nodes: tuple[int, int] = (2, 4)) -> RendezvousState:
    opened = protocol.open_version(V, now=0.0, trace_context=None, nodes=nodes)
    return replace(opened, participants=tuple(range(participants)))


def frozen(size: int = 3, confirmed: tuple[str, ...] = ()) -> RendezvousState:
    return replace(protocol.freeze(joinable(size)), keep_alives=confirmed)


def key(rank: int) -> str:
    return f"/run/rdzv/v_{V}/rank_{rank}"


@pytest.mark.parametrize(
    ("state", "route"),
    [
        (protocol.setup(), Route.AWAIT_TRANSITION),
        (frozen(), Route.AWAIT_TRANSITION),
        (protocol.close(None), Route.CLOSED),
        (protocol.complete(frozen(2), [key(0), key(1)]), Route.AWAIT_NEXT_VERSION),
        (joinable(), Route.TAKE_PART),
    ],
)
def test_setup_routes_a_node_by_the_state_it_found(state: RendezvousState, route: Route) -> None:
    assert decisions.route(state) is route


def test_the_first_version_is_one_and_each_next_one_more() -> None:
    assert decisions.next_version(None) == 1
    assert decisions.next_version(41) == 42


def test_a_wait_ends_when_done_and_starts_over_when_the_state_moved_elsewhere() -> None:
    assert decisions.await_state(frozen(), V, Status.FROZEN, Status.JOINABLE) is DONE
    assert decisions.await_state(joinable(2), V, Status.FROZEN, Status.JOINABLE) is WAIT
    moved = decisions.await_state(joinable(2), V + 1, Status.FROZEN, Status.JOINABLE)
    assert moved == StartOver(
        "state_moved_on", f"state became version {V} joinable with 2 participants"
    )


def test_a_join_takes_the_next_rank_and_the_one_reaching_max_freezes() -> None:
    joined = decisions.join_by_swap(joinable(1), V, (2, 3), now=1.0)
    assert isinstance(joined, protocol.Joined)
    assert (joined.rank, joined.holds_last_call, joined.lifetime) == (1, True, Lifetime.JOINABLE)
    filled = decisions.join_by_swap(joinable(2), V, (2, 3), now=1.0)
    assert isinstance(filled, protocol.Joined) and filled.state.status is Status.FROZEN


def test_a_join_starts_over_on_a_version_no_longer_joinable_and_refuses_a_full_one() -> None:
    assert isinstance(decisions.join_by_swap(frozen(), V, (2, 3), 1.0), StartOver)
    refused = decisions.join_by_swap(joinable(3), V, (2, 3), 1.0)
    assert isinstance(refused, Misfit) and "max_nodes 3" in refused.message


def test_the_last_call_waits_refreshes_then_freezes() -> None:
    state = joinable(2)
    early = LastCallClock(now=1.0, window_ends=30.0, refresh_due=3.3)
    assert decisions.hold_last_call_by_swap(state, V, early, 1.0, False) == Wait(3.3)
    due = LastCallClock(now=3.4, window_ends=30.0, refresh_due=3.3)
    assert decisions.hold_last_call_by_swap(state, V, due, 3.4, False) == Refresh(Lifetime.JOINABLE)
    over = LastCallClock(now=30.0, window_ends=30.0, refresh_due=33.0)
    freeze = decisions.hold_last_call_by_swap(state, V, over, 30.0, False)
    assert isinstance(freeze, Write) and freeze.state.status is Status.FROZEN
    assert freeze.lifetime is Lifetime.FROZEN


def test_the_last_call_ends_if_the_version_froze_moved_on_or_the_deadline_passed() -> None:
    times = LastCallClock(now=1.0, window_ends=30.0, refresh_due=3.3)
    assert decisions.hold_last_call_by_swap(frozen(), V, times, 1.0, False) is DONE
    gone = decisions.hold_last_call_by_swap(protocol.setup(), V, times, 1.0, False)
    assert isinstance(gone, StartOver) and gone.reason == "state_moved_on"
    late = decisions.hold_last_call_by_swap(joinable(2), V, times, 1.0, True)
    assert isinstance(late, StartOver) and late.reason == "deadline"


def test_a_confirmation_adds_its_key_once_and_the_last_one_makes_the_version_final() -> None:
    first = decisions.confirm_by_swap(frozen(2), V, key(0), 1.0)
    assert isinstance(first, Write) and first.state.keep_alives == (key(0),)
    # Our write applied though its answer was lost: nothing more to do.
    assert decisions.confirm_by_swap(first.state, V, key(0), 1.0) is DONE
    last = decisions.confirm_by_swap(first.state, V, key(1), 1.0)
    assert isinstance(last, Write) and last.state.status is Status.FINAL
    assert last.lifetime is Lifetime.PERMANENT
    assert isinstance(decisions.confirm_by_swap(joinable(2), V, key(0), 1.0), StartOver)


def test_a_claim_needs_a_joinable_version_opened_for_this_size() -> None:
    assert decisions.may_claim(joinable(nodes=(2, 4)), V, (2, 4)) is DONE
    assert isinstance(decisions.may_claim(frozen(), V, (2, 4)), StartOver)
    misfit = decisions.may_claim(joinable(nodes=(2, 4)), V, (3, 3))
    assert isinstance(misfit, Misfit) and "--nnodes 2:4" in misfit.message


def test_under_claims_the_holder_freezes_with_the_claims_it_counted_up_to_max() -> None:
    assert decisions.last_call_counted(3, 4) == 3
    assert decisions.last_call_counted(6, 4) == 4
    freeze = decisions.freeze_claims(joinable(), V, 3, 1.0)
    assert isinstance(freeze, Write) and freeze.state.participants == (0, 1, 2)
    assert decisions.freeze_claims(frozen(), V, 3, 1.0) is DONE


def test_only_nodes_after_the_holder_back_it_up() -> None:
    assert decisions.abandoned_after(rank=0, min_nodes=2, last_call=30, joinable_ttl=10) is None
    assert decisions.abandoned_after(rank=2, min_nodes=2, last_call=30, joinable_ttl=10) == 40


def test_a_claim_after_the_count_is_not_in_the_frozen_version() -> None:
    assert decisions.in_frozen_version(2, frozen(3)) is DONE
    late = decisions.in_frozen_version(3, frozen(3))
    assert isinstance(late, StartOver) and late.reason == "version_full"


def test_the_confirmation_claim_that_completes_the_set_writes_final() -> None:
    keys = [key(r) for r in range(3)]
    assert decisions.complete_claims(frozen(3), V, 2, keys, 1.0) is DONE
    final = decisions.complete_claims(frozen(3), V, 3, keys, 1.0)
    assert isinstance(final, Write) and final.state.keep_alives == tuple(keys)
    assert isinstance(decisions.complete_claims(joinable(3), V, 3, keys, 1.0), StartOver)


def test_waiting_is_announced_on_the_final_version_only_and_closing_once() -> None:
    final = protocol.complete(frozen(2), [key(0), key(1)])
    announced = decisions.announce_waiting(final, V)
    assert isinstance(announced, Write) and announced.state.num_workers_waiting == 1
    assert decisions.announce_waiting(joinable(), V) is DONE
    closed = decisions.close(final, 1.0)
    assert isinstance(closed, Write) and closed.state.status is Status.CLOSED
    assert decisions.close(closed.state, 2.0) is DONE
    assert isinstance(decisions.close(None, 1.0), Write)
