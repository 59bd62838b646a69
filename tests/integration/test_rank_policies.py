"""Rank policies against a real etcd, each node a process of its own: a node whose agent
restarts gets its rank back under `stable` (and under join order it does not, which shows the
test can tell), `status` shows who held which rank before, and bad platform ranks and a
policy mismatch fail with the nodes named."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from etcd_rdzv.cli import main
from etcd_rdzv.kv import KeyValue
from etcd_rdzv_devtools.local_etcd import LocalEtcd
from tests.conftest import only_etcd_api
from tests.integration.test_rendezvous import BACKEND, group
from tests.support.harness import Participant, joined_ranks, wait_ready
from tests.support.waiting import wait_until

pytestmark = only_etcd_api("v3")  # over v2 only join order exists (tests/unit/test_rank_policy)


def status_json(
    etcd: LocalEtcd, run_id: str, capsys: pytest.CaptureFixture[str]
) -> dict[str, object]:
    capsys.readouterr()
    assert main(["status", "--endpoint", etcd.endpoint, "--run-id", run_id, "--json"]) == 0
    document: dict[str, object] = json.loads(capsys.readouterr().out)
    return document


@pytest.mark.parametrize("policy", ["stable", "join_order"])
def test_a_restarted_node_gets_its_rank_back_under_stable_only(
    tmp_path: Path,
    etcd: LocalEtcd,
    run_id: str,
    kv: KeyValue,
    *,
    capsys: pytest.CaptureFixture[str],
    policy: str,
) -> None:
    with group(tmp_path, etcd, run_id, 3, 3, rank_policy=policy) as nodes:
        by_id: dict[str, Participant] = {}
        for name in ("node-a", "node-b", "node-c"):
            (by_id[name],) = nodes.start(backend=BACKEND, conf={"node_id": name})
        for node in by_id.values():
            node.send({"cmd": "rendezvous"})
        first = {name: node.expect_rendezvous(60)["rank"] for name, node in by_id.items()}
        # Kill the agent of rank 2 and start it again: it joins the next version first, so
        # by join order it would be rank 0.
        (victim,) = [name for name, rank in first.items() if rank == 2]
        by_id[victim].kill(signal.SIGKILL)
        (restarted,) = nodes.spawn(backend=BACKEND, conf={"node_id": victim})
        wait_ready([restarted])
        by_id[victim] = restarted
        restarted.send({"cmd": "rendezvous"})
        wait_until("the restarted node joined", lambda: joined_ranks(kv, run_id) == [0], 30)
        for name, node in by_id.items():
            if name != victim:
                node.send({"cmd": "rendezvous"})
        second = {name: node.expect_rendezvous(60)["rank"] for name, node in by_id.items()}
        document = status_json(etcd, run_id, capsys)
    if policy == "join_order":
        assert second[victim] == 0, (first, second)
        return
    assert second == first
    assert document["rank_policy"] == "stable" and document["previous_version"] == 1
    ranks = document["ranks"]
    assert isinstance(ranks, list)
    assert {r["node_id"]: (r["rank"], r["previous_rank"]) for r in ranks} == {
        name: (rank, rank) for name, rank in first.items()
    }


def test_status_shows_node_ids_and_previous_ranks(
    tmp_path: Path, etcd: LocalEtcd, run_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with group(tmp_path, etcd, run_id, 2, 2, rank_policy="host_order") as nodes:
        for name in ("vm-b", "vm-a"):
            nodes.start(backend=BACKEND, conf={"node_id": name})
        results = nodes.rendezvous_all(60)
        capsys.readouterr()
        assert main(["status", "--endpoint", etcd.endpoint, "--run-id", run_id]) == 0
        out = capsys.readouterr().out
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert "rank policy: host_order" in out
    header = next(line for line in out.splitlines() if line.split()[:2] == ["rank", "host"])
    assert header.rstrip().endswith("node id  previous rank"), out
    rows = [line.split() for line in out.splitlines() if line.strip()[:2] in ("0 ", "1 ")]
    assert [(row[0], row[-2], row[-1]) for row in rows] == [
        ("0", "vm-a", "none"),
        ("1", "vm-b", "none"),
    ]


def test_duplicate_ranks_from_the_environment_fail_every_node_naming_both(
    tmp_path: Path, etcd: LocalEtcd, run_id: str
) -> None:
    with group(tmp_path, etcd, run_id, 2, 2, rank_policy="from_env=GROUP_RANK") as nodes:
        for name in ("pod-a", "pod-b"):
            nodes.start(backend=BACKEND, conf={"node_id": name}, env={"GROUP_RANK": "0"})
        for node in nodes.members:
            node.send({"cmd": "rendezvous"})
        errors = [node.expect_answer(60) for node in nodes.members]
    for error in errors:
        assert error["event"] == "error", error
        message = str(error["message"])
        assert "GROUP_RANK=0 on 2 nodes: pod-" in message, message
        assert "pod-a (" in message and "pod-b (" in message, message
        assert "nobody has GROUP_RANK=1" in message, message


def test_nodes_with_another_rank_policy_are_refused_clearly(
    tmp_path: Path, etcd: LocalEtcd, run_id: str, kv: KeyValue
) -> None:
    with group(tmp_path, etcd, run_id, 2, 2) as nodes:
        (opener,) = nodes.start(backend=BACKEND, conf={"rank_policy": "stable"})
        opener.send({"cmd": "rendezvous"})
        wait_until("the opener joined", lambda: joined_ranks(kv, run_id) == [0], 30)
        (other,) = nodes.start(backend=BACKEND)
        other.send({"cmd": "rendezvous"})
        error = other.expect_answer(60)
    assert error["event"] == "error", error
    assert "opened with rank_policy=stable and this node has rank_policy=join_order" in str(
        error["message"]
    )
