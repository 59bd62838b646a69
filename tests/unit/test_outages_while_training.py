"""What a member does while etcd does not answer and once it answers again, without I/O.

The pure decisions (may a vanished keep-alive key be re-created, who trains on if this node
leaves), the handler's answers to torch's monitor loop against a `KeyValue` that answers or
not at the test's word, and the rate limit of the outage's log line.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from torch.distributed.elastic.agent.server import api as torch_agent_api
from torch.distributed.elastic.utils import store as torch_store_util

from etcd_rdzv import protocol
from etcd_rdzv.config import RendezvousConfig, parse_endpoints
from etcd_rdzv.errors import EtcdUnavailableError
from etcd_rdzv.handler import EXIT_BARRIER_DONE, EtcdContact, EtcdRdzvHandler, MasterAddress
from etcd_rdzv.kv import Entry, KeyNotFound, KeyValue, Listing
from etcd_rdzv.layouts import RunPaths
from etcd_rdzv.protocol import RendezvousState, Status
from etcd_rdzv.rendezvous import EtcdRendezvous, Membership
from etcd_rdzv.telemetry import Observer
from etcd_rdzv.telemetry.logging import EVENT_LOGGER_NAME, LoggingObserver

PATHS = RunPaths("/torchelastic/p2p/run_job")
KEY_0, KEY_1, KEY_2 = (PATHS.keep_alive(4, rank) for rank in range(3))
FINAL = RendezvousState(Status.FINAL, 4, (0, 1, 2), keep_alives=(KEY_0, KEY_1, KEY_2))
FROZEN = RendezvousState(Status.FROZEN, 4, (0, 1, 2), keep_alives=(KEY_0,))


# --- may a member re-create its keep-alive key? ----------------------------------------------


@pytest.mark.parametrize(
    ("state", "rank", "key", "expected"),
    [
        (FINAL, 1, KEY_1, True),
        (FROZEN, 2, KEY_2, True),  # confirmed, waiting for the others: still a participant
        (FROZEN, 3, PATHS.keep_alive(4, 3), False),  # not among the frozen participants
        (RendezvousState(Status.FINAL, 4, (0, 1), keep_alives=(KEY_0, KEY_1)), 2, KEY_2, False),
        (RendezvousState(Status.FINAL, 5, (0, 1, 2), keep_alives=()), 1, KEY_1, False),
        (RendezvousState(Status.JOINABLE, 4, (0, 1, 2)), 1, KEY_1, False),
        (RendezvousState(Status.CLOSED, 4, (0, 1, 2), keep_alives=(KEY_1,)), 1, KEY_1, False),
        (None, 1, KEY_1, False),  # torn down: nothing to come back to
    ],
    ids=[
        "final-counts-it",
        "frozen-participant",
        "frozen-outsider",
        "final-without-it",
        "another-version",
        "joinable",
        "closed",
        "torn-down",
    ],
)
def test_a_vanished_keep_alive_comes_back_only_into_the_version_that_counts_it(
    state: RendezvousState | None, rank: int, key: str, expected: bool
) -> None:
    assert protocol.may_restore_keep_alive(state, 4, rank, key) is expected


def test_members_left_training_are_the_other_live_members_of_the_final_version() -> None:
    live = {KEY_0, KEY_2, PATHS.store(4)}
    assert protocol.members_left_training(FINAL, KEY_0, live) == [KEY_2]
    assert protocol.members_left_training(FINAL, KEY_1, live) == [KEY_0, KEY_2]
    # A node of no version (it waited for the next one) leaves all of them behind.
    assert protocol.members_left_training(FINAL, None, live) == [KEY_0, KEY_2]
    assert protocol.members_left_training(FINAL, KEY_0, {KEY_0}) == []
    assert protocol.members_left_training(FROZEN, KEY_1, live) == []
    assert protocol.members_left_training(None, KEY_1, live) == []


def test_the_exit_barrier_key_is_torchs() -> None:
    prefix = torch_agent_api._TERMINAL_STATE_SYNC_ID
    assert prefix + torch_store_util._LAST_MEMBER_CHECKIN == EXIT_BARRIER_DONE


# --- the outage as the observer sees it ------------------------------------------------------


class Recorder(Observer):
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def etcd_unanswered(
        self, call: str, reason: str, detail: str, failures: int, outage_seconds: float
    ) -> None:
        self.calls.append(("unanswered", (call, reason, failures, outage_seconds)))

    def etcd_answered_again(self, call: str, failures: int, outage_seconds: float) -> None:
        self.calls.append(("answered_again", (call, failures, outage_seconds)))

    def nodes_waiting(self, count: int) -> None:
        self.calls.append(("nodes_waiting", (count,)))

    def run_left_open(self, version: int | None, reason: str, members: Any) -> None:
        self.calls.append(("left_open", (version, reason, list(members))))

    def closed_while_training(self, version: int) -> None:
        self.calls.append(("closed_while_training", (version,)))

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [args for called, args in self.calls if called == name]


def test_contact_reports_each_failure_and_the_end_of_the_outage_once() -> None:
    now = [100.0]
    recorder = Recorder()
    contact = EtcdContact(recorder, clock=lambda: now[0])
    contact.answered("num_nodes_waiting")  # no outage: nothing to report
    contact.failed("num_nodes_waiting", EtcdUnavailableError("down"))
    now[0] = 104.0
    contact.failed("is_closed", EtcdUnavailableError("down"))
    assert not contact.answering
    now[0] = 110.5
    contact.answered("num_nodes_waiting")
    contact.answered("num_nodes_waiting")
    assert recorder.calls == [
        ("unanswered", ("num_nodes_waiting", "unavailable", 1, 0.0)),
        ("unanswered", ("is_closed", "unavailable", 2, 4.0)),
        ("answered_again", ("num_nodes_waiting", 2, 10.5)),
    ]
    assert contact.answering


# --- the handler against an etcd that answers at the test's word ------------------------------


class SwitchableEtcd(KeyValue):
    """Holds the run's state document and live keys; raises like a transport whose etcd is
    gone while `answering` is False. Records every write: a handler must not write blind."""

    def __init__(self, state: RendezvousState | None, live: set[str]) -> None:
        self.state = state
        self.live = set(live)
        self.answering = True
        self.writes: list[str] = []

    def _reach(self, what: str) -> None:
        if not self.answering:
            raise EtcdUnavailableError(f"etcd at 127.0.0.1:2379 did not answer {what}")

    def describe(self) -> str:
        return "127.0.0.1:2379"

    def get(self, key: str) -> Entry:
        self._reach(f"get {key}")
        if key == PATHS.active_version and self.state is not None:
            return Entry(key, self.state.encode(), 7, 9)
        raise KeyNotFound(key, 9)

    def list(self, prefix: str) -> Listing:
        self._reach(f"list {prefix}")
        below = prefix.rstrip("/") + "/"
        keys = (key for key in self.live if key.startswith(below))
        return Listing(tuple(Entry(key, "{}", 5, 9) for key in sorted(keys)), 9)

    def _write(self, key: str) -> Entry:
        self._reach(f"write {key}")
        self.writes.append(key)
        return Entry(key, "", 10, 10)

    def create(self, key: str, value: str, ttl: float | None = None) -> Entry:
        return self._write(key)

    def put(self, key: str, value: str, ttl: float | None = None) -> Entry:
        return self._write(key)

    def compare_and_swap(
        self, key: str, value: str, expected: Entry, ttl: float | None = None
    ) -> Entry:
        if key == PATHS.active_version:
            self._reach(f"write {key}")
            self.state = RendezvousState.decode(value, key)
        return self._write(key)

    def compare_and_delete(self, key: str, expected: Entry) -> None:
        self._write(key)

    def refresh(self, key: str, ttl: float) -> None:
        self._reach(f"refresh {key}")

    def ensure_directory(self, key: str, ttl: float | None = None) -> None:
        self._reach(f"mkdir {key}")

    def watch(self, key: str, after_revision: int, timeout: float, recursive: bool = False) -> None:
        self._reach(f"watch {key}")

    def close(self) -> None:
        pass


@pytest.fixture
def member() -> Iterator[tuple[EtcdRdzvHandler, SwitchableEtcd, Recorder]]:
    """Rank 0 of final version 4 of three, training; ranks 1 and 2 alive."""
    # The fake speaks no claims, as the v2 transport: torch's key layout.
    config = RendezvousConfig(
        "job", parse_endpoints("127.0.0.1:2379"), 3, 3, request_timeout=1, etcd_api="v2"
    )
    etcd = SwitchableEtcd(FINAL, {KEY_0, KEY_1, KEY_2})
    recorder = Recorder()
    rendezvous = EtcdRendezvous(etcd, config, recorder)
    handler = EtcdRdzvHandler(rendezvous, etcd, recorder, MasterAddress(etcd, config))
    handler.last_membership = Membership(version=4, rank=0, world_size=3)
    yield handler, etcd, recorder
    rendezvous.stop()


def test_torchs_monitor_loop_gets_answers_not_exceptions_while_etcd_is_away(
    member: tuple[EtcdRdzvHandler, SwitchableEtcd, Recorder],
) -> None:
    handler, etcd, recorder = member
    assert handler.num_nodes_waiting() == 0
    etcd.answering = False
    for _ in range(3):
        assert handler.num_nodes_waiting() == 0
        assert handler.is_closed() is False
    assert handler.get_run_id() == "job"
    assert [args[:3] for args in recorder.named("unanswered")] == [
        ("num_nodes_waiting", "unavailable", 1),
        ("is_closed", "unavailable", 2),
        ("num_nodes_waiting", "unavailable", 3),
        ("is_closed", "unavailable", 4),
        ("num_nodes_waiting", "unavailable", 5),
        ("is_closed", "unavailable", 6),
    ]
    etcd.answering = True
    etcd.state = protocol.announce_waiting(FINAL)
    assert handler.num_nodes_waiting() == 1  # news from after the outage: a node waits
    assert [args[:2] for args in recorder.named("answered_again")] == [("num_nodes_waiting", 6)]
    assert etcd.writes == []


def test_is_closed_keeps_its_last_answer_through_an_outage(
    member: tuple[EtcdRdzvHandler, SwitchableEtcd, Recorder],
) -> None:
    handler, etcd, _ = member
    etcd.state = protocol.close(FINAL)
    assert handler.is_closed() is True
    etcd.answering = False
    assert handler.is_closed() is True


def test_a_run_closed_under_a_training_member_is_reported_once(
    member: tuple[EtcdRdzvHandler, SwitchableEtcd, Recorder],
) -> None:
    handler, etcd, recorder = member
    etcd.state = protocol.close(FINAL)
    assert handler.is_closed() is True  # torch's agent does not ask; a platform might
    for _ in range(3):
        assert handler.num_nodes_waiting() == 0
    assert recorder.named("closed_while_training") == [(4,)]


def test_shutdown_during_an_outage_leaves_the_run_open_and_writes_nothing(
    member: tuple[EtcdRdzvHandler, SwitchableEtcd, Recorder],
) -> None:
    handler, etcd, recorder = member
    etcd.answering = False
    assert handler.shutdown() is False
    assert recorder.named("left_open") == [(4, "etcd_unanswered", [])]
    assert etcd.writes == [] and etcd.state == FINAL


def test_shutdown_leaves_the_run_open_to_members_still_training(
    member: tuple[EtcdRdzvHandler, SwitchableEtcd, Recorder],
) -> None:
    handler, etcd, recorder = member
    assert handler.shutdown() is True
    assert recorder.named("left_open") == [(4, "members_training", [KEY_1, KEY_2])]
    assert etcd.state == FINAL


def test_the_last_member_out_closes_the_run(
    member: tuple[EtcdRdzvHandler, SwitchableEtcd, Recorder],
) -> None:
    handler, etcd, recorder = member
    etcd.live = {KEY_0}  # ranks 1 and 2 left (their keys deleted) or died (expired)
    assert handler.shutdown() is True
    assert etcd.state is not None and etcd.state.status is Status.CLOSED
    assert recorder.named("left_open") == []


# --- the outage's log line -------------------------------------------------------------------


def test_an_outage_is_logged_once_however_often_torch_asks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    observer = LoggingObserver("job", "node-a")
    with caplog.at_level(logging.INFO, logger=EVENT_LOGGER_NAME):
        for failures in range(1, 50):
            observer.etcd_unanswered("num_nodes_waiting", "unavailable", "down", failures, 1.0)
        observer.etcd_answered_again("num_nodes_waiting", 49, 5.0)
    events = [record.getMessage() for record in caplog.records]
    assert len(events) == 2, events
    assert "etcd_unanswered_while_training" in events[0] and "job" in events[0]
    assert "etcd_answered_again" in events[1] and "49" in events[1]
    observer.close()
