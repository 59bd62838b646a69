"""A node killed at each protocol point, in both key layouts, under many interleavings.

The simulator's counterpart of tests/integration/test_agent_faults.py: there, real processes
are SIGKILLed once per point over a real etcd; here the first node to reach the point is
killed, across seeds that interleave the three nodes differently, and the survivors must form
a final version without it within the bound its point implies (virtual seconds).
"""

from __future__ import annotations

import dataclasses

import pytest

from etcd_rdzv.config import ProtocolTtls
from tests.simulation.scenario import DIE_AT, MONITOR_INTERVAL, Run, Scenario

SEEDS = range(25)
# A v3 lease lives a second past its TTL, rounded up to whole seconds.
LEASE_SLACK = 2.0
MARGIN = 1.0


def quiet(seed: int, layout: str, die_at: str) -> Scenario:
    """Three nodes, min 2, starting together, no fault but the kill; the TTLs and last call
    of the integration tests (keep-alive 2 s, last call 1 s)."""
    return dataclasses.replace(
        Scenario.from_seed(seed, nodes=3),
        ttls=ProtocolTtls.from_keep_alive(2.0), last_call=1.0,
        layout=layout, min_nodes=2, max_nodes=3, start_spread=0.0, late_joiners=0,
        stragglers=0, faults_until=0.0, crash_rate=0.0, pauses=0, outages=0, lost_answers=0,
        lease_expiries=0, worker_failures=0, mismatch=False, die_at=die_at,
    )  # fmt: skip


def recovery_bound(scenario: Scenario) -> float:
    """What ends the survivors' wait at each point (see test_agent_faults' docstring)."""
    ttls, last_call = scenario.ttls, scenario.last_call
    held_by = {
        "setup": ttls.setup,  # the placeholder's TTL
        "join": ttls.frozen,  # the version freezes with the dead rank: the frozen TTL
        # torch's: the joinable TTL; claims: a node after the holder, a TTL after the window
        "last_call": ttls.joinable + last_call,
        "frozen": ttls.frozen,
        # it confirmed: the version completes, the members' workers fail and they restart
        "confirm": ttls.keep_alive + MONITOR_INTERVAL,
        "final": ttls.keep_alive + MONITOR_INTERVAL,
    }[scenario.die_at or ""]
    return held_by + LEASE_SLACK + last_call + MARGIN


@pytest.mark.parametrize("layout", ["claims", "torch"])
@pytest.mark.parametrize("die_at", sorted(DIE_AT))
def test_survivors_form_a_version_without_the_dead_node_in_bounded_time(
    layout: str, die_at: str
) -> None:
    killed = 0
    for seed in SEEDS:
        scenario = quiet(seed, layout, die_at)
        outcome = Run(scenario).execute()
        assert outcome.ok, outcome.report()
        if outcome.crashed_at is None:
            continue  # no node reached the point in this interleaving (a holder-less last call)
        killed += 1
        assert outcome.final_at is not None
        took = outcome.final_at - outcome.crashed_at
        assert took <= recovery_bound(scenario), f"{took:.2f}s\\n{outcome.report()}"
    assert killed >= len(SEEDS) // 2, f"the point was reached in only {killed} schedules"
