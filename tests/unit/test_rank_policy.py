"""Rank policies, decided without I/O: each policy's assignment, the memory they read, and
the errors a platform's bad ranks get."""

from __future__ import annotations

import random

import pytest

from etcd_rdzv import decisions, protocol
from etcd_rdzv.config import RendezvousConfig, parse_endpoints
from etcd_rdzv.errors import ConfigurationError
from etcd_rdzv.protocol import Status
from etcd_rdzv.rank_policy import (
    Assignment,
    Candidate,
    Conflict,
    RankMemory,
    RankPolicy,
    assign,
    decode,
    default_node_id,
    env_rank,
)

STABLE = RankPolicy("stable")


def nodes(*ids: str) -> list[Candidate]:
    return [Candidate(node, name=node) for node in ids]


def ranks_by_id(policy: RankPolicy, ids: list[str], memory: RankMemory) -> dict[str, int]:
    decided = assign(policy, nodes(*ids), memory)
    assert isinstance(decided, Assignment)
    return dict(zip(ids, decided.ranks, strict=True))


def memory_of(version: int, *ids: str) -> RankMemory:
    return RankMemory().after(version, list(ids))


# --- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, RankPolicy()),
        ("", RankPolicy()),
        ("join_order", RankPolicy()),
        ("stable", RankPolicy("stable")),
        ("host_order", RankPolicy("host_order")),
        ("from_env=GROUP_RANK", RankPolicy("from_env", "GROUP_RANK")),
        ("from_env:SLURM_NODEID", RankPolicy("from_env", "SLURM_NODEID")),
    ],
)
def test_policies_parse(text: str | None, expected: RankPolicy) -> None:
    assert RankPolicy.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stabel", "use join_order"),
        ("stable=1", "use join_order"),
        ("from_env", "needs the variable"),
        ("from_env=", "needs the variable"),
    ],
)
def test_unknown_policies_get_a_clear_error(text: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RankPolicy.parse(text)


def test_rank0_node_goes_with_any_policy_but_from_env() -> None:
    assert RankPolicy.parse("stable", "pod-0").spec == "stable;rank0_node=pod-0"
    assert RankPolicy.parse(None, "pod-0").decided_at_freeze
    assert not RankPolicy.parse(None).decided_at_freeze
    with pytest.raises(ConfigurationError, match="cannot be combined"):
        RankPolicy.parse("from_env=GROUP_RANK", "pod-0")


def test_a_node_id_survives_an_agent_restart_and_tells_gpu_groups_apart() -> None:
    assert default_node_id("vm-a", None, {}) == "vm-a"
    assert default_node_id("vm-a", "10.0.0.1", {}) == "vm-a/10.0.0.1"
    gpus = {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert default_node_id("vm-a", None, gpus) == "vm-a/gpus=4,5,6,7"


@pytest.mark.parametrize(("value", "message"), [(None, "not set"), ("x", "not a rank"), ("-1", "")])
def test_a_bad_rank_in_the_environment_fails_at_start(value: str | None, message: str) -> None:
    environ = {} if value is None else {"GROUP_RANK": value}
    with pytest.raises(ConfigurationError, match=f"GROUP_RANK.*{message}"):
        env_rank(RankPolicy("from_env", "GROUP_RANK"), environ)
    assert env_rank(RankPolicy("from_env", "GROUP_RANK"), {"GROUP_RANK": " 3 "}) == 3


def config(**overrides: object) -> RendezvousConfig:
    return RendezvousConfig("run", parse_endpoints("localhost:2379"), 2, 3, **overrides)  # type: ignore[arg-type]


def test_over_v2_only_join_order_is_possible() -> None:
    with pytest.raises(ConfigurationError, match="rank_policy=stable needs etcd_api=v3"):
        config(etcd_api="v2", rank_policy=STABLE)
    with pytest.raises(ConfigurationError, match="rank0_node=a needs etcd_api=v3"):
        config(etcd_api="v2", rank_policy=RankPolicy(rank0_node="a"))
    assert config(etcd_api="v2").rank_policy == RankPolicy()


# --- stable -----------------------------------------------------------------------------------


def test_stable_gives_every_node_its_rank_whatever_the_join_order() -> None:
    memory = memory_of(4, "a", "b", "c", "d")
    for _ in range(20):
        ids = random.Random(_).sample(["a", "b", "c", "d"], 4)
        assert ranks_by_id(STABLE, ids, memory) == {"a": 0, "b": 1, "c": 2, "d": 3}


def test_stable_fills_ranks_freed_by_nodes_that_left_lowest_first() -> None:
    memory = memory_of(4, "a", "b", "c", "d")  # b (1) and c (2) are replaced
    got = ranks_by_id(STABLE, ["y", "d", "x", "a"], memory)
    assert got == {"a": 0, "d": 3, "y": 1, "x": 2}


def test_stable_growing_keeps_everyone_and_numbers_newcomers_on() -> None:
    got = ranks_by_id(STABLE, ["new", "c", "b", "a"], memory_of(2, "a", "b", "c"))
    assert got == {"a": 0, "b": 1, "c": 2, "new": 3}


def test_stable_shrinking_moves_only_the_nodes_above_the_new_world() -> None:
    # Five nodes; ranks 1 and 2 left: 3 and 4 must move below 3, into 1 and 2, in their order.
    got = ranks_by_id(STABLE, ["e", "a", "d"], memory_of(7, "a", "b", "c", "d", "e"))
    assert got == {"a": 0, "d": 1, "e": 2}
    # The minimum: nodes already below the new size never move.
    got = ranks_by_id(STABLE, ["e", "c", "a"], memory_of(7, "a", "b", "c", "d", "e"))
    assert got == {"a": 0, "c": 2, "e": 1}


def test_a_node_returning_after_missing_a_version_gets_its_rank_back_if_free() -> None:
    memory = memory_of(1, "a", "b", "c").after(2, ["a", "c"])  # b missed version 2
    assert memory.earlier == {"b": (1, 1)}
    # c took rank 1 when the world shrank (version 2) and keeps it: b's old rank is taken.
    assert ranks_by_id(STABLE, ["b", "a", "c"], memory) == {"a": 0, "c": 1, "b": 2}
    # Where its old rank is free, it gets it back.
    memory = memory_of(1, "a", "b", "c", "d").after(2, ["a", "d", "c"])  # d moved to 1
    assert ranks_by_id(STABLE, ["b", "a", "c", "d"], memory)["b"] == 3
    memory = memory_of(1, "a", "b", "c", "d").after(2, ["a", None, "c", "d"])
    assert ranks_by_id(STABLE, ["d", "b", "a", "c"], memory) == {"a": 0, "b": 1, "c": 2, "d": 3}


def test_a_node_id_claimed_twice_counts_once() -> None:
    decided = assign(STABLE, nodes("b", "a", "a"), memory_of(1, "a", "b", "c"))
    assert isinstance(decided, Assignment)
    assert decided.ranks == (1, 0, 2)  # the second "a" is a newcomer: no rank twice
    assert decided.previous == (0, 1, None)


def test_previous_ranks_are_told_by_rank() -> None:
    decided = assign(STABLE, nodes("new", "b"), memory_of(5, "a", "b"))
    assert isinstance(decided, Assignment)
    assert decided.ranks == (0, 1)
    assert decided.previous == (None, 1)
    assert decided.previous_version == 5


@pytest.mark.parametrize("seed", range(300))
def test_stable_hands_out_0_to_n_minus_1_and_moves_nobody_it_need_not(seed: int) -> None:
    rng = random.Random(seed)
    pool = [f"n{i}" for i in range(12)]
    before = rng.sample(pool, rng.randint(1, 10))
    memory = RankMemory().after(1, before)
    ids = rng.sample(pool, rng.randint(1, 12))
    got = ranks_by_id(STABLE, ids, memory)
    assert sorted(got.values()) == list(range(len(ids)))
    for node in ids:
        if node in before and before.index(node) < len(ids):
            assert got[node] == before.index(node)
    movers = [n for n in ids if n in before and before.index(n) >= len(ids)]
    # The ones that had to move, in their old order, took the lowest ranks the others left.
    left = sorted(
        set(range(len(ids))) - {before.index(n) for n in ids if n not in movers and n in before}
    )
    assert [got[n] for n in sorted(movers, key=before.index)] == left[: len(movers)]


# --- host_order, rank0_node, join order ---------------------------------------------------------


def test_host_order_sorts_by_node_id() -> None:
    assert ranks_by_id(RankPolicy("host_order"), ["vm-c", "vm-a", "vm-b"], RankMemory()) == {
        "vm-a": 0,
        "vm-b": 1,
        "vm-c": 2,
    }


def test_rank0_node_is_rank_0_whenever_present_and_moves_one_other_node() -> None:
    policy = RankPolicy("stable", rank0_node="store")
    got = ranks_by_id(policy, ["a", "b", "store"], memory_of(1, "a", "b"))
    assert got == {"store": 0, "b": 1, "a": 2}
    assert ranks_by_id(policy, ["a", "b"], memory_of(1, "a", "b")) == {"a": 0, "b": 1}
    got = ranks_by_id(RankPolicy(rank0_node="c"), ["a", "b", "c"], RankMemory())
    assert got == {"c": 0, "b": 1, "a": 2}


# --- from_env -----------------------------------------------------------------------------------


def env_nodes(*ranks: int | None) -> list[Candidate]:
    return [Candidate(f"pod-{i}", rank, f"pod-{i} (vm-{i})") for i, rank in enumerate(ranks)]


FROM_ENV = RankPolicy("from_env", "GROUP_RANK")


def test_from_env_takes_the_platforms_ranks() -> None:
    decided = assign(FROM_ENV, env_nodes(2, 0, 1), RankMemory())
    assert isinstance(decided, Assignment) and decided.ranks == (2, 0, 1)


@pytest.mark.parametrize(
    ("ranks", "named"),
    [
        (
            (0, 1, 1),
            ["GROUP_RANK=1 on 2 nodes: pod-1 (vm-1), pod-2 (vm-2)", "nobody has GROUP_RANK=2"],
        ),
        (
            (0, 1, 3),
            [
                "GROUP_RANK=3 on pod-2 (vm-2) is not below the world size 3",
                "nobody has GROUP_RANK=2",
            ],
        ),
        ((0, None), ["pod-1 (vm-1) gave no GROUP_RANK"]),
    ],
)
def test_from_env_names_the_nodes_of_duplicates_gaps_and_ranks_out_of_range(
    ranks: tuple[int | None, ...], named: list[str]
) -> None:
    decided = assign(FROM_ENV, env_nodes(*ranks), RankMemory())
    assert isinstance(decided, Conflict)
    for part in named:
        assert part in decided.message
    assert decided.message.startswith("rank_policy=from_env=GROUP_RANK cannot rank these")


# --- the memory and the document ---------------------------------------------------------------


def test_the_memory_round_trips_and_never_goes_back_a_version() -> None:
    memory = memory_of(3, "a", "b").after(4, ["b", "c"])
    assert RankMemory.decode(memory.encode()) == memory
    assert memory.ranks == {"b": 0, "c": 1} and memory.earlier == {"a": (0, 3)}
    assert memory.after(4, ["x"]) is memory and memory.after(2, ["x"]) is memory


def test_an_unreadable_memory_reads_as_empty() -> None:
    for raw in (None, "", "[]", "{", '{"ranks": {"a": "x"}, "version": true}'):
        assert RankMemory.decode(raw).ranks == {}


def test_the_memory_keeps_a_bounded_number_of_earlier_nodes() -> None:
    memory = RankMemory()
    for version in range(1, 400):
        memory = memory.after(version, [f"node-{version}"])
    assert len(memory.earlier) == 256
    assert memory.earlier["node-398"] == (0, 398)


def test_a_frozen_document_carries_the_ranks_and_every_node_reads_its_own() -> None:
    joinable = protocol.open_version(3, rank_policy="stable")
    assert decisions.may_claim(joinable, 3, (1, 3), STABLE) == decisions.DONE
    decided = assign(STABLE, nodes("b", "a"), memory_of(2, "a", "b"))
    frozen = decisions.freeze_claims(joinable, 3, 2, 0.0, decided)
    assert isinstance(frozen, decisions.Write)
    raw = frozen.state.encode(counted=True)
    state = protocol.RendezvousState.decode(raw, "k")
    assert state.status is Status.FROZEN and protocol.decided_ranks(state) == decided
    assert [decisions.rank_in_frozen(place, state) for place in (0, 1)] == [1, 0]
    assert decode({"by_claim": [0, 0]}, 2) is None  # not a permutation: join order
    assert decode({"by_claim": [0, "x"]}, 2) is None
    assert decode({"by_claim": [0, 1]}, 3) is None  # not the document's participants


@pytest.mark.parametrize("seed", range(200))
def test_the_documents_field_says_it_all_in_few_bytes(seed: int) -> None:
    rng = random.Random(seed)
    pool = [f"n{i}" for i in range(10)]
    memory = RankMemory() if rng.random() < 0.3 else RankMemory().after(4, rng.sample(pool, 6))
    decided = assign(STABLE, nodes(*rng.sample(pool, rng.randint(1, 10))), memory)
    assert isinstance(decided, Assignment)
    fields = decided.fields()
    assert decode(fields, len(decided.ranks)) == decided
    # Only what differs from join order and from "kept its rank" is written.
    if decided.ranks == tuple(range(len(decided.ranks))):
        assert "by_claim" not in fields
    if decided.previous_version is None:
        assert "moved" not in fields and set(decided.previous) == {None}
    else:
        moved = fields["moved"]
        assert isinstance(moved, dict)
        assert len(moved) == sum(1 for r, p in enumerate(decided.previous) if p != r)


def test_a_fresh_run_under_stable_writes_almost_nothing() -> None:
    decided = assign(STABLE, nodes(*(f"n{i}" for i in range(64))), RankMemory())
    assert isinstance(decided, Assignment)
    assert decided.fields() == {"policy": "stable"}
    kept = assign(
        STABLE, nodes(*(f"n{i}" for i in range(64))), memory_of(3, *(f"n{i}" for i in range(64)))
    )
    assert isinstance(kept, Assignment)
    assert kept.fields() == {"policy": "stable", "previous_version": 3, "moved": {}}


def test_a_conflict_fails_every_node_of_the_version_with_its_message() -> None:
    joinable = protocol.open_version(3, rank_policy=FROM_ENV.spec)
    conflict = assign(FROM_ENV, env_nodes(0, 0), RankMemory())
    frozen = decisions.freeze_claims(joinable, 3, 2, 0.0, conflict)
    assert isinstance(frozen, decisions.Write)
    for place in (0, 1):
        misfit = decisions.rank_in_frozen(place, frozen.state)
        assert isinstance(misfit, decisions.Misfit)
        assert "GROUP_RANK=0 on 2 nodes: pod-0 (vm-0), pod-1 (vm-1)" in misfit.message


def test_every_node_of_a_run_needs_the_same_policy() -> None:
    joinable = protocol.open_version(3, rank_policy="stable")
    misfit = decisions.may_claim(joinable, 3, (1, 3), RankPolicy())
    assert isinstance(misfit, decisions.Misfit)
    assert "opened with rank_policy=stable and this node has rank_policy=join_order" in (
        misfit.message
    )
    opened_by_default = protocol.open_version(3)
    assert isinstance(
        decisions.may_claim(opened_by_default, 3, (1, 3), RankPolicy("host_order")),
        decisions.Misfit,
    )
    assert decisions.may_claim(opened_by_default, 3, (1, 3)) == decisions.DONE


def test_a_rank_from_the_environment_past_max_nodes_fails_its_node_before_it_claims() -> None:
    joinable = protocol.open_version(3, nodes=(2, 3), rank_policy=FROM_ENV.spec)
    misfit = decisions.may_claim(joinable, 3, (2, 3), FROM_ENV, env_rank=3)
    assert isinstance(misfit, decisions.Misfit)
    assert misfit.message.startswith(
        "this node's rank from GROUP_RANK, 3, is not below max_nodes 3"
    )
    assert decisions.may_claim(joinable, 3, (2, 3), FROM_ENV, env_rank=2) == decisions.DONE
