"""`etcd-rdzv status` against a real etcd while real participants hold each rendezvous state.

The command runs in-process through `etcd_rdzv.cli.main` (output via capsys), and once as the
installed console script. Waiting for a state uses etcd watches, not sleeps.
"""

from __future__ import annotations

import json
import queue
import re
import signal
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
from etcd_rdzv.status import (
    EXIT_CONFIG,
    EXIT_ETCD,
    EXIT_OK,
    EXIT_UNKNOWN_RUN,
    Snapshot,
    UnknownRun,
    read_snapshot,
)
from etcd_rdzv_devtools.local_etcd import LocalEtcd, free_loopback_ports
from tests.support.harness import ParticipantGroup, check_membership

BACKEND = "etcd-rdzv"
PREFIX = "/torchelastic/p2p"
FAST = {"last_call_timeout": "1", "keep_alive_ttl": "2", "timeout": "60"}
CONSOLE_SCRIPT = Path(sys.executable).with_name("etcd-rdzv")
HOST = socket.gethostname()


def group(tmp_path: Path, etcd: LocalEtcd, run_id: str, min_nodes: int, max_nodes: int
          ) -> ParticipantGroup:  # fmt: skip
    return ParticipantGroup(
        tmp_path / run_id,
        endpoint=etcd.endpoint,
        run_id=run_id,
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        conf=FAST,
    )


