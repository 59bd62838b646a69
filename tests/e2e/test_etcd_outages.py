"""A job that trains goes on training through an etcd outage of any kind, with real torchrun.

Agents of a 2-node job start gloo workers that all-reduce every 0.1 s until the test drops a
stop file. Meanwhile etcd goes away: paused for twice a request's timeout, paused for three
keep-alive TTLs, killed and restarted on its data directory, or, in a 3-member cluster, its
leader killed. Each test passes only if no agent died, no worker restarted (one worker
process per rank, from start to end, restart count 0), the version's keep-alive keys are back
after the outage, and every agent exits 0. One more: a node SIGKILLed during an outage is
seen once etcd is back, and the others re-form without it.

Each test prints `OUTAGE <fault> <api> ...` with what it measured (`pytest -s`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from etcd_rdzv.kv import KeyNotFound, KeyValue
from etcd_rdzv.layouts import RunPaths
from etcd_rdzv.protocol import RendezvousState, Status
from etcd_rdzv_devtools.demo import AgentSpec, TorchrunAgent, read_records, wait_for_agents
from etcd_rdzv_devtools.local_etcd import LocalEtcd, LocalEtcdCluster
from tests.conftest import EtcdFactory, etcd_leaders, open_kv
from tests.e2e.agents import WORKER_SCRIPT, LaunchAgent, describe_agents, wait_until

pytestmark = pytest.mark.e2e

REQUEST_TIMEOUT = 3.0
KEEP_ALIVE_TTL = 3.0
RDZV_CONF = {
    "last_call_timeout": "1",
    "timeout": "120",
    "request_timeout": f"{REQUEST_TIMEOUT:g}",
    "keep_alive_ttl": f"{KEEP_ALIVE_TTL:g}",
}
# Agents and workers each import torch: on two cores a job's start takes ~10 s.
START_TIMEOUT = 90.0
# After the fault: etcd back, keys restored, workers told to stop, agents through their exit.
END_TIMEOUT = 90.0
STEP_SECONDS = 0.1
Record = dict[str, Any]


@dataclass(frozen=True)
class Job:
    """One test's run: its id, the etcd API its agents speak, where workers write, the
    launcher whose agents the test's teardown kills."""

    run_id: str
    etcd_api: str
    out: Path
    launch_agent: LaunchAgent


@pytest.fixture
def job(run_id: str, etcd_api: str, tmp_path: Path, launch_agent: LaunchAgent) -> Job:
    return Job(run_id, etcd_api, tmp_path / "results", launch_agent)


def spec(endpoint: str, run_id: str, out: Path, name: str, **overrides: Any) -> AgentSpec:
    worker_args = (
        *("--out", str(out / name)),
        *("--steps", "100000", "--step-seconds", f"{STEP_SECONDS:g}"),
        *("--stop-file", str(out / "stop")),
        # A worker stuck on a dead peer fails in seconds, not torch's 30 minutes.
        *("--timeout", "20"),
    )
    fields: dict[str, Any] = {
        "endpoint": endpoint,
        "run_id": run_id,
        "nnodes": "2",
        "nproc_per_node": 1,
        "worker": WORKER_SCRIPT,
        "worker_args": worker_args,
        "rdzv_conf": RDZV_CONF,
        **overrides,
    }
    return AgentSpec(**fields)


def records(out: Path, name: str, kind: str) -> list[Record]:
    return read_records(out / name, kind) if (out / name).is_dir() else []


def training(out: Path, names: list[str], world_size: int) -> dict[str, list[Record]] | None:
    """Each node's `started` records of a round with `world_size` ranks, once all have one."""
    started = {
        name: [r for r in records(out, name, "started") if r["world_size"] == world_size]
        for name in names
    }
    return started if all(started.values()) else None


def version_state(kv: KeyValue, run_id: str) -> RendezvousState | None:
    try:
        entry = kv.get(RunPaths(f"/torchelastic/p2p/run_{run_id}").active_version)
    except KeyNotFound:
        return None
    return RendezvousState.decode(entry.value, entry.key)


def keep_alives_back(kv: KeyValue, run_id: str) -> bool:
    """The final version's keep-alive keys all live (re-created by their members)."""
    try:
        state = version_state(kv, run_id)
        if state is None or state.status is not Status.FINAL or state.version is None:
            return False
        paths = RunPaths(f"/torchelastic/p2p/run_{run_id}")
        live = kv.list(paths.version_dir(state.version)).keys
    except Exception:
        return False  # etcd still coming back
    return set(state.keep_alives or ()) <= live


def assert_trained_through(
    out: Path, names: list[str], agents: list[TorchrunAgent], before: dict[str, list[Record]]
) -> None:
    """Every agent exited 0 and its one worker ran from start to end: nothing restarted."""
    codes = wait_for_agents(agents, END_TIMEOUT)
    context = describe_agents(agents)
    assert codes == dict.fromkeys(names, 0), context
    for name in names:
        started, results = records(out, name, "started"), records(out, name, "result")
        assert len(started) == 1 and len(results) == 1, f"{name}: {started} {results}\n{context}"
        (result,) = results
        assert result["pid"] == before[name][0]["pid"], f"{name}'s worker was replaced\n{context}"
        assert result["restart_count"] == 0 and result["ok"], context


