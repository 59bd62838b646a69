"""etcd itself failing under a rendezvous: paused, killed and restarted, a leader lost, unreachable.

Every participant is a real process with its own client. Each fault hits a rendezvous of three
nodes (min = max = 3) at the same point: two nodes have joined version 1 and wait for the third,
which is released while etcd is down. The rendezvous must complete once etcd is back, with one
consistent membership. How long that took after the fault ended is printed (`pytest -s`) as
`RECOVERY <fault> <api> <seconds>`.

Several runs sharing one etcd under load, each keeping to its own keys, are checked here too.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from torch.distributed.elastic.rendezvous import RendezvousParameters

from etcd_rdzv.errors import EtcdUnavailableError
from etcd_rdzv.handler import create_handler
from etcd_rdzv.kv import KeyValue
from etcd_rdzv.telemetry import FanOut
from etcd_rdzv.telemetry.metrics import MetricsObserver, RendezvousMetrics
from etcd_rdzv_devtools.local_etcd import (
    LocalEtcdCluster,
    free_loopback_ports,
)
from tests.conftest import EtcdFactory, etcd_keys, etcd_leaders, open_kv
from tests.support.harness import (
    JsonDict,
    Participant,
    ParticipantGroup,
    check_membership,
    joined_ranks,
    logged_events,
)
from tests.support.waiting import wait_until

BACKEND = "etcd-rdzv"
# request_timeout bounds one etcd operation, retries and failover included: longer than any
# outage below, so no operation gives up while etcd is away.
REQUEST_TIMEOUT = 15.0
CONF = {
    "timeout": "90",
    "last_call_timeout": "1",
    "keep_alive_ttl": "5",
    "request_timeout": f"{REQUEST_TIMEOUT:g}",
}
PAUSE_SECONDS = 3.0
# A rendezvous of three that has to sit out a fault; generous for a loaded 2-core machine.
RESULT_TIMEOUT = 60.0
JOIN_TIMEOUT = 30.0


def state_key(run_id: str) -> str:
    return f"/torchelastic/p2p/run_{run_id}/rdzv/active_version"


def etcd_retries(node: Participant) -> list[JsonDict]:
    """`retry` events of the etcd transport (no phase): requests retried while etcd was away."""
    return [e for e in logged_events(node) if e["event"] == "retry" and e.get("phase") is None]


def report_recovery(fault: str, api: str, seconds: float) -> None:
    print(f"\nRECOVERY {fault} {api} {seconds:.2f}")


def two_joined_and_a_third(group: ParticipantGroup, kv: KeyValue) -> list[Participant]:
    """Three ready nodes; the first two sent into the rendezvous and seen in version 1."""
    nodes = group.start(3, backend=BACKEND)
    for node in nodes[:2]:
        node.send({"cmd": "rendezvous"})
    wait_until(
        "two nodes joined version 1",
        lambda: joined_ranks(kv, group.run_id) == [0, 1],
        JOIN_TIMEOUT,
    )
    return nodes


def collect(nodes: list[Participant], started: float) -> tuple[list[JsonDict], float]:
    """Every node's rendezvous answer, and the seconds from `started` until the last came."""
    results = [node.expect_rendezvous(RESULT_TIMEOUT) for node in nodes]
    return results, time.monotonic() - started


def assert_one_membership_of_three(results: list[JsonDict]) -> None:
    check_membership(results)
    assert {r["world_size"] for r in results} == {3}
    assert len({r["version"] for r in results}) == 1


def three_node_group(tmp_path: Path, endpoint: str, run_id: str) -> ParticipantGroup:
    return ParticipantGroup(
        tmp_path / run_id, endpoint=endpoint, run_id=run_id, min_nodes=3, max_nodes=3, conf=CONF
    )


# --- a single etcd paused, killed ----------------------------------------------------------------


def test_rendezvous_completes_after_etcd_was_paused_mid_join(
    tmp_path: Path, etcd_factory: EtcdFactory, etcd_api: str, run_id: str
) -> None:
    server = etcd_factory()
    kv = open_kv(server, etcd_api, request_timeout=REQUEST_TIMEOUT)
    try:
        with three_node_group(tmp_path, server.endpoint, run_id) as group:
            first, second, third = two_joined_and_a_third(group, kv)
            server.pause()
            paused_at = time.monotonic()
            try:
                third.send({"cmd": "rendezvous"})
                # The fault's length, not a synchronisation: etcd answers nothing meanwhile.
                time.sleep(PAUSE_SECONDS)
            finally:
                server.resume()
            resumed = time.monotonic()
            results, recovery = collect([first, second, third], resumed)
    finally:
        kv.close()
    assert_one_membership_of_three(results)
    # The third node's call spanned the pause: the outage really hit the rendezvous.
    assert results[2]["seconds"] >= resumed - paused_at - 0.5
    report_recovery("pause", etcd_api, recovery)
    assert recovery < REQUEST_TIMEOUT