def wait_for(
    kv: KeyValue, run_id: str, condition: str, check: Callable[[Snapshot], bool], timeout: float
) -> Snapshot:
    """Read the run, and watch for its next change until `check` holds; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            snapshot: Snapshot | None = read_snapshot(kv, run_id, PREFIX)
            revision = snapshot.revision if snapshot else 0
        except UnknownRun as absent:
            snapshot, revision = None, absent.revision or 0
        if snapshot is not None and check(snapshot):
            return snapshot
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"not within {timeout}s: {condition}")
        kv.watch(f"{PREFIX}/run_{run_id}/rdzv", revision, left, recursive=True)


def status(
    capsys: pytest.CaptureFixture[str], etcd: LocalEtcd, run_id: str, *extra: str
) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["status", "--endpoint", etcd.endpoint, "--run-id", run_id, *extra])
    out, err = capsys.readouterr()
    return code, out, err


def diagnosis(out: str) -> str:
    (line,) = [line for line in out.splitlines() if line.startswith("diagnosis: ")]
    return line.removeprefix("diagnosis: ")


def test_joinable_waiting_for_more_nodes(
    tmp_path: Path, etcd: LocalEtcd, run_id: str, kv: KeyValue, capsys: pytest.CaptureFixture[str]
) -> None:
    with group(tmp_path, etcd, run_id, 2, 2) as nodes:
        (lone,) = nodes.start(1, backend=BACKEND)
        lone.send({"cmd": "rendezvous"})
        wait_for(
            kv,
            run_id,
            "the lone node joined",
            lambda s: s.state is not None and s.state.status is Status.JOINABLE
            and s.state.world_size == 1,
            timeout=30,
        )  # fmt: skip
        # No flags: the node that opened the version recorded --nnodes 2:2 in the state.
        code, out, err = status(capsys, etcd, run_id)
        assert code == EXIT_OK, err
        assert diagnosis(out) == (
            "joinable with 1 participant (min 2, max 2): waiting for 1 more node"
        )
        assert "state: joinable" in out
        # The node that opened the version stamped when the state became joinable.
        assert re.search(r"state since: \d\d:\d\d:\d\d \(\d+\.\d s ago\)", out), out

        code, out, err = status(capsys, etcd, run_id, "--json")
        assert code == EXIT_OK, err
        document = json.loads(out)
        # Blocked in its rendezvous, it cannot answer a polite exit: no need to wait for that.
        lone.kill()
    assert document["status"] == "joinable"
    assert document["participants"] == [0]
    assert (document["min_nodes"], document["max_nodes"]) == (2, 2)
    # Ranks publish keep-alive keys only when they confirm, after the join window closes.
    (joined,) = document["ranks"]
    assert joined["keep_alive"] is False
    assert joined["confirmed"] is None
    # Under claims (v3) the join itself names its node; torch's layout (v2) cannot yet.
    named = (joined["host"], joined["pid"])
    assert named == ((socket.gethostname(), lone.pid) if kv.supports_claims else (None, None))


def test_frozen_waiting_for_confirmations(
    etcd: LocalEtcd,
    etcd_api: str,
    run_id: str,
    kv: KeyValue,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A frozen version lasts only until its last confirmation, too short to hold with real
    # nodes, so this test writes one itself, as each key layout leaves it: rank 0 and rank 1
    # published their keep-alive keys (with an etcd-rdzv identity), rank 2 has done neither.
    # In torch's layout (v2, formatted as torch's backend does) a confirmation is also listed
    # in the state, and only rank 0's is. In the claims layout (v3) the key is the
    # confirmation, and the frozen state lists none until final.
    rdzv = f"{PREFIX}/run_{run_id}/rdzv"
    listed = [f"{rdzv}/v_1/rank_0"] if etcd_api == "v2" else []
    state = {"status": "frozen", "version": "1", "participants": [0, 1, 2], "keep_alives": listed}
    kv.put(f"{rdzv}/version_counter", "1")
    kv.put(f"{rdzv}/active_version", json.dumps(state), ttl=60)
    for rank, host in ((0, "host-a"), (1, "host-b")):
        identity = {"host": host, "addr": f"10.0.0.{rank}", "pid": 100 + rank}
        kv.put(f"{rdzv}/v_1/rank_{rank}", json.dumps(identity), ttl=60)

    code, out, err = status(capsys, etcd, run_id)
    assert code == EXIT_OK, err
    if etcd_api == "v2":
        expected = (
            "ranks 1 and 2 have not confirmed (1 of 3 confirmed; last seen on host-b (pid 101))"
        )
        confirmed = [0]
    else:
        expected = "rank 2 has not confirmed (2 of 3 confirmed; no keep-alive key from them yet)"
        confirmed = [0, 1]
    assert diagnosis(out) == f"frozen: {expected}"
    assert f"confirmed: {len(confirmed)}/3" in out

    code, out, _ = status(capsys, etcd, run_id, "--json")
    document = json.loads(out)
    assert document["layout"] == ("torch" if etcd_api == "v2" else "claims")
    assert document["confirmed"] == confirmed
    assert [(r["rank"], r["keep_alive"], r["confirmed"], r["host"], r["addr"], r["pid"])
            for r in document["ranks"]] == [
        (0, True, True, "host-a", "10.0.0.0", 100),
        (1, True, etcd_api == "v3", "host-b", "10.0.0.1", 101),
        (2, False, False, None, None, None),
    ]  # fmt: skip


def test_a_node_stalled_between_join_and_confirm_is_named_and_nothing_false_is_said(
    tmp_path: Path, etcd: LocalEtcd, run_id: str, kv: KeyValue, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three real agents, one held after the freeze before it confirms (as a SIGSTOP there
    would): the other two confirmed, and `status` says so in either key layout."""
    with group(tmp_path, etcd, run_id, 3, 3) as nodes:
        (stalled,) = nodes.start(1, backend=BACKEND, gate_at="frozen")
        others = nodes.start(2, backend=BACKEND)
        for node in (stalled, *others):
            node.send({"cmd": "rendezvous"})
        held = stalled.expect_held("frozen", 60)
        wait_for(
            kv, run_id, "the two others confirmed",
            lambda s: sum(1 for r in s.ranks if r.confirmed) == 2, timeout=30,
        )  # fmt: skip
        code, out, err = status(capsys, etcd, run_id)
        assert code == EXIT_OK, err
        code, json_out, _ = status(capsys, etcd, run_id, "--json")
        stalled.release()
        deadline = time.monotonic() + 60
        results = [n.expect_rendezvous(deadline - time.monotonic()) for n in (stalled, *others)]
    check_membership(results)  # the held node was released: it is a member like the others
    rank = held["rank"]
    text = diagnosis(out)
    assert text.startswith(f"frozen: rank {rank} has not confirmed (2 of 3 confirmed; "), text
    if kv.supports_claims:
        # Its join claim names it: host and pid of the stalled process.
        assert f"last seen on {socket.gethostname()} (pid {stalled.pid})" in text, text
    else:
        assert "no keep-alive key from them yet" in text, text
    document = json.loads(json_out)
    assert document["confirmed"] == sorted({0, 1, 2} - {rank})
    ranks = {r["rank"]: r for r in document["ranks"]}
    assert ranks[rank]["confirmed"] is False and ranks[rank]["keep_alive"] is False
    pids = {ranks[r]["pid"] for r in ranks if r != rank}
    assert pids == {node.pid for node in others}


