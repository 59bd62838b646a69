"""check_membership: the invariant every rendezvous test relies on must reject bad results."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.harness import check_membership


def result(rank: int, world_size: int, version: int | None = 1, **extra: Any) -> dict[str, Any]:
    return {
        "event": "rendezvous",
        "rank": rank,
        "world_size": world_size,
        "version": version,
        "master_addr": "127.0.0.1",
        "master_port": 29500,
        "participant": f"p{rank}",
        **extra,
    }


def test_accepts_consistent_memberships_of_several_versions() -> None:
    check_membership([result(1, 2), result(0, 2), result(0, 1, version=2)])


def test_accepts_results_without_a_version_as_one_group() -> None:
    check_membership([result(0, 2, version=None), result(1, 2, version=None)])


def test_rejects_duplicate_ranks() -> None:
    with pytest.raises(AssertionError, match=r"version 1 .*duplicate ranks \[0\]"):
        check_membership([result(0, 2), result(0, 2)])


def test_rejects_a_gap_in_ranks() -> None:
    with pytest.raises(AssertionError, match=r"ranks \[0, 2\] are not exactly 0..1"):
        check_membership([result(0, 2), result(2, 2)])


def test_rejects_mismatched_world_sizes() -> None:
    with pytest.raises(AssertionError, match="disagree on world size"):
        check_membership([result(0, 2), result(1, 3)])


def test_rejects_a_world_size_other_than_the_member_count() -> None:
    with pytest.raises(AssertionError, match="world size 3 but 2 participants"):
        check_membership([result(0, 3), result(1, 3)])


def test_rejects_disagreeing_masters() -> None:
    with pytest.raises(AssertionError, match="disagree on master"):
        check_membership([result(0, 2), result(1, 2, master_port=29501)])


def test_rejects_results_without_a_version() -> None:
    incomplete = result(0, 1)
    del incomplete["version"]
    with pytest.raises(AssertionError, match=r"lacks \['version'\]"):
        check_membership([incomplete])


def test_rejects_no_results() -> None:
    with pytest.raises(AssertionError, match="no rendezvous results"):
        check_membership([])


# --- whole scenarios: dead members and stale ones --------------------------------------------


def held(rank: int, version: int, point: str, participant: str) -> dict[str, Any]:
    return {"event": "held", "point": point, "version": version, "rank": rank,
            "participant": participant}  # fmt: skip


def waiting(value: int, member_of: int, sent_at: float, participant: str) -> dict[str, Any]:
    return {"event": "num_nodes_waiting", "value": value, "member_of": member_of,
            "sent_at": sent_at, "participant": participant}  # fmt: skip


def at(record: dict[str, Any], received_at: float, participant: str) -> dict[str, Any]:
    return {**record, "received_at": received_at, "participant": participant}


def test_accepts_a_scenario_where_a_confirmed_member_died_and_the_rest_moved_on() -> None:
    check_membership(
        [
            at(result(0, 3), 1.0, "a"),
            at(result(1, 3), 1.0, "b"),
            held(2, 1, "confirm", "dead"),
            at(result(0, 2, version=2), 5.0, "a"),
            at(result(1, 2, version=2), 5.0, "b"),
            waiting(2, member_of=1, sent_at=6.0, participant="stale"),
            waiting(0, member_of=2, sent_at=6.0, participant="a"),
        ]
    )


def test_accepts_a_member_held_before_confirming_a_version_that_never_completed() -> None:
    check_membership([held(2, 1, "frozen", "dead"), result(0, 2, version=2),
                      result(1, 2, version=2)])  # fmt: skip


# Property 1: one membership per version.
def test_rejects_a_version_completed_without_a_member_that_never_confirmed() -> None:
    with pytest.raises(AssertionError, match=r"version 1 completed although dead was held at "):
        check_membership([result(0, 2), result(1, 2), held(1, 1, "frozen", "dead")])


def test_rejects_a_dead_confirmed_member_missing_from_the_world_size() -> None:
    with pytest.raises(AssertionError, match="world size 2 but 3 participants"):
        check_membership([result(0, 2), result(1, 2), held(2, 1, "final", "dead")])


# Property 2: ranks exactly 0..n-1.
def test_rejects_a_dead_member_holding_a_rank_a_survivor_reported() -> None:
    with pytest.raises(AssertionError, match=r"duplicate ranks \[1\]"):
        check_membership([result(0, 3), result(1, 3), held(1, 1, "confirm", "dead")])


# Property 3: no participant of an older version still acts.
def test_rejects_a_participant_going_back_to_an_older_version() -> None:
    with pytest.raises(AssertionError, match=r"a got versions \[2, 1\] in this order"):
        check_membership(
            [
                at(result(0, 1, version=2), 1.0, "a"),
                at(result(0, 1, version=1), 2.0, "a"),
            ]
        )


def test_rejects_a_participant_getting_one_version_twice() -> None:
    with pytest.raises(AssertionError, match=r"a got versions \[1, 1\]"):
        check_membership([at(result(0, 2), 1.0, "a"), at(result(1, 2), 2.0, "a")])


def test_rejects_a_stale_member_carrying_on_after_a_newer_version_completed() -> None:
    with pytest.raises(AssertionError, match=r"stale, a member of version 1, read num_nodes_wait"):
        check_membership(
            [
                at(result(0, 2), 1.0, "a"),
                at(result(1, 2), 1.0, "stale"),
                at(result(0, 1, version=2), 3.0, "a"),
                waiting(0, member_of=1, sent_at=4.0, participant="stale"),
            ]
        )


def test_a_stale_member_may_carry_on_before_the_newer_version_completed() -> None:
    check_membership(
        [
            at(result(0, 2), 1.0, "a"),
            at(result(1, 2), 1.0, "b"),
            waiting(0, member_of=1, sent_at=2.0, participant="b"),
            at(result(0, 1, version=2), 3.0, "a"),
        ]
    )