def test_rendezvous_completes_after_etcd_was_killed_and_restarted_mid_join(
    tmp_path: Path, etcd_factory: EtcdFactory, etcd_api: str, run_id: str
) -> None:
    server = etcd_factory()
    kv = open_kv(server, etcd_api, request_timeout=REQUEST_TIMEOUT)
    try:
        with three_node_group(tmp_path, server.endpoint, run_id) as group:
            first, second, third = two_joined_and_a_third(group, kv)
            server.kill()
            assert not server.is_running()
            third.send({"cmd": "rendezvous"})
            # Restart only once the third node has met the dead etcd and is retrying.
            wait_until("the third node retries against the dead etcd",
                       lambda: etcd_retries(third), JOIN_TIMEOUT)  # fmt: skip
            restart_began = time.monotonic()
            server.restart()
            restarted = time.monotonic()
            results, recovery = collect([first, second, third], restarted)
    finally:
        kv.close()
    assert_one_membership_of_three(results)
    assert {e.get("reason") for e in etcd_retries(third)} & {"unavailable", "outcome_unknown"}
    report_recovery("kill+restart", etcd_api, recovery)
    print(f"(etcd restart itself took {restarted - restart_began:.2f}s)")
    assert recovery < REQUEST_TIMEOUT


# --- a three-member cluster loses its leader -----------------------------------------------------


def test_rendezvous_completes_when_the_etcd_leader_is_killed_mid_join(
    tmp_path: Path, etcd_cluster: LocalEtcdCluster, etcd_api: str, run_id: str
) -> None:
    wait_until(
        "the cluster has one leader", lambda: len(etcd_leaders(etcd_cluster.members)) == 1, 15
    )
    (leader,) = etcd_leaders(etcd_cluster.members)
    followers = [member for member in etcd_cluster.members if member is not leader]
    # The leader first: every agent prefers it, so losing it forces each to fail over.
    endpoints = ",".join(member.endpoint for member in [leader, *followers])
    kv = open_kv(endpoints, etcd_api, request_timeout=REQUEST_TIMEOUT)
    try:
        with three_node_group(tmp_path, endpoints, run_id) as group:
            first, second, third = two_joined_and_a_third(group, kv)
            leader.kill()
            killed = time.monotonic()
            third.send({"cmd": "rendezvous"})
            results, recovery = collect([first, second, third], killed)
            new_leaders = etcd_leaders(followers)
    finally:
        kv.close()
    assert_one_membership_of_three(results)
    assert not leader.is_running()
    assert len(new_leaders) == 1, "the two remaining members should have elected a leader"
    # The agents really moved off the dead leader: some of their requests to it failed.
    retried = [node.name for node in (first, second, third) if etcd_retries(node)]
    assert retried, "no agent retried a request: did any of them use the killed leader?"
    report_recovery("leader-kill", etcd_api, recovery)
    assert recovery < REQUEST_TIMEOUT


# --- etcd unreachable from the start -------------------------------------------------------------

UNREACHABLE_TIMEOUT = 2.0
# The last attempt may begin just before the deadline and still take a connect attempt.
DEADLINE_SLACK = 1.5


@pytest.fixture
def unreachable_endpoint() -> str:
    # A port the kernel just reported free: nothing listens there.
    return f"127.0.0.1:{free_loopback_ports(1)[0]}"


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_unreachable_etcd_fails_within_request_timeout_and_counts_its_retries(
    etcd_api: str, unreachable_endpoint: str, run_id: str
) -> None:
    registry = CollectorRegistry()
    metrics = MetricsObserver(RendezvousMetrics(registry), run_id)
    params = RendezvousParameters(
        backend=BACKEND, endpoint=unreachable_endpoint, run_id=run_id, min_nodes=1, max_nodes=1,
        request_timeout=f"{UNREACHABLE_TIMEOUT:g}", metrics_port="off",
    )  # fmt: skip
    started = time.monotonic()
    with pytest.raises(EtcdUnavailableError) as failure:
        create_handler(params, observer=FanOut([metrics]))
    elapsed = time.monotonic() - started

    message = str(failure.value)
    assert unreachable_endpoint in message
    assert f"within {UNREACHABLE_TIMEOUT:g}s" in message
    assert elapsed <= UNREACHABLE_TIMEOUT + DEADLINE_SLACK, f"gave up only after {elapsed:.2f}s"
    assert elapsed >= UNREACHABLE_TIMEOUT * 0.9, f"gave up early, after {elapsed:.2f}s"

    retries = sample(
        registry, "etcd_rdzv_retries_total", run_id=run_id, phase="etcd", reason="unavailable"
    )
    unavailable = sum(
        s.value
        for metric in registry.collect()
        if metric.name == "etcd_rdzv_etcd_requests"
        for s in metric.samples
        if s.name == "etcd_rdzv_etcd_requests_total" and s.labels.get("result") == "unavailable"
    )
    ok = sum(
        s.value
        for metric in registry.collect()
        if metric.name == "etcd_rdzv_etcd_requests"
        for s in metric.samples
        if s.name == "etcd_rdzv_etcd_requests_total" and s.labels.get("result") == "ok"
    )
    assert retries >= 2, f"only {retries} transport retries counted"
    # Every retry follows a failed request, and the last failed request is not retried.
    assert unavailable == retries + 1
    assert ok == 0