def test_final_with_a_late_node_waiting(
    tmp_path: Path, etcd: LocalEtcd, run_id: str, kv: KeyValue, capsys: pytest.CaptureFixture[str]
) -> None:
    with group(tmp_path, etcd, run_id, 2, 3) as nodes:
        members = nodes.start(2, backend=BACKEND)
        results = nodes.rendezvous_all(timeout=60, participants=members)
        check_membership(results)
        (late,) = nodes.start(1, backend=BACKEND)
        late.send({"cmd": "rendezvous"})
        wait_for(
            kv,
            run_id,
            "the late node counted as waiting",
            lambda s: s.state is not None and (s.state.num_workers_waiting or 0) >= 1,
            timeout=30,
        )
        code, out, err = status(capsys, etcd, run_id, "--min-nodes", "2", "--max-nodes", "3")
        assert code == EXIT_OK, err
        assert diagnosis(out) == (
            "final with 1 node waiting: members will re-rendezvous (2 members now)"
        )
        code, out, err = status(capsys, etcd, run_id, "--json")
        document = json.loads(out)
        late.kill()  # blocked in its rendezvous, it cannot answer a polite exit
    assert document["status"] == "final"
    assert document["nodes_waiting"] == 1
    # The state only counts it; the waiting node's own key says who it is.
    (waiting,) = document["waiting"]
    assert (waiting["host"], waiting["pid"]) == (HOST, late.pid)
    assert document["confirmed"] == [0, 1]
    by_rank = {r["rank"]: r for r in document["ranks"]}
    # Each rank's keep-alive key names the very process that holds the rank.
    for result in results:
        shown = by_rank[result["rank"]]
        assert (shown["keep_alive"], shown["host"], shown["pid"]) == (True, HOST, result["pid"])
        # Renewed within its TTL (10 s by default), with the rest of the TTL still to run.
        assert 0 <= shown["keep_alive_age_seconds"] <= 10, shown
        assert 0 < shown["keep_alive_expires_in_seconds"] <= 10, shown


def test_closed(
    tmp_path: Path, etcd: LocalEtcd, run_id: str, kv: KeyValue, capsys: pytest.CaptureFixture[str]
) -> None:
    with group(tmp_path, etcd, run_id, 1, 1) as nodes:
        (member,) = nodes.start(1, backend=BACKEND)
        member.rendezvous(timeout=30)
        member.request({"cmd": "set_closed"}, 10)
    code, out, err = status(capsys, etcd, run_id)
    assert code == EXIT_OK, err
    assert diagnosis(out) == "closed: no node can join"

    # Nothing changes: the watch prints the one rendering and ends at its timeout.
    started = time.monotonic()
    code, out, err = status(capsys, etcd, run_id, "--watch", "--watch-timeout", "1", "--json")
    assert code == EXIT_OK, err
    assert time.monotonic() - started >= 1
    assert [json.loads(line)["status"] for line in out.splitlines()] == ["closed"]


def _lines(stream: IO[str], sink: queue.Queue[str | None]) -> None:
    for line in stream:
        sink.put(line)
    sink.put(None)


