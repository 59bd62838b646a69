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