def test_unreachable_etcd_shows_its_retries_in_the_agent_log(
    tmp_path: Path, etcd_api: str, unreachable_endpoint: str, run_id: str
) -> None:
    group = ParticipantGroup(
        tmp_path, endpoint=unreachable_endpoint, run_id=run_id, min_nodes=1, max_nodes=1,
        conf={"request_timeout": f"{UNREACHABLE_TIMEOUT:g}", "log_format": "json"},
    )  # fmt: skip
    with group, pytest.raises(AssertionError) as failure:
        group.start(1, backend=BACKEND, ready_timeout=60)
    (node,) = group.members
    assert "EtcdUnavailableError" in str(failure.value)
    assert unreachable_endpoint in str(failure.value)

    retries = etcd_retries(node)
    assert len(retries) >= 2, f"retries not logged; log tail:\n{node.stderr_tail()}"
    assert {e["reason"] for e in retries} == {"unavailable"}
    assert [e["attempt"] for e in retries] == list(range(1, len(retries) + 1))
    assert all(e["run_id"] == run_id for e in retries)
    assert all(e.get("node") and e.get("timestamp") and e.get("level") == "info" for e in retries)


# --- several runs on one etcd under load ---------------------------------------------------------

RUNS = 4
NODES_PER_RUN = 3
ROUNDS = 2


def test_concurrent_runs_on_one_etcd_keep_to_their_own_keys(
    tmp_path: Path, etcd_factory: EtcdFactory, etcd_api: str, run_id: str
) -> None:
    server = etcd_factory()
    # Run ids that are string prefixes of each other: `run_X` must not reach into `run_X1`.
    run_ids = [run_id, f"{run_id}1", f"{run_id}-1", f"{run_id}-10"][:RUNS]
    prefixes = {run: f"/torchelastic/p2p/run_{run}" for run in run_ids}
    groups = {run: three_node_group(tmp_path, server.endpoint, run) for run in run_ids}
    results: dict[str, list[list[JsonDict]]] = {run: [] for run in run_ids}
    keys_per_round: list[set[str]] = []
    try:
        for run, group in groups.items():
            # Spawn all twelve before waiting for any: they start (and load the machine) together.
            for _ in range(NODES_PER_RUN):
                group.members.append(
                    Participant(
                        f"p{len(group.members)}-{run}", backend=BACKEND, endpoint=group.endpoint,
                        run_id=run, min_nodes=3, max_nodes=3, log_dir=group.log_dir,
                        conf=group.conf,
                    )
                )  # fmt: skip
        for group in groups.values():
            for node in group.members:
                node.wait_ready()
        everyone = [node for group in groups.values() for node in group.members]
        for _ in range(ROUNDS):
            # Each round, every node of every run asks for the next rendezvous at once.
            for node in everyone:
                node.send({"cmd": "rendezvous"})
            for run, group in groups.items():
                results[run].append(
                    [node.expect_rendezvous(RESULT_TIMEOUT) for node in group.members]
                )
            # Read while every member still holds its keep-alive key.
            keys_per_round.append(etcd_keys(server, etcd_api, "/"))
    finally:
        for group in groups.values():
            group.stop_all()

    for round_number, keys in enumerate(keys_per_round, start=1):
        owned = {
            run: {key for key in keys if key == prefix or key.startswith(prefix + "/")}
            for run, prefix in prefixes.items()
        }
        # No key anywhere but below the runs' own prefixes, and each run's keys are its own.
        assert set().union(*owned.values()) == keys
        for run, own in owned.items():
            versions = {int(v) for v in re.findall(r"/rdzv/v_(\d+)/", "\n".join(own))}
            assert versions <= set(range(1, round_number + 1)), f"{run}: versions {versions}"
            assert {key for key in own if re.search(rf"/rdzv/v_{round_number}/rank_\d+$", key)} == {
                f"{prefixes[run]}/rdzv/v_{round_number}/rank_{rank}"
                for rank in range(NODES_PER_RUN)
            }, f"{run}: round {round_number} keep-alives"

    for run, rounds in results.items():
        pids = {node.pid for node in groups[run].members}
        # Both rounds of a run as one scenario: one membership per version, versions only go up.
        check_membership([result for round_results in rounds for result in round_results])
        for round_number, round_results in enumerate(rounds, start=1):
            assert {r["world_size"] for r in round_results} == {NODES_PER_RUN}
            # Two rounds, two versions per run: no other run's activity moved its counter.
            assert {r["version"] for r in round_results} == {round_number}, run
            assert {r["pid"] for r in round_results} == pids
