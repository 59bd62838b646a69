"""Real torchrun agents rendezvous over etcd-rdzv and run a gloo all-reduce job on loopback."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from etcd_rdzv_devtools.demo import AgentSpec, read_records, wait_for_agents
from etcd_rdzv_devtools.local_etcd import LocalEtcd
from tests.conftest import only_etcd_api
from tests.e2e.agents import WORKER_SCRIPT, LaunchAgent, describe_agents, wait_until

pytestmark = pytest.mark.e2e

# Agents and workers each import torch: on two cores, a job's start takes ~10 s.
JOB_TIMEOUT = 90.0
CONSOLE_SCRIPT = Path(sys.executable).with_name("etcd-rdzv")
Record = dict[str, Any]


def records_by_agent(out: Path, names: list[str], kind: str) -> dict[str, list[Record]]:
    return {name: read_records(out / name, kind) if (out / name).is_dir() else [] for name in names}


def run_status(etcd: LocalEtcd, run_id: str) -> dict[str, Any]:
    """`etcd-rdzv status --json` as an SRE would run it (the API from the environment)."""
    completed = subprocess.run(
        [str(CONSOLE_SCRIPT), "status", "--endpoint", etcd.endpoint, "--run-id", run_id,
         "--json"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    document: dict[str, Any] = json.loads(completed.stdout)
    return document


def assert_one_world(results: list[Record], world_size: int, context: str) -> None:
    """Every worker of one round summed right, in one world with ranks 0..world_size-1."""
    assert sorted(r["rank"] for r in results) == list(range(world_size)), context
    assert {r["world_size"] for r in results} == {world_size}, context
    assert all(r["ok"] and r["sum"] == r["expected"] for r in results), context
    assert {r["expected"] for r in results} == {world_size * (world_size + 1) // 2}, context


def test_two_agents_of_two_workers_form_one_world_of_four(
    etcd: LocalEtcd, run_id: str, tmp_path: Path, launch_agent: LaunchAgent
) -> None:
    out = tmp_path / "results"
    names = ["node-a", "node-b"]
    agents = [
        launch_agent(
            name,
            AgentSpec(
                endpoint=etcd.endpoint,
                run_id=run_id,
                nnodes="2",
                nproc_per_node=2,
                worker=WORKER_SCRIPT,
                worker_args=("--out", str(out / name)),
                rdzv_conf={"last_call_timeout": "1", "timeout": "60"},
            ),
        )
        for name in names
    ]

    codes = wait_for_agents(agents, JOB_TIMEOUT)

    context = describe_agents(agents)
    assert codes == dict.fromkeys(names, 0), context
    by_agent = records_by_agent(out, names, "result")
    for name in names:
        assert len(by_agent[name]) == 2, f"{name}: {by_agent[name]}\n{context}"
        # Both workers of an agent are one node: one group rank, consecutive global ranks.
        assert len({r["group_rank"] for r in by_agent[name]}) == 1, context
    results = [r for name in names for r in by_agent[name]]
    assert_one_world(results, 4, context)
    assert {r["group_rank"] for r in results} == {0, 1}, context
    assert {r["run_id"] for r in results} == {run_id}, context
    assert {r["restart_count"] for r in results} == {0}, context


def test_survivors_restart_with_a_smaller_world_when_a_node_dies(
    etcd: LocalEtcd, etcd_api: str, run_id: str, tmp_path: Path, launch_agent: LaunchAgent
) -> None:
    """SIGKILL one of three nodes mid-job: the two others re-rendezvous and finish.

    The survivors' gloo all-reduce fails when the dead node's workers vanish, so their agents
    restart their workers (one of `--max-restarts 1`) and rendezvous again, as two nodes.
    """
    nproc = 2
    steps, step_seconds = 24, 0.25  # ~6 s per round: the kill lands well inside the first
    out = tmp_path / "results"
    names = ["node-a", "node-b", "node-c"]
    agents = {
        name: launch_agent(
            name,
            AgentSpec(
                endpoint=etcd.endpoint,
                run_id=run_id,
                nnodes="2:3",
                nproc_per_node=nproc,
                max_restarts=1,
                worker=WORKER_SCRIPT,
                worker_args=(
                    *("--out", str(out / name)),
                    *("--steps", str(steps), "--step-seconds", str(step_seconds)),
                    # A worker stuck on a dead peer fails in seconds, not torch's 30 min.
                    *("--timeout", "20"),
                ),
                rdzv_conf={"last_call_timeout": "2", "keep_alive_ttl": "3", "timeout": "60"},
            ),
        )
        for name in names
    }
    everyone = list(agents.values())

    def all_three_running() -> dict[str, list[Record]] | None:
        # A slow third agent can first see two nodes start without it; it is the round
        # with all 3 * nproc workers that must be running.
        started = records_by_agent(out, names, "started")
        full = {
            name: [r for r in records if r["world_size"] == 3 * nproc]
            for name, records in started.items()
        }
        return full if all(len(records) == nproc for records in full.values()) else None

    first_round = wait_until(
        all_three_running, JOB_TIMEOUT, what="all three nodes' workers", agents=everyone
    )
    # The node hosting rank 0, whose address every worker bootstrapped from: the hardest to lose.
    victim = next(name for name, records in first_round.items() if records[0]["group_rank"] == 0)
    agents[victim].kill()
    survivors = [agent for name, agent in agents.items() if name != victim]

    codes = wait_for_agents(survivors, JOB_TIMEOUT)

    context = f"killed {victim}\n{describe_agents(everyone)}"
    assert codes == {agent.name: 0 for agent in survivors}, context
    by_agent = records_by_agent(out, names, "result")
    results = [record for records in by_agent.values() for record in records]
    first_round_pids = {r["pid"] for records in first_round.values() for r in records}
    # Results are written at the end of a round: the first must not have finished before the
    # kill, so every result comes from workers started after it.
    assert not [r for r in results if r["pid"] in first_round_pids], context
    assert by_agent[victim] == [], context
    assert len(results) == 2 * nproc, f"{results}\n{context}"
    assert_one_world(results, 2 * nproc, context)
    assert {r["group_rank"] for r in results} == {0, 1}, context
    # The survivor whose workers failed first spends its restart (count 1). The other may
    # first see that one waiting for a new round, and restart for the membership change,
    # which torchrun does not count (count 0): either way, one restart was spent.
    restart_counts = {
        agent.name: {r["restart_count"] for r in by_agent[agent.name]} for agent in survivors
    }
    assert 1 in set().union(*restart_counts.values()), f"{restart_counts}\n{context}"
    assert all(len(counts) == 1 and counts <= {0, 1} for counts in restart_counts.values()), (
        f"{restart_counts}\n{context}"
    )
    # `status` names the lost node in the run's history, and blames no survivor: the survivors
    # left to rendezvous again (their workers failed) before the dead node's key expired.
    victim_pid, survivor_pids = agents[victim].process.pid, {a.process.pid for a in survivors}
    history = [h["text"] for h in run_status(etcd, run_id)["history"]]
    (lost,) = [text for text in history if "neither left" in text or "had not left" in text
               or "keep-alive of" in text]  # fmt: skip
    if etcd_api == "v3":  # its join claim names it; torch's layout (v2) keeps no such key
        assert f"pid {victim_pid})" in lost, f"{history}\n{context}"
    blamed = " ".join(re.findall(r"keep-alive of (.*?) expired", lost))
    for pid in survivor_pids:
        assert not re.search(rf"pid {pid}\) (neither|had not)", lost), f"{history}\n{context}"
        assert f"pid {pid})" not in blamed, f"{history}\n{context}"


@only_etcd_api("v3")  # over v2 ranks are the join order (torch's layout)
def test_a_restarted_node_keeps_its_group_rank_under_the_stable_rank_policy(
    etcd: LocalEtcd, run_id: str, tmp_path: Path, launch_agent: LaunchAgent
) -> None:
    """Three agents with `rank_policy=stable`: SIGKILL the agent of group rank 0 mid-job and
    start it again (same node id, as a cluster manager restarts a pod). The survivors'
    workers fail, their agents restart them and rendezvous again with the new agent: every
    node has the group rank it had, rank 0 included (by join order the restarted node, last
    to arrive or first, would take whatever rank its arrival gave it)."""
    nproc = 1
    out = tmp_path / "results"
    names = ["node-a", "node-b", "node-c"]

    def spec(name: str) -> AgentSpec:
        return AgentSpec(
            endpoint=etcd.endpoint,
            run_id=run_id,
            nnodes="3",
            nproc_per_node=nproc,
            max_restarts=1,
            worker=WORKER_SCRIPT,
            worker_args=(
                *("--out", str(out / name)),
                *("--steps", "24", "--step-seconds", "0.25"),
                *("--timeout", "20"),
            ),
            rdzv_conf={
                "rank_policy": "stable",
                "node_id": name,
                "last_call_timeout": "2",
                "keep_alive_ttl": "3",
                "timeout": "120",
            },
        )

    agents = {name: launch_agent(name, spec(name)) for name in names}

    def all_three_running() -> dict[str, list[Record]] | None:
        started = records_by_agent(out, names, "started")
        full = {name: [r for r in records if r["world_size"] == 3 * nproc]
                for name, records in started.items()}  # fmt: skip
        return full if all(len(records) == nproc for records in full.values()) else None

    first_round = wait_until(
        all_three_running,
        JOB_TIMEOUT,
        what="all three nodes' workers",
        agents=list(agents.values()),
    )
    first = {name: records[0]["group_rank"] for name, records in first_round.items()}
    victim = next(name for name, rank in first.items() if rank == 0)
    agents[victim].kill()
    restarted = launch_agent(f"{victim}-restarted", spec(victim))
    running = [agent for name, agent in agents.items() if name != victim] + [restarted]

    codes = wait_for_agents(running, 2 * JOB_TIMEOUT)

    context = (
        f"killed {victim}, first round {first}\n{describe_agents([*agents.values(), restarted])}"
    )
    assert codes == {agent.name: 0 for agent in running}, context
    first_pids = {r["pid"] for records in first_round.values() for r in records}
    by_agent = records_by_agent(out, names, "result")
    second = {
        name: {r["group_rank"] for r in records if r["pid"] not in first_pids}
        for name, records in by_agent.items()
    }
    assert second == {name: {rank} for name, rank in first.items()}, context
    results = [r for records in by_agent.values() for r in records if r["pid"] not in first_pids]
    assert_one_world(results, 3 * nproc, context)
    # status tells each node's previous rank: the same, for all three.
    ranks = run_status(etcd, run_id)["ranks"]
    assert {r["node_id"]: (r["rank"], r["previous_rank"]) for r in ranks} == {
        name: (rank, rank) for name, rank in first.items()
    }, f"{ranks}\n{context}"
