"""The c10d Store of a completed rendezvous, shared by separate processes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from etcd_rdzv_devtools.local_etcd import LocalEtcd
from tests.conftest import only_etcd_api
from tests.support.harness import Participant, ParticipantGroup, check_membership

ADDS_PER_NODE = 25


def rendezvoused(
    tmp_path: Path, etcd: LocalEtcd, run_id: str, backends: list[str]
) -> tuple[ParticipantGroup, list[Participant]]:
    nodes = ParticipantGroup(
        tmp_path, endpoint=etcd.endpoint, run_id=run_id, min_nodes=len(backends),
        max_nodes=len(backends), conf={"last_call_timeout": "1"},
    )  # fmt: skip
    for backend in backends:
        nodes.start(1, backend=backend)
    results = nodes.rendezvous_all(timeout=60)
    check_membership(results)
    by_rank = sorted(zip(results, nodes.members, strict=True), key=lambda pair: pair[0]["rank"])
    return nodes, [participant for _, participant in by_rank]


def test_values_set_by_one_rank_are_read_by_the_others(
    tmp_path: Path, etcd: LocalEtcd, run_id: str
) -> None:
    nodes, ranks = rendezvoused(tmp_path, etcd, run_id, ["etcd-rdzv"] * 3)
    with nodes:
        for reader in ranks[1:]:
            # get() blocks until the value exists: ask first, set afterwards.
            reader.send({"cmd": "store_get", "key": "greeting"})
        ranks[0].request({"cmd": "store_set", "key": "greeting", "value": "hello ü"}, 10)
        values = [reader.expect("store_get", 30)["value"] for reader in ranks[1:]]
        checked = ranks[2].request({"cmd": "store_check", "keys": ["greeting", "absent"]}, 10)
    assert values == ["hello ü", "hello ü"]
    assert checked["value"] is False


def test_add_is_atomic_under_concurrency(tmp_path: Path, etcd: LocalEtcd, run_id: str) -> None:
    nodes, ranks = rendezvoused(tmp_path, etcd, run_id, ["etcd-rdzv"] * 4)
    with nodes:
        for _ in range(ADDS_PER_NODE):
            for participant in ranks:
                participant.send({"cmd": "store_add", "key": "counter", "amount": 1})
        returned = [
            participant.expect("store_add", 60)["value"]
            for participant in ranks
            for _ in range(ADDS_PER_NODE)
        ]
    total = len(ranks) * ADDS_PER_NODE
    # Every increment returned a distinct running total: none was lost or applied twice.
    assert sorted(returned) == list(range(1, total + 1))


def test_wait_times_out_cleanly(tmp_path: Path, etcd: LocalEtcd, run_id: str) -> None:
    nodes, ranks = rendezvoused(tmp_path, etcd, run_id, ["etcd-rdzv"])
    with nodes:
        started = time.monotonic()
        ranks[0].send({"cmd": "store_wait", "keys": ["never"], "timeout_seconds": 1})
        error = ranks[0].expect("error", 30)
        elapsed = time.monotonic() - started
        # The store still serves after a timed-out wait.
        ranks[0].request({"cmd": "store_set", "key": "after", "value": "1"}, 10)
    assert error["type"] == "LookupError"
    assert "never" in error["message"]
    assert 1 <= elapsed < 10


@only_etcd_api("v2")  # torch's EtcdStore speaks nothing else
@pytest.mark.parametrize("writer_backend", ["etcd", "etcd-rdzv"])
def test_store_is_shared_with_torch_etcd_store(
    tmp_path: Path, etcd: LocalEtcd, run_id: str, writer_backend: str
) -> None:
    backends = [writer_backend, "etcd-rdzv" if writer_backend == "etcd" else "etcd"]
    nodes, _ = rendezvoused(tmp_path, etcd, run_id, backends)
    writer, reader = nodes.members
    with nodes:
        writer.request({"cmd": "store_set", "key": "from-writer", "value": writer_backend}, 10)
        value = reader.request({"cmd": "store_get", "key": "from-writer"}, 30)["value"]
        added = reader.request({"cmd": "store_add", "key": "n", "amount": 5}, 10)["value"]
        total = writer.request({"cmd": "store_add", "key": "n", "amount": 2}, 10)["value"]
    assert value == writer_backend
    assert (added, total) == (5, 7)
