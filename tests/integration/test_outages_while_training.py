"""etcd away while a rendezvous is over and its members train, against a real etcd.

Each test completes a rendezvous of real participant processes (the handler as torchrun's
agent creates it), then takes etcd away: paused longer than the keep-alive TTL and than a
request's timeout. What torch calls meanwhile (`num_nodes_waiting`, `is_closed`, `shutdown`)
must answer without raising, the members' keep-alive keys must be back once etcd answers,
a node that died meanwhile must stay gone, and nobody may close a run others train in.
End to end with torchrun: tests/e2e/test_etcd_outages.py.
"""

from __future__ import annotations

import datetime
import threading
import time
from pathlib import Path

import pytest
from torch.distributed.elastic.rendezvous import RendezvousParameters

from etcd_rdzv.handler import EXIT_BARRIER_DONE, create_handler
from etcd_rdzv.kv import KeyNotFound, KeyValue
from etcd_rdzv.layouts import RunPaths
from etcd_rdzv.protocol import RendezvousState, Status
from etcd_rdzv.telemetry import NOOP_OBSERVER
from etcd_rdzv_devtools.local_etcd import LocalEtcd
from tests.conftest import EtcdFactory, open_kv
from tests.support.harness import (
    JsonDict,
    Participant,
    ParticipantGroup,
    check_membership,
    logged_events,
)
from tests.support.waiting import wait_until

BACKEND = "etcd-rdzv"
KEEP_ALIVE_TTL = 1.0
REQUEST_TIMEOUT = 1.5
CONF = {
    "timeout": "60",
    "last_call_timeout": "1",
    "keep_alive_ttl": f"{KEEP_ALIVE_TTL:g}",
    "request_timeout": f"{REQUEST_TIMEOUT:g}",
}
# Longer than a keep-alive TTL (plus v3's one second of lease slack) and than a request's
# timeout: every key expires, and every call made meanwhile fails.
PAUSE_SECONDS = max(3 * KEEP_ALIVE_TTL + 1.0, 2 * REQUEST_TIMEOUT)
RESULT_TIMEOUT = 60.0
# A call made during the pause returns after one request timeout; a loaded machine adds more.
CALL_TIMEOUT = REQUEST_TIMEOUT + 20.0


def paths_of(run_id: str) -> RunPaths:
    return RunPaths(f"/torchelastic/p2p/run_{run_id}")


def read_state(kv: KeyValue, run_id: str) -> RendezvousState | None:
    try:
        entry = kv.get(paths_of(run_id).active_version)
    except KeyNotFound:
        return None
    return RendezvousState.decode(entry.value, entry.key)


def live_keep_alives(kv: KeyValue, run_id: str, version: int) -> set[str]:
    prefix = paths_of(run_id).keep_alives(version)
    listing = kv.list(paths_of(run_id).version_dir(version))
    return {key for key in listing.keys if key.startswith(prefix)}


def formed(group: ParticipantGroup, count: int) -> tuple[list[Participant], int, list[JsonDict]]:
    """`count` new participants in one completed version: them, the version, their answers."""
    nodes = group.start(count, backend=BACKEND)
    results = group.rendezvous_all(RESULT_TIMEOUT)
    check_membership(results)
    (version,) = {result["version"] for result in results}
    return nodes, version, results


def group_of(tmp_path: Path, etcd: LocalEtcd, run_id: str, nodes: int) -> ParticipantGroup:
    return ParticipantGroup(
        tmp_path / run_id,
        endpoint=etcd.endpoint,
        run_id=run_id,
        min_nodes=nodes,
        max_nodes=nodes,
        conf=CONF,
    )