def test_watch_as_the_console_script_renders_each_change(
    tmp_path: Path, etcd: LocalEtcd, run_id: str, kv: KeyValue
) -> None:
    with group(tmp_path, etcd, run_id, 2, 2) as nodes:
        (first,) = nodes.start(1, backend=BACKEND)
        first.send({"cmd": "rendezvous"})
        wait_for(kv, run_id, "the first node joined",
                 lambda s: s.state is not None and s.state.world_size == 1, timeout=30)  # fmt: skip
        watcher = subprocess.Popen(
            [str(CONSOLE_SCRIPT), "status", "--endpoint", etcd.endpoint, "--run-id", run_id,
             "--min-nodes", "2", "--json", "--watch", "--watch-timeout", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert watcher.stdout is not None
            lines: queue.Queue[str | None] = queue.Queue()
            threading.Thread(target=_lines, args=(watcher.stdout, lines), daemon=True).start()
            seen: list[dict[str, Any]] = []

            def next_rendering() -> dict[str, Any]:
                line = lines.get(timeout=30)
                assert line is not None, f"watch exited early: {watcher.stderr}"
                document: dict[str, Any] = json.loads(line)
                seen.append(document)
                return document

            assert next_rendering()["status"] == "joinable"
            (second,) = nodes.start(1, backend=BACKEND)
            second.send({"cmd": "rendezvous"})
            check_membership([p.expect_rendezvous(60) for p in (first, second)])
            while seen[-1]["status"] != "final" or len(seen[-1]["confirmed"]) < 2:
                next_rendering()
            # Ctrl-C ends a watch cleanly.
            watcher.send_signal(signal.SIGINT)
            assert watcher.wait(10) == EXIT_OK
            assert watcher.stderr is not None
            assert "Traceback" not in watcher.stderr.read()
        finally:
            if watcher.poll() is None:
                watcher.kill()
                watcher.wait(5)
    assert len(seen) >= 2
    assert seen[-1]["diagnosis"] == "final with 2 participants: complete, every keep-alive is live"
    assert seen[-1]["state_since"] is not None


def test_unreachable_etcd_names_the_endpoint(
    run_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (port,) = free_loopback_ports(1)
    endpoint = f"127.0.0.1:{port}"
    capsys.readouterr()
    started = time.monotonic()
    code = main(["status", "--endpoint", endpoint, "--run-id", run_id, "--timeout", "1"])
    elapsed = time.monotonic() - started
    _, err = capsys.readouterr()
    assert code == EXIT_ETCD
    assert endpoint in err
    assert "did not answer" in err
    assert "Traceback" not in err
    assert elapsed < 5


def test_unknown_run_id(etcd: LocalEtcd, run_id: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = status(capsys, etcd, run_id, "--prefix", "/elsewhere/")
    assert code == EXIT_UNKNOWN_RUN
    assert out == ""
    assert err.strip() == (
        f"etcd-rdzv status: error: no rendezvous state for run {run_id!r} under /elsewhere: "
        "check --run-id and --prefix"
    )


def test_garbage_state_names_the_key(
    etcd: LocalEtcd, run_id: str, kv: KeyValue, capsys: pytest.CaptureFixture[str]
) -> None:
    key = f"{PREFIX}/run_{run_id}/rdzv/active_version"
    kv.put(key, '{"status": "joinable", "version": "1", "participa')
    code, out, err = status(capsys, etcd, run_id)
    assert (code, out) == (EXIT_CONFIG, "")
    assert key in err
    assert "not JSON" in err
    assert "Traceback" not in err
    # Read-only: never repaired.
    assert kv.get(key).value.endswith("participa")


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:2379", "host:port", "a:99999"])
def test_malformed_endpoint(endpoint: str, run_id: str, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    code = main(["status", "--endpoint", endpoint, "--run-id", run_id])
    _, err = capsys.readouterr()
    assert code == EXIT_CONFIG
    assert err.startswith("etcd-rdzv status: error: ")
    assert endpoint in err
