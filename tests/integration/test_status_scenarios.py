"""`etcd-rdzv status` in the situations an SRE meets, with real agents over both etcd APIs.

Each test holds a run in one situation, asks `status` (in-process, `--json`, as a script
would), checks that it names the right ranks, hosts and pids and nothing false, then waits for
what it predicted and compares the time it happened with the time it said (within the second
of etcd's lease granularity and a second of scheduling).

Times: `status` speaks unix time; the harness stamps answers with the monotonic clock, so
answers are converted with the offset between the two clocks taken at the start.
"""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest

from etcd_rdzv.cli import main
from etcd_rdzv.kv import KeyValue
from etcd_rdzv.protocol import Status
from etcd_rdzv.status import EXIT_OK, Snapshot
from etcd_rdzv_devtools.local_etcd import LocalEtcd
from tests.conftest import EtcdFactory
from tests.integration.test_status import wait_for
from tests.support.harness import ParticipantGroup, check_membership

BACKEND = "etcd-rdzv"
CONSOLE_SCRIPT = Path(sys.executable).with_name("etcd-rdzv")
HOST = socket.gethostname()
# etcd grants leases in whole seconds, and the nodes act a scheduling delay after a deadline.
ON_TIME_SECONDS = 2.0


def group(tmp_path: Path, etcd: LocalEtcd, run_id: str, nodes: tuple[int, int],
          **conf: str) -> ParticipantGroup:  # fmt: skip
    settings = {"last_call_timeout": "1", "keep_alive_ttl": "2", "timeout": "60", **conf}
    return ParticipantGroup(
        tmp_path / run_id,
        endpoint=etcd.endpoint,
        run_id=run_id,
        min_nodes=nodes[0],
        max_nodes=nodes[1],
        conf=settings,
    )


def status(capsys: pytest.CaptureFixture[str], etcd: LocalEtcd, run_id: str) -> dict[str, Any]:
    capsys.readouterr()
    code = main(["status", "--endpoint", etcd.endpoint, "--run-id", run_id, "--json"])
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err
    document: dict[str, Any] = json.loads(out)
    return document


def text_status(capsys: pytest.CaptureFixture[str], etcd: LocalEtcd, run_id: str) -> str:
    capsys.readouterr()
    assert main(["status", "--endpoint", etcd.endpoint, "--run-id", run_id]) == EXIT_OK
    return capsys.readouterr().out


def wall(monotonic: float | None) -> float:
    assert monotonic is not None
    return monotonic + (time.time() - time.monotonic())


