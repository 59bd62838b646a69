"""The deterministic simulator in `make test`: a fixed corpus of seeded schedules.

Each schedule is a whole run (the real `EtcdRendezvous` on every node, an in-memory etcd on a
virtual clock, faults from the seed) checked after every step; see `scenario.py` for the
invariants. A failure prints its scenario, its last steps and `make simulate SEEDS=<seed>`,
which replays it exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest

from etcd_rdzv import protocol, rank_policy
from tests.simulation.scenario import Outcome, Run, Scenario, run

CHUNK = 200
CORPUS = range(0, 2000)  # the seeds every `make test` runs
# Seeds kept for what they once showed (see each reason).
REGRESSIONS = {
    # 32 nodes in torch's layout with a 0.5 s last call: each version froze without the two
    # slowest, which then waited, and the members restarted for them, version after version.
    # A final version of live nodes formed every time: liveness holds, the checker said not.
    1819: "churn of a too-short last call is not a liveness failure",
    # Nodes that start as the last call ends: claims race the holder's count and freeze.
    22: "a claim after the count waits for the next version",
    648: "a claim after the count waits for the next version",
}


def failures(seeds: Iterator[int] | range, **kwargs: Any) -> list[str]:
    return [
        outcome.report() for outcome in map(lambda s: run(s, **kwargs), seeds) if not outcome.ok
    ]


@pytest.mark.parametrize("first", range(CORPUS.start, CORPUS.stop, CHUNK))
def test_a_corpus_of_schedules_keeps_every_invariant(first: int) -> None:
    found = failures(range(first, first + CHUNK))
    assert not found, "\n\n".join(found)


@pytest.mark.parametrize("seed", sorted(REGRESSIONS))
def test_the_seeds_kept_for_what_they_showed(seed: int) -> None:
    outcome = run(seed)
    assert outcome.ok, outcome.report()


@pytest.mark.parametrize(("nodes", "seed"), [(1000, 2), (1000, 7), (256, 1)])
def test_large_runs_keep_every_invariant(nodes: int, seed: int) -> None:
    outcome = run(seed, nodes=nodes)
    assert outcome.scenario.nodes == nodes
    assert outcome.ok, outcome.report()
    # Liveness was checked, not skipped: a final version formed.
    assert outcome.final_at is not None


def test_a_large_run_in_torchs_layout_is_simulated() -> None:
    assert Scenario.from_seed(1, nodes=256).layout == "torch"


def test_a_seed_replays_the_same_schedule() -> None:
    first, second = Run(Scenario.from_seed(648)), Run(Scenario.from_seed(648))
    for each in (first, second):
        each.sim._trace_limit = 10**7
    one, two = first.execute(), second.execute()
    assert (one.steps, one.trace) == (two.steps, two.trace)


def test_schedules_draw_faults_of_every_kind() -> None:
    scenarios = [Scenario.from_seed(seed) for seed in range(200)]
    for kind in ("pauses", "outages", "lost_answers", "lease_expiries", "worker_failures"):
        assert any(getattr(s, kind) for s in scenarios), kind
    assert any(s.crash_rate for s in scenarios) and any(s.mismatch for s in scenarios)
    assert any(s.stragglers for s in scenarios) and any(s.late_joiners for s in scenarios)
    assert {s.layout for s in scenarios} == {"claims", "torch"}
    assert any(s.min_nodes < s.max_nodes for s in scenarios)


# The simulator finds bugs: with one planted, the same seeds fail.


def test_it_catches_a_version_never_torn_down(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(protocol, "missing_keep_alives", lambda state, live: [])
    outcome: Outcome = run(2)
    assert any(v.startswith("liveness") for v in outcome.violations), outcome.report()


def test_it_catches_ranks_handed_out_one_off(monkeypatch: pytest.MonkeyPatch) -> None:
    claimed_rank = protocol.claimed_rank

    def one_off(position: int, min_nodes: int, max_nodes: int) -> protocol.ClaimedRank:
        return dataclasses.replace(claimed_rank(position, min_nodes, max_nodes), rank=position)

    monkeypatch.setattr(protocol, "claimed_rank", one_off)
    assert not run(4).ok


# Rank policies (claims layout): the same schedules with a policy other than join order drawn
# for each, its promise checked at every membership (`Run._check_rank_policy`).

POLICY_CORPUS = range(0, 1000)


@pytest.mark.parametrize("first", range(POLICY_CORPUS.start, POLICY_CORPUS.stop, CHUNK))
def test_rank_policies_keep_their_promise_across_deaths_returns_and_joins(first: int) -> None:
    outcomes = [run(seed, rank_policies=True) for seed in range(first, first + CHUNK)]
    found = [outcome.report() for outcome in outcomes if not outcome.ok]
    assert not found, "\n\n".join(found)
    # Not vacuous: nodes came back to a version after the one they were in, and the stable
    # policy had ranks to keep.
    assert sum(outcome.policy_checks for outcome in outcomes) > 100
    assert sum(outcome.kept_by_stable for outcome in outcomes) > 50


def test_schedules_draw_every_rank_policy() -> None:
    drawn = {Scenario.from_seed(seed, rank_policies=True).rank_policy for seed in range(100)}
    assert {policy.kind for policy in drawn} == {"join_order", "stable", "host_order"}
    assert any(policy.rank0_node for policy in drawn)
    # Without rank policies asked for, every schedule is the seed's as before.
    assert all(not Scenario.from_seed(seed).rank_policy.decided_at_freeze for seed in range(100))


def test_it_catches_a_stable_policy_that_forgets(monkeypatch: pytest.MonkeyPatch) -> None:
    def join_order(candidates: object, first: object, memory: object) -> list[int]:
        return list(range(len(candidates)))  # type: ignore[arg-type]

    monkeypatch.setattr(rank_policy, "_stable", join_order)
    outcomes = [run(seed, rank_policies=True) for seed in range(0, 100)]
    assert any("and got" in v for o in outcomes for v in o.violations)


def test_it_catches_a_previous_rank_that_is_false(monkeypatch: pytest.MonkeyPatch) -> None:
    assign = rank_policy.assign

    def shifted(*args: Any) -> rank_policy.Assignment | rank_policy.Conflict:
        decided = assign(*args)
        if isinstance(decided, rank_policy.Conflict):
            return decided
        previous = tuple(None if p is None else p + 1 for p in decided.previous)
        return dataclasses.replace(decided, previous=previous)

    monkeypatch.setattr(rank_policy, "assign", shifted)
    outcomes = [run(seed, rank_policies=True) for seed in range(0, 100)]
    assert any("told previous rank" in v for o in outcomes for v in o.violations)