def test_members_answer_torch_and_keep_their_keys_through_an_outage(
    tmp_path: Path, etcd_factory: EtcdFactory, etcd_api: str, run_id: str
) -> None:
    server = etcd_factory()
    kv = open_kv(server, etcd_api)
    with group_of(tmp_path, server, run_id, 2) as group:
        nodes, version, _ = formed(group, 2)
        keys = {paths_of(run_id).keep_alive(version, rank) for rank in (0, 1)}
        assert live_keep_alives(kv, run_id, version) == keys

        server.pause()
        try:
            paused_at = time.monotonic()
            for node in nodes:
                assert node.request({"cmd": "num_nodes_waiting"}, CALL_TIMEOUT)["value"] == 0
                assert node.request({"cmd": "is_closed"}, CALL_TIMEOUT)["value"] is False
            # Let every lease and TTL run out while etcd is away.
            time.sleep(max(0.0, PAUSE_SECONDS - (time.monotonic() - paused_at)))
        finally:
            server.resume()

        wait_until(
            "both members' keep-alive keys back in the same final version",
            lambda: live_keep_alives(kv, run_id, version) == keys,
            timeout=10 * KEEP_ALIVE_TTL + REQUEST_TIMEOUT,
        )
        state = read_state(kv, run_id)
        assert state is not None and state.is_version(Status.FINAL, version)
        for node in nodes:
            assert node.request({"cmd": "num_nodes_waiting"}, CALL_TIMEOUT)["value"] == 0
            unanswered = logged_events(node, "etcd_unanswered_while_training")
            assert unanswered and unanswered[0]["call"] == "num_nodes_waiting", unanswered
            assert unanswered[0]["failures"] == 1 and unanswered[0]["run_id"] == run_id
            # Rate-limited: one warning for the outage, however many calls failed in it.
            assert len(unanswered) == 1, unanswered
            assert logged_events(node, "etcd_answered_again"), "the outage's end was not logged"
        # The keys stay: a refresher that restored its key goes on refreshing it.
        time.sleep(3 * KEEP_ALIVE_TTL)
        assert live_keep_alives(kv, run_id, version) == keys
        # Not necessarily both: a refresh sent during the pause may be served when etcd resumes,
        # before its TTL sweep, and that key never expires. Only members re-create keys.
        restored = [e["key"] for node in nodes for e in logged_events(node, "keep_alive_restored")]
        assert set(restored) <= keys and len(restored) == len(set(restored)), restored
    kv.close()


def test_a_member_that_died_during_the_outage_stays_gone_and_the_rest_reform(
    tmp_path: Path, etcd_factory: EtcdFactory, etcd_api: str, run_id: str
) -> None:
    server = etcd_factory()
    kv = open_kv(server, etcd_api)
    with group_of(tmp_path, server, run_id, 3) as group:
        group.min_nodes = 2  # the survivors may go on as two
        nodes, version, results = formed(group, 3)
        ranks = {node.name: result["rank"] for node, result in zip(nodes, results, strict=True)}
        victim, survivors = nodes[1], [nodes[0], nodes[2]]

        server.pause()
        try:
            victim.kill()
            time.sleep(PAUSE_SECONDS)
        finally:
            server.resume()

        dead_key = paths_of(run_id).keep_alive(version, ranks[victim.name])
        survivor_keys = {paths_of(run_id).keep_alive(version, ranks[s.name]) for s in survivors}
        wait_until(
            "the survivors' keys back",
            lambda: survivor_keys <= live_keep_alives(kv, run_id, version),
            timeout=10 * KEEP_ALIVE_TTL + REQUEST_TIMEOUT,
        )
        # Its owner is dead: nobody brings its key back, so its death is seen.
        time.sleep(3 * KEEP_ALIVE_TTL)
        assert dead_key not in live_keep_alives(kv, run_id, version)

        # As torchrun's agents do once the dead node's workers broke the collectives.
        results = group.rendezvous_all(RESULT_TIMEOUT, survivors)
        check_membership(results)
        assert {r["world_size"] for r in results} == {2}
        assert {r["version"] for r in results} == {version + 1}
    kv.close()


def test_shutdown_leaves_the_run_open_while_other_members_train(
    tmp_path: Path, etcd: LocalEtcd, kv: KeyValue, run_id: str
) -> None:
    with group_of(tmp_path, etcd, run_id, 3) as group:
        nodes, version, _ = formed(group, 3)
        assert nodes[0].request({"cmd": "shutdown"}, CALL_TIMEOUT)["value"] is True
        state = read_state(kv, run_id)
        assert state is not None and state.is_version(Status.FINAL, version)
        (left_open,) = logged_events(nodes[0], "run_left_open")
        assert left_open["reason"] == "members_training" and len(left_open["members"]) == 2
        assert nodes[1].request({"cmd": "shutdown"}, CALL_TIMEOUT)["value"] is True
        assert read_state(kv, run_id) == state
        # The last member out closes it.
        assert nodes[2].request({"cmd": "shutdown"}, CALL_TIMEOUT)["value"] is True
        closed = read_state(kv, run_id)
        assert closed is not None and closed.status is Status.CLOSED


