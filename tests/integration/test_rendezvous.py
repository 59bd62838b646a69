"""The rendezvous against a real etcd, every participant a separate process with its own client."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from etcd_rdzv.kv import KeyNotFound, KeyValue
from etcd_rdzv.protocol import RendezvousState
from etcd_rdzv_devtools.local_etcd import LocalEtcd, free_loopback_ports
from tests.conftest import EtcdFactory, etcd_keys, only_etcd_api
from tests.support.harness import (
    ParticipantGroup,
    check_membership,
    joined_ranks,
    logged_events,
)
from tests.support.waiting import wait_until

BACKEND = "etcd-rdzv"
# Short TTLs and windows keep the suite fast; the protocol is the same at torch's defaults.
KEEP_ALIVE_TTL = 2.0
FAST = {"last_call_timeout": "1", "keep_alive_ttl": f"{KEEP_ALIVE_TTL:g}", "timeout": "60"}
KEY_EXPIRY_MARGIN = 2.5
# Protocol scenarios whose outcome does not depend on the transport run over the default API
# only: the simulator runs them, and many more, in both key layouts (tests/simulation). The
# transport's part (requests, watches, TTLs) is the same as in the tests that run over both.
PROTOCOL_SCENARIO = only_etcd_api("v3")


def group(tmp_path: Path, etcd: LocalEtcd, run_id: str, min_nodes: int, max_nodes: int,
          **conf: str) -> ParticipantGroup:  # fmt: skip
    return ParticipantGroup(
        tmp_path / run_id,
        endpoint=etcd.endpoint,
        run_id=run_id,
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        conf={**FAST, **conf},
    )


def active_state(kv: KeyValue, run_id: str) -> dict[str, object] | None:
    try:
        value = kv.get(f"/torchelastic/p2p/run_{run_id}/rdzv/active_version").value
    except KeyNotFound:
        return None
    state: dict[str, object] = json.loads(value)
    return state


@pytest.mark.parametrize("size", [1, 2, 8])
def test_fixed_size_rendezvous(tmp_path: Path, etcd: LocalEtcd, run_id: str, size: int) -> None:
    with group(tmp_path, etcd, run_id, size, size) as nodes:
        nodes.start(size, backend=BACKEND)
        results = nodes.rendezvous_all(timeout=60)
    check_membership(results)
    assert {r["world_size"] for r in results} == {size}
    assert {r["version"] for r in results} == {1}


@PROTOCOL_SCENARIO
def test_elastic_rendezvous_completes_after_the_last_call(
    tmp_path: Path, etcd: LocalEtcd, run_id: str
) -> None:
    with group(tmp_path, etcd, run_id, 2, 4, last_call_timeout="1.5") as nodes:
        nodes.start(3, backend=BACKEND)
        started = time.monotonic()
        results = nodes.rendezvous_all(timeout=60)
        elapsed = time.monotonic() - started
    check_membership(results)
    assert {r["world_size"] for r in results} == {3}
    # min was reached at once; the window was held open for the fourth node that never came.
    assert elapsed >= 1.5


@PROTOCOL_SCENARIO
def test_late_node_waits_then_joins_the_next_version(
    tmp_path: Path, etcd: LocalEtcd, run_id: str
) -> None:
    with group(tmp_path, etcd, run_id, 2, 3) as nodes:
        first = nodes.start(2, backend=BACKEND)
        check_membership(nodes.rendezvous_all(timeout=60, participants=first))

        (late,) = nodes.start(1, backend=BACKEND)
        late.send({"cmd": "rendezvous"})
        wait_until(
            "a member sees the late node waiting",
            lambda: first[0].request({"cmd": "num_nodes_waiting"}, 10)["value"] > 0,
            timeout=20,
        )
        # The members re-rendezvous, as torchrun's agents do when nodes are waiting.
        for member in first:
            member.send({"cmd": "rendezvous"})
        results = [p.expect_rendezvous(60) for p in [*first, late]]
    check_membership(results)
    assert {r["version"] for r in results} == {2}
    assert {r["world_size"] for r in results} == {3}


@PROTOCOL_SCENARIO
def test_members_keep_seeing_waiting_nodes_after_one_member_left_for_the_next_version(
    tmp_path: Path, etcd: LocalEtcd, run_id: str, kv: KeyValue
) -> None:
    # torchrun's agents poll num_nodes_waiting() and restart only when it is positive. The
    # first member to re-rendezvous tears the final version down at once; the others must
    # still be told that nodes wait for them, or they carry on in a membership that is gone.
    with group(tmp_path, etcd, run_id, 2, 3, last_call_timeout="5") as nodes:
        first, second = nodes.start(2, backend=BACKEND)
        check_membership(nodes.rendezvous_all(timeout=60, participants=[first, second]))
        (late,) = nodes.start(1, backend=BACKEND)
        late.send({"cmd": "rendezvous"})
        wait_until(
            "the members see the late node",
            lambda: second.request({"cmd": "num_nodes_waiting"}, 10)["value"] > 0,
            timeout=20,
        )
        first.send({"cmd": "rendezvous"})
        wait_until(
            "version 1 replaced by the next one",
            lambda: (active_state(kv, run_id) or {}).get("version") not in (None, "1"),
            timeout=20,
        )
        assert second.request({"cmd": "num_nodes_waiting"}, 10)["value"] >= 1
        second.send({"cmd": "rendezvous"})
        results = [p.expect_rendezvous(60) for p in (first, second, late)]
    check_membership(results)
    assert {r["world_size"] for r in results} == {3}


def test_closed_rendezvous_rejects_joiners(tmp_path: Path, etcd: LocalEtcd, run_id: str) -> None:
    with group(tmp_path, etcd, run_id, 1, 2) as nodes:
        (member,) = nodes.start(1, backend=BACKEND)
        member.rendezvous(timeout=30)
        assert member.request({"cmd": "is_closed"}, 10)["value"] is False
        member.request({"cmd": "set_closed"}, 10)
        assert member.request({"cmd": "is_closed"}, 10)["value"] is True

        (joiner,) = nodes.start(1, backend=BACKEND)
        joiner.send({"cmd": "rendezvous"})
        error = joiner.expect("error", timeout=30)
    assert error["type"] == "RendezvousClosedError"
    assert run_id in error["message"]


def test_overall_timeout_raises_and_says_what_was_missing(
    tmp_path: Path, etcd: LocalEtcd, run_id: str
) -> None:
    with group(tmp_path, etcd, run_id, 2, 2, timeout="2") as nodes:
        (alone,) = nodes.start(1, backend=BACKEND)
        started = time.monotonic()
        alone.send({"cmd": "rendezvous"})
        error = alone.expect("error", timeout=30)
        elapsed = time.monotonic() - started
    assert error["type"] == "RendezvousTimeoutError"
    assert "within 2s" in error["message"]
    assert "joinable with 1 participants" in error["message"]
    assert elapsed < 10


@PROTOCOL_SCENARIO
def test_dead_participant_keep_alive_expires_and_the_next_version_forms_without_it(
    tmp_path: Path, etcd: LocalEtcd, etcd_api: str, run_id: str, kv: KeyValue
) -> None:
    with group(tmp_path, etcd, run_id, 2, 3) as nodes:
        members = nodes.start(3, backend=BACKEND)
        first = nodes.rendezvous_all(timeout=60)
        check_membership(first)
        [dead_rank] = [r["rank"] for r in first if r["pid"] == members[2].pid]
        dead_key = f"/torchelastic/p2p/run_{run_id}/rdzv/v_1/rank_{dead_rank}"
        members[2].kill()
        # Its keep-alive key (a v2 TTL, a v3 lease) ends within the TTL, plus the second a v3
        # lease is granted longer and etcd's half-second expiry tick.
        wait_until(
            "the dead member's keep-alive key expired",
            lambda: dead_key not in etcd_keys(etcd, etcd_api, dead_key),
            timeout=KEEP_ALIVE_TTL + KEY_EXPIRY_MARGIN,
        )

        # A newcomer finds version 1 final; only the dead member's expiring keep-alive
        # (the live ones keep refreshing theirs) lets it tear version 1 down.
        (newcomer,) = nodes.start(1, backend=BACKEND)
        newcomer.send({"cmd": "rendezvous"})
        wait_until(
            "version 1 torn down after the dead member's keep-alive expired",
            lambda: (active_state(kv, run_id) or {}).get("version") not in (None, "1"),
            timeout=10,
        )
        survivors = [members[0], members[1], newcomer]
        for member in members[:2]:
            member.send({"cmd": "rendezvous"})
        results = [p.expect_rendezvous(60) for p in survivors]
    check_membership(results)
    assert {r["world_size"] for r in results} == {3}
    assert members[2].pid not in {r["pid"] for r in results}
    # The node that tore version 1 down says who made it fail, with its run and node.
    (torn,) = logged_events(newcomer, "version_torn_down")
    assert (torn["run_id"], torn["version"], torn["reason"]) == (run_id, 1, "keep_alive_missing")
    assert torn["ranks"] == [dead_rank] and torn["node"]
    # Its join claim still names the dead node (v3, the claims layout).
    assert torn["nodes"] == [f"{socket.gethostname()} (pid {members[2].pid})"]


def test_two_runs_on_one_etcd_do_not_interfere(
    tmp_path: Path, etcd: LocalEtcd, etcd_api: str, kv: KeyValue
) -> None:
    run_a, run_b = f"iso-a-{time.monotonic_ns()}", f"iso-b-{time.monotonic_ns()}"
    with (
        group(tmp_path, etcd, run_a, 2, 2) as nodes_a,
        group(tmp_path, etcd, run_b, 3, 3) as nodes_b,
    ):
        nodes_a.start(2, backend=BACKEND)
        nodes_b.start(3, backend=BACKEND)
        for participant in [*nodes_a.members, *nodes_b.members]:
            participant.send({"cmd": "rendezvous"})
        results_a = [p.expect_rendezvous(60) for p in nodes_a.members]
        results_b = [p.expect_rendezvous(60) for p in nodes_b.members]
        # Read while the members still hold their keep-alive keys.
        keys = etcd_keys(etcd, etcd_api, "/torchelastic/p2p")
    check_membership(results_a)
    check_membership(results_b)
    assert {r["world_size"] for r in results_a} == {2}
    assert {r["world_size"] for r in results_b} == {3}
    for run, size in ((run_a, 2), (run_b, 3)):
        raw = kv.get(f"/torchelastic/p2p/run_{run}/rdzv/active_version").value
        # Read as any reader does: under claims (v3) the document counts its participants.
        state = RendezvousState.decode(raw, "active_version")
        assert state.participants == tuple(range(size))
        keep_alives = {k for k in keys if k.startswith(f"/torchelastic/p2p/run_{run}/rdzv/v_1/")}
        assert keep_alives == {
            f"/torchelastic/p2p/run_{run}/rdzv/v_1/rank_{rank}" for rank in range(size)
        } | {k for k in keep_alives if "/kv/" in k or "/joined/" in k}


@only_etcd_api("v2")  # torch's backend speaks nothing else
def test_mixed_rendezvous_with_torch_etcd_backend(
    tmp_path: Path, etcd: LocalEtcd, run_id: str
) -> None:
    with group(tmp_path, etcd, run_id, 4, 4) as nodes:
        nodes.start(2, backend="etcd")
        nodes.start(2, backend=BACKEND)
        results = nodes.rendezvous_all(timeout=90)
    check_membership(results)
    assert {r["world_size"] for r in results} == {4}
    assert len({r["version"] for r in results}) == 1
    assert sorted(r["rank"] for r in results) == [0, 1, 2, 3]


@pytest.fixture
def unreachable_endpoint() -> Iterator[str]:
    # A port the kernel just reported free: nothing listens there.
    yield f"127.0.0.1:{free_loopback_ports(1)[0]}"


def test_unreachable_etcd_is_a_clear_error_naming_the_endpoint(
    tmp_path: Path, unreachable_endpoint: str, run_id: str
) -> None:
    nodes = ParticipantGroup(
        tmp_path, endpoint=unreachable_endpoint, run_id=run_id, min_nodes=1, max_nodes=1,
        conf={"request_timeout": "2"},
    )  # fmt: skip
    with nodes, pytest.raises(AssertionError) as failure:
        nodes.start(1, backend=BACKEND, ready_timeout=30)
    message = str(failure.value)
    assert "EtcdUnavailableError" in message
    assert unreachable_endpoint in message
    assert "Check that etcd is running" in message


@only_etcd_api("v2")
def test_v2_against_a_server_without_v2_says_to_use_v3(
    tmp_path: Path, etcd_factory: EtcdFactory, run_id: str
) -> None:
    v3_only = etcd_factory(enable_v2=False)
    nodes = ParticipantGroup(
        tmp_path, endpoint=v3_only.endpoint, run_id=run_id, min_nodes=1, max_nodes=1,
        conf={"etcd_api": "v2"},
    )  # fmt: skip
    with nodes, pytest.raises(AssertionError) as failure:
        nodes.start(1, backend=BACKEND, ready_timeout=30)
    message = str(failure.value)
    assert "V2ApiUnavailable" in message
    assert "does not serve the v2 API" in message
    assert "Use etcd_api=v3" in message


@only_etcd_api("v3")
def test_v3_is_the_default_and_needs_no_v2_api(
    tmp_path: Path, etcd_factory: EtcdFactory, run_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ETCD_RDZV_ETCD_API")
    v3_only = etcd_factory(enable_v2=False)
    nodes = ParticipantGroup(
        tmp_path, endpoint=v3_only.endpoint, run_id=run_id, min_nodes=2, max_nodes=2, conf=FAST
    )
    with nodes:
        nodes.start(2, backend=BACKEND)
        check_membership(nodes.rendezvous_all(timeout=60))
    assert f"/torchelastic/p2p/run_{run_id}/rdzv/active_version" in etcd_keys(
        v3_only, "v3", f"/torchelastic/p2p/run_{run_id}"
    )


def test_garbage_in_the_state_key_is_a_clear_error_naming_the_key(
    tmp_path: Path, etcd: LocalEtcd, run_id: str, kv: KeyValue
) -> None:
    key = f"/torchelastic/p2p/run_{run_id}/rdzv/active_version"
    kv.put(key, '{"status": "joinable", "version": "1", "participa')
    with group(tmp_path, etcd, run_id, 1, 1) as nodes:
        (node,) = nodes.start(1, backend=BACKEND)
        node.send({"cmd": "rendezvous"})
        error = node.expect("error", timeout=30)
    assert error["type"] == "CorruptStateError"
    assert key in error["message"]
    assert "not JSON" in error["message"]
    # Never silently overwritten.
    assert kv.get(key).value.endswith("participa")


def test_a_node_with_a_smaller_max_than_the_run_gets_a_clear_error(
    tmp_path: Path, etcd: LocalEtcd, run_id: str, kv: KeyValue
) -> None:
    with group(tmp_path, etcd, run_id, 3, 3) as nodes:
        first_two = nodes.start(2, backend=BACKEND)
        for node in first_two:
            node.send({"cmd": "rendezvous"})
        wait_until(
            "two nodes joined version 1",
            lambda: joined_ranks(kv, run_id) == [0, 1],
            timeout=30,
        )
        # Launched with --nnodes 1:2 into a run of 3: it can never join without exceeding it.
        misfit = ParticipantGroup(
            tmp_path / "misfit", endpoint=etcd.endpoint, run_id=run_id, min_nodes=1,
            max_nodes=2, conf=FAST,
        )  # fmt: skip
        with misfit:
            (node,) = misfit.start(1, backend=BACKEND)
            node.send({"cmd": "rendezvous"})
            error = node.expect("error", timeout=30)
    assert error["type"] == "ConfigurationError", error
    assert "max_nodes 2" in error["message"] and "same --nnodes" in error["message"], error