def run_through(
    job: Job, fault: Callable[[], float], *, endpoint: str, kv_endpoint: str, label: str
) -> None:
    """Train, inject `fault` (it returns once etcd is back), check that nothing restarted."""
    run_id, etcd_api, out, launch_agent = job.run_id, job.etcd_api, job.out, job.launch_agent
    names = ["node-a", "node-b"]
    agents = [launch_agent(name, spec(endpoint, run_id, out, name)) for name in names]
    before = wait_until(
        lambda: training(out, names, 2), START_TIMEOUT, what="both workers training", agents=agents
    )
    outage = fault()
    back = time.monotonic()
    kv = open_kv(kv_endpoint, etcd_api, request_timeout=REQUEST_TIMEOUT)
    try:
        wait_until(
            lambda: keep_alives_back(kv, run_id) or None,
            10 * KEEP_ALIVE_TTL + 2 * REQUEST_TIMEOUT,
            what="the version's keep-alive keys back after the outage",
            agents=agents,
        )
        restored = time.monotonic() - back
        # Training goes on after the outage too: a few monitor intervals with etcd back.
        time.sleep(2.0)
        (out / "stop").write_text("stop\n", encoding="utf-8")
        assert_trained_through(out, names, agents, before)
    finally:
        kv.close()
    print(
        f"\nOUTAGE {label} {etcd_api}: etcd away {outage:.1f} s; keep-alive keys back "
        f"{restored:.2f} s after it answered; no agent died, no worker restarted"
    )


@pytest.mark.parametrize(
    "pause_seconds", [2 * REQUEST_TIMEOUT, 3 * KEEP_ALIVE_TTL], ids=["2x-request", "3x-ttl"]
)
def test_training_goes_on_through_an_etcd_pause(
    etcd_factory: EtcdFactory, job: Job, pause_seconds: float
) -> None:
    server = etcd_factory()

    def pause() -> float:
        server.pause()
        try:
            time.sleep(pause_seconds)
        finally:
            server.resume()
        return pause_seconds

    run_through(
        job,
        pause,
        endpoint=server.endpoint,
        kv_endpoint=server.endpoint,
        label=f"pause-{pause_seconds:g}s",
    )


def test_training_goes_on_while_etcd_is_killed_and_restarted(
    etcd_factory: EtcdFactory, job: Job
) -> None:
    server: LocalEtcd = etcd_factory(data_dir=job.out.parent / "etcd-data")

    def kill_and_restart() -> float:
        started = time.monotonic()
        server.kill()
        time.sleep(2 * REQUEST_TIMEOUT)
        server.restart()
        return time.monotonic() - started

    run_through(
        job,
        kill_and_restart,
        endpoint=server.endpoint,
        kv_endpoint=server.endpoint,
        label="kill-restart",
    )


def test_training_goes_on_when_the_etcd_leader_is_killed(
    etcd_cluster: LocalEtcdCluster, job: Job
) -> None:
    wait_until(
        lambda: len(etcd_leaders(etcd_cluster.members)) == 1 or None, 15, what="one etcd leader"
    )
    (leader,) = etcd_leaders(etcd_cluster.members)
    followers = [member for member in etcd_cluster.members if member is not leader]
    # The leader first: every agent prefers it, so losing it forces each to fail over.
    endpoints = ",".join(member.endpoint for member in [leader, *followers])

    def kill_leader() -> float:
        started = time.monotonic()
        leader.kill()
        wait_until(lambda: len(etcd_leaders(followers)) == 1 or None, 30, what="a new etcd leader")
        return time.monotonic() - started

    run_through(
        job,
        kill_leader,
        endpoint=endpoints,
        kv_endpoint=",".join(member.endpoint for member in followers),
        label="leader-kill",
    )


def test_a_node_killed_during_an_outage_is_seen_and_the_others_reform(
    etcd_factory: EtcdFactory, job: Job
) -> None:
    server = etcd_factory()
    out = job.out
    names = ["node-a", "node-b", "node-c"]
    agents = {
        name: job.launch_agent(
            name, spec(server.endpoint, job.run_id, out, name, nnodes="2:3", max_restarts=1)
        )
        for name in names
    }
    everyone = list(agents.values())
    wait_until(lambda: training(out, names, 3), START_TIMEOUT, what="three nodes", agents=everyone)
    victim = "node-b"
    survivors = [name for name in names if name != victim]

    server.pause()
    try:
        agents[victim].kill()
        time.sleep(3 * KEEP_ALIVE_TTL)
    finally:
        server.resume()
    back = time.monotonic()

    # The victim's workers vanished, the survivors' collectives failed: they restart their
    # workers and re-form as two once etcd answers, without waiting for the dead node.
    survivor_agents = [agents[name] for name in survivors]
    wait_until(
        lambda: training(out, survivors, 2),
        START_TIMEOUT,
        what="the two survivors training again",
        agents=survivor_agents,
    )
    reformed = time.monotonic() - back
    (out / "stop").write_text("stop\n", encoding="utf-8")
    codes = wait_for_agents(survivor_agents, END_TIMEOUT)
    context = describe_agents(everyone)
    assert codes == dict.fromkeys(survivors, 0), context
    results = [r for name in survivors for r in records(out, name, "result")]
    assert sorted(r["group_rank"] for r in results) == [0, 1], f"{results}\n{context}"
    assert {r["world_size"] for r in results} == {2}, context
    assert records(out, victim, "result") == [], context
    print(
        f"\nOUTAGE node-killed-during-pause {job.etcd_api}: the two survivors trained again "
        f"{reformed:.1f} s after etcd answered (worker start-up included)"
    )