def by_rank(document: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {row["rank"]: row for row in document["ranks"]}


def state_is(status: Status, participants: int) -> Callable[[Snapshot], bool]:
    return lambda s: (
        s.state is not None and s.state.status is status and s.state.world_size == participants
    )


def test_two_of_three_nodes_up_names_both_and_when_the_first_times_out(
    tmp_path: Path, etcd: LocalEtcd, run_id: str, kv: KeyValue, capsys: pytest.CaptureFixture[str]
) -> None:
    with group(tmp_path, etcd, run_id, (3, 3), timeout="6") as nodes:
        up = nodes.start(2, backend=BACKEND)
        for node in up:
            node.send({"cmd": "rendezvous"})
        wait_for(kv, run_id, "two joined", state_is(Status.JOINABLE, 2), timeout=30)
        document = status(capsys, etcd, run_id)
        text = text_status(capsys, etcd, run_id)
        answers = [node.expect_answer(30) for node in up]
        gave_up = [wall(node.last_answer_at) for node in up]
    # No flags: min and max come from the state.
    assert (document["min_nodes"], document["max_nodes"]) == (3, 3)
    assert document["nodes_missing"] == 1
    assert "not arrived (1 node)" in text
    ranks = by_rank(document)
    assert sorted(ranks) == [0, 1]
    assert {row["phase"] for row in ranks.values()} == {"joined"}
    if kv.supports_claims:
        # The join claims name their nodes; torch's layout records none until confirmed.
        assert {row["pid"] for row in ranks.values()} == {node.pid for node in up}
    else:
        assert {row["pid"] for row in ranks.values()} == {None}
    (outlook,) = document["next"]
    assert "times out (timeout 6 s) and its agent fails" in outlook["what"]
    assert outlook["unless"] == "1 more node joins"
    # It comes true: the first node gives up when it said.
    assert {answer["type"] for answer in answers} == {"RendezvousTimeoutError"}
    assert abs(min(gave_up) - outlook["at"]) < ON_TIME_SECONDS, (gave_up, outlook)


def test_a_last_call_names_its_holder_and_freezes_when_it_said(
    tmp_path: Path, etcd: LocalEtcd, run_id: str, kv: KeyValue, capsys: pytest.CaptureFixture[str]
) -> None:
    with group(tmp_path, etcd, run_id, (2, 4), last_call_timeout="4") as nodes:
        up = nodes.start(2, backend=BACKEND)
        for node in up:
            node.send({"cmd": "rendezvous"})
        wait_for(kv, run_id, "two joined", state_is(Status.JOINABLE, 2), timeout=30)
        document = status(capsys, etcd, run_id)
        wait_for(kv, run_id, "frozen", lambda s: s.state is not None and
                 s.state.status is not Status.JOINABLE, timeout=30)  # fmt: skip
        frozen_at = time.time()
        results = [node.expect_rendezvous(30) for node in up]
    check_membership(results)
    holder = by_rank(document)[1]  # min 2: the second join holds the last call
    assert holder["phase"] == "last call"
    (outlook,) = document["next"]
    assert outlook["what"].startswith("rank 1")
    assert outlook["what"].endswith("freezes it with 2")
    if kv.supports_claims:
        member = next(r for r in results if r["rank"] == 1)
        assert holder["pid"] == member["pid"]
        assert f"pid {member['pid']}" in outlook["what"]
    # The watch in wait_for sees the freeze within milliseconds of it.
    assert abs(frozen_at - outlook["at"]) < ON_TIME_SECONDS, (frozen_at, outlook)


def test_a_node_frozen_before_it_confirms_is_named_and_left_out_when_it_said(
    tmp_path: Path, etcd: LocalEtcd, run_id: str, kv: KeyValue, capsys: pytest.CaptureFixture[str]
) -> None:
    """As a SIGSTOP between join and confirm: the others confirmed, the state expires."""
    with group(tmp_path, etcd, run_id, (3, 3), keep_alive_ttl="5") as nodes:
        (stalled,) = nodes.start(1, backend=BACKEND, gate_at="frozen")
        others = nodes.start(2, backend=BACKEND)
        for node in (stalled, *others):
            node.send({"cmd": "rendezvous"})
        held = stalled.expect_held("frozen", 60)
        wait_for(kv, run_id, "the two others confirmed",
                 lambda s: sum(1 for r in s.ranks if r.confirmed) == 2, timeout=30)  # fmt: skip
        document = status(capsys, etcd, run_id)
        text = text_status(capsys, etcd, run_id)
        wait_for(kv, run_id, "version 1 no longer frozen", lambda s: s.state is None
                 or not s.state.is_version(Status.FROZEN, 1), timeout=30)  # fmt: skip
        expired_at = time.time()
        stalled.release()
        deadline = time.monotonic() + 60
        results = [n.expect_rendezvous(deadline - time.monotonic()) for n in (stalled, *others)]
    check_membership(results)
    rank = held["rank"]
    rows = by_rank(document)
    assert rows[rank]["phase"] == "not confirmed"
    assert {rows[r]["phase"] for r in rows if r != rank} == {"confirmed"}
    assert document["confirmed"] == sorted({0, 1, 2} - {rank})
    (outlook,) = document["next"]
    assert outlook["what"].startswith("the frozen state expires and every node starts over")
    assert f"without rank {rank}" in outlook["what"]
    if kv.supports_claims:
        assert f"pid {stalled.pid}" in outlook["what"]
        assert rows[rank]["pid"] == stalled.pid
    assert {rows[r]["pid"] for r in rows if r != rank} == {n.pid for n in others}
    assert "not confirmed" in text and "next: at " in text
    assert abs(expired_at - outlook["at"]) < ON_TIME_SECONDS, (expired_at, outlook)


def test_a_killed_member_is_blamed_and_the_survivor_that_leaves_is_not(
    tmp_path: Path, etcd: LocalEtcd, run_id: str, kv: KeyValue, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGKILL of rank 0 after a completed rendezvous; then a survivor rendezvous again."""
    with group(tmp_path, etcd, run_id, (2, 3)) as nodes:
        members = nodes.start(3, backend=BACKEND)
        results = nodes.rendezvous_all(timeout=60, participants=members)
        check_membership(results)
        rank_of = {r["pid"]: r["rank"] for r in results}
        victim = next(p for p in members if rank_of[p.pid] == 0)
        survivors = [p for p in members if p is not victim]
        victim.kill()
        wait_for(kv, run_id, "rank 0's keep-alive expired",
                 lambda s: not any(r.keep_alive for r in s.ranks[:1]), timeout=30)  # fmt: skip
        lost = status(capsys, etcd, run_id)
        leaver = survivors[0]
        leaver.send({"cmd": "rendezvous"})
        wait_for(kv, run_id, "version 1 torn down, version 2 opened", lambda s:
                 s.state is not None and (s.state.version or 0) >= 2, timeout=30)  # fmt: skip
        after = status(capsys, etcd, run_id)
        survivors[1].send({"cmd": "rendezvous"})
        again = [p.expect_rendezvous(60) for p in survivors]
    check_membership(again)
    rows = by_rank(lost)
    assert rows[0]["phase"] == "lost (keep-alive gone)"
    assert {rows[r]["phase"] for r in (1, 2)} == {"member"}
    assert "rank 0's keep-alive is missing" in lost["diagnosis"]
    (outlook,) = lost["next"]
    assert "without rank 0" in outlook["what"]
    if kv.supports_claims:
        assert rows[0]["pid"] == victim.pid
        assert f"pid {victim.pid}" in outlook["what"]
    # The survivor that left first is named as leaving, and only rank 0 is blamed.
    (ended, *_) = after["history"]
    assert ended["version"] == 1
    assert ended["ended"] == "keep_alive_missing"
    assert ended["culprits"] == [0]
    assert ended["left"] == [rank_of[leaver.pid]]
    assert f"rank {rank_of[leaver.pid]} (" in ended["text"]
    assert f"pid {leaver.pid}) left" in ended["text"]
    # Over v3 its join claim still names the lost node; torch's layout kept no trace of it.
    named = f" (vm, pid {victim.pid})".replace("vm", HOST) if kv.supports_claims else ""
    assert f"the keep-alive of rank 0{named} expired" in ended["text"]


def test_watch_says_when_etcd_stops_answering_and_when_it_is_back(
    tmp_path: Path, etcd_factory: EtcdFactory, run_id: str
) -> None:
    server = etcd_factory()
    with group(tmp_path, server, run_id, (2, 2)) as nodes:
        (lone,) = nodes.start(1, backend=BACKEND)
        lone.send({"cmd": "rendezvous"})
        watcher = subprocess.Popen(
            [str(CONSOLE_SCRIPT), "status", "--endpoint", server.endpoint, "--run-id", run_id,
             "--json", "--watch", "--watch-timeout", "60", "--timeout", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert watcher.stdout is not None
            lines: queue.Queue[str | None] = queue.Queue()
            threading.Thread(target=_lines, args=(watcher.stdout, lines), daemon=True).start()

            def next_event(name: str) -> dict[str, Any]:
                for _ in range(20):
                    line = lines.get(timeout=30)
                    assert line is not None, "watch exited early"
                    document: dict[str, Any] = json.loads(line)
                    if document.get("event") == name:
                        return document
                raise AssertionError(f"no {name} event in 20 lines")

            first = json.loads(lines.get(timeout=30) or "{}")
            assert first.get("run_id") == run_id
            server.pause()
            try:
                down = next_event("etcd_unavailable")
            finally:
                server.resume()
            up = next_event("etcd_available")
            watcher.terminate()
            watcher.wait(10)
        finally:
            if watcher.poll() is None:
                watcher.kill()
                watcher.wait(5)
            lone.kill()
    assert "etcd stopped answering" in down["message"]
    assert server.endpoint in down["message"]
    assert "etcd answers again" in up["message"]


def _lines(stream: IO[str], sink: queue.Queue[str | None]) -> None:
    for line in stream:
        if line.strip():
            sink.put(line)
    sink.put(None)