def test_shutdown_closes_a_run_every_member_finished(
    tmp_path: Path, etcd: LocalEtcd, kv: KeyValue, run_id: str
) -> None:
    with group_of(tmp_path, etcd, run_id, 2) as group:
        nodes, _, _ = formed(group, 2)
        # torch's agent, once its workers succeeded: the exit barrier every member passes.
        for node in nodes:
            node.request(
                {"cmd": "store_add", "key": "torchelastic/agent/terminal_state/num_members",
                 "amount": 1},
                CALL_TIMEOUT,
            )  # fmt: skip
        nodes[1].request(
            {"cmd": "store_set", "key": EXIT_BARRIER_DONE,
             "value": "<val_ignored>"},
            CALL_TIMEOUT,
        )  # fmt: skip
        # The other member has not left yet, but the job is over: the first out closes.
        assert nodes[0].request({"cmd": "shutdown"}, CALL_TIMEOUT)["value"] is True
        state = read_state(kv, run_id)
        assert state is not None and state.status is Status.CLOSED


def test_shutdown_during_an_outage_leaves_the_run_open(
    tmp_path: Path, etcd_factory: EtcdFactory, etcd_api: str, run_id: str
) -> None:
    server = etcd_factory()
    kv = open_kv(server, etcd_api)
    with group_of(tmp_path, server, run_id, 2) as group:
        nodes, version, _ = formed(group, 2)
        server.pause()
        try:
            assert nodes[0].request({"cmd": "shutdown"}, CALL_TIMEOUT)["value"] is False
        finally:
            server.resume()
        (left_open,) = logged_events(nodes[0], "run_left_open")
        assert left_open["reason"] == "etcd_unanswered"
        # Nothing closes it behind the other member's back once etcd is back.
        time.sleep(3 * KEEP_ALIVE_TTL)
        state = read_state(kv, run_id)
        assert state is not None and state.is_version(Status.FINAL, version)
    kv.close()


@pytest.mark.parametrize("operation", ["get", "set"])
def test_the_store_waits_out_an_outage(
    etcd_factory: EtcdFactory, etcd_api: str, run_id: str, operation: str
) -> None:
    """torch's agent reads and writes the store after a rendezvous and in its exit barrier:
    an etcd away for longer than a request's timeout costs those calls time, not a failure."""
    server = etcd_factory()
    params = RendezvousParameters(
        backend=BACKEND,
        endpoint=server.endpoint,
        run_id=run_id,
        min_nodes=1,
        max_nodes=1,
        **CONF,
    )
    handler = create_handler(params, observer=NOOP_OBSERVER)
    try:
        store = handler.next_rendezvous().store
        store.set_timeout(datetime.timedelta(seconds=60))
        outcome: dict[str, object] = {}

        def call() -> None:
            try:
                if operation == "get":
                    outcome["value"] = store.get("written-after-the-outage")
                else:
                    store.set("written-during-the-outage", "ok")
                    outcome["value"] = b"set"
            except Exception as error:
                outcome["error"] = error

        server.pause()
        worker = threading.Thread(target=call, daemon=True)
        try:
            worker.start()
            time.sleep(2 * REQUEST_TIMEOUT)
            assert worker.is_alive(), f"the store gave up while etcd was away: {outcome}"
        finally:
            server.resume()
        if operation == "get":
            store.set("written-after-the-outage", "ok")
        worker.join(timeout=30)
        assert not worker.is_alive()
        assert outcome == {"value": b"ok" if operation == "get" else b"set"}
        if operation == "set":
            assert store.get("written-during-the-outage") == b"ok"
    finally:
        handler.shutdown()
