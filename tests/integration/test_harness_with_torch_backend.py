"""The participant harness against torch's own `etcd` backend, the reference we must match."""

from __future__ import annotations

from pathlib import Path

import pytest

from etcd_rdzv_devtools.local_etcd import LocalEtcd
from tests.conftest import only_etcd_api
from tests.support.harness import (
    ParticipantError,
    ParticipantGroup,
    check_membership,
    participants,
    rendezvous_together,
)

TORCH_BACKEND = "etcd"
# torch's backend waits `last_call_timeout` once min_nodes have joined; with min == max it
# closes at once, but its retry loops sleep about a second each.
RENDEZVOUS_TIMEOUT = 30.0
REQUEST_TIMEOUT = 10.0


@only_etcd_api("v2")  # torch's etcd backend speaks nothing else
def test_two_participants_rendezvous_and_share_the_store(
    etcd: LocalEtcd, run_id: str, tmp_path: Path
) -> None:
    with participants(
        2,
        backend=TORCH_BACKEND,
        endpoint=etcd.endpoint,
        run_id=run_id,
        min_nodes=2,
        max_nodes=2,
        tmp_dir=tmp_path,
        conf={"timeout": "60", "last_call_timeout": "1"},
        local_addr="127.0.0.1",
    ) as members:
        results = rendezvous_together(members, RENDEZVOUS_TIMEOUT)

        check_membership(results)
        assert {r["world_size"] for r in results} == {2}
        assert all(isinstance(r["version"], int) for r in results)
        assert {r["master_addr"] for r in results} == {"127.0.0.1"}

        by_rank = {r["rank"]: p for r, p in zip(results, members, strict=True)}
        by_rank[0].request({"cmd": "store_set", "key": "greeting", "value": "hello"}, 5.0)
        answer = by_rank[1].request(
            {"cmd": "store_wait", "keys": ["greeting"], "timeout_seconds": 5}, REQUEST_TIMEOUT
        )
        assert answer == {"event": "store_wait", "value": None}
        assert (
            by_rank[1].request({"cmd": "store_get", "key": "greeting"}, REQUEST_TIMEOUT)["value"]
            == "hello"
        )
        assert by_rank[1].request({"cmd": "store_check", "keys": ["greeting"]}, 5.0)["value"]

        counts = [
            p.request({"cmd": "store_add", "key": "counter", "amount": 1}, REQUEST_TIMEOUT)["value"]
            for p in members
        ]
        assert sorted(counts) == [1, 2]


@only_etcd_api("v2")  # torch's etcd backend speaks nothing else
def test_group_controls_the_run_and_reports_errors(
    etcd: LocalEtcd, run_id: str, tmp_path: Path
) -> None:
    with ParticipantGroup(
        tmp_path,
        endpoint=etcd.endpoint,
        run_id=run_id,
        min_nodes=2,
        max_nodes=2,
        conf={"timeout": "60", "last_call_timeout": "1"},
    ) as group:
        first, second = group.start(2, backend=TORCH_BACKEND)
        # Before any rendezvous there is no store: an error event, and the participant goes on.
        first.send({"cmd": "store_get", "key": "x"})
        error = first.expect("error", REQUEST_TIMEOUT)
        assert (error["where"], error["type"]) == ("store_get", "RuntimeError")
        results = group.rendezvous_all(RENDEZVOUS_TIMEOUT)
        check_membership(results)

        assert second.request({"cmd": "num_nodes_waiting"}, REQUEST_TIMEOUT)["value"] == 0
        assert second.request({"cmd": "is_closed"}, REQUEST_TIMEOUT)["value"] is False
        first.request({"cmd": "set_closed"}, REQUEST_TIMEOUT)
        assert second.request({"cmd": "is_closed"}, REQUEST_TIMEOUT)["value"] is True

        exit_codes = group.stop_all()
    assert exit_codes == {first.name: 0, second.name: 0}


@only_etcd_api("v2")  # torch's etcd backend speaks nothing else
def test_failures_are_reported_not_hidden(etcd: LocalEtcd, run_id: str, tmp_path: Path) -> None:
    with ParticipantGroup(
        tmp_path, endpoint=etcd.endpoint, run_id=run_id, min_nodes=2, max_nodes=2
    ) as group:
        with pytest.raises(ParticipantError, match=r"(?s)ValueError in create.*no-such-backend"):
            group.start(backend="no-such-backend")

        (alone,) = group.start(backend=TORCH_BACKEND)
        alone.send({"cmd": "rendezvous"})  # blocks: the second node never comes
        alone.pause()
        alone.resume()
        with pytest.raises(ParticipantError, match="no 'rendezvous' answer within"):
            alone.expect("rendezvous", timeout=0.5)
        alone.kill()
        with pytest.raises(ParticipantError, match=r"exited \(code -9\)"):
            alone.expect("rendezvous", timeout=REQUEST_TIMEOUT)
    assert all(p.process.poll() is not None for p in group.members)
