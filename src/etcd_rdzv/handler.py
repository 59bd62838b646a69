"""torchrun's `RendezvousHandler` for etcd-rdzv, and its `torchrun.handlers` entry point."""

from __future__ import annotations

import datetime
import functools
import itertools
import logging
import time
from collections.abc import Callable

from torch.distributed.elastic.rendezvous import (
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStoreInfo,
)

from etcd_rdzv import protocol
from etcd_rdzv.agent_errors import raised_for_torch
from etcd_rdzv.config import RendezvousConfig
from etcd_rdzv.errors import (
    CorruptStateError,
    EtcdRejectedError,
    EtcdUnavailableError,
    RendezvousTimeoutError,
)
from etcd_rdzv.kv import KeyNotFound, KeyValue, KvError, connect
from etcd_rdzv.layouts import RunPaths
from etcd_rdzv.protocol import RendezvousState, Status
from etcd_rdzv.rendezvous import EtcdRendezvous, Membership
from etcd_rdzv.retry import Deadline, retry_while_failing
from etcd_rdzv.store import EtcdStore
from etcd_rdzv.telemetry import Observer, Phase
from etcd_rdzv.telemetry.agent import build_telemetry

log = logging.getLogger(__name__)

BACKEND_NAME = "etcd-rdzv"

# What etcd can answer (or fail to) to a call torch makes while the workers train. None of it
# says that a node left: the workers' collectives do not use etcd.
ETCD_FAILURES = (EtcdUnavailableError, EtcdRejectedError, CorruptStateError, KvError)

# The key torch's agent sets in the rendezvous store when the last member has reached its exit
# barrier: every member's workers finished (torch's `_TERMINAL_STATE_SYNC_ID` followed by
# `_LAST_MEMBER_CHECKIN`; tests/unit/test_outages_while_training.py checks they still match).
EXIT_BARRIER_DONE = "torchelastic/agent/terminal_state/last_member"


class EtcdContact:
    """Whether etcd answers the calls torch makes while training, and since when it has not.

    torch's agent calls `num_nodes_waiting()` from its monitor loop and does not catch what it
    raises: an exception there stops the workers of a job that was training. Those calls
    answer from what the node last knew instead, and report the outage here, so that it is
    counted, logged (rate-limited by the logging observer) and its end is seen.
    """

    def __init__(self, observer: Observer, clock: Callable[[], float] = time.monotonic) -> None:
        self._observer = observer
        self._clock = clock
        self._failures = 0
        self._since: float | None = None

    @property
    def answering(self) -> bool:
        return self._since is None

    def failed(self, call: str, error: Exception) -> None:
        now = self._clock()
        if self._since is None:
            self._since = now
        self._failures += 1
        self._observer.etcd_unanswered(
            call, _failure_reason(error), str(error), self._failures, now - self._since
        )

    def answered(self, call: str) -> None:
        if self._since is None:
            return
        outage = self._clock() - self._since
        self._observer.etcd_answered_again(call, self._failures, outage)
        self._since, self._failures = None, 0


def _failure_reason(error: Exception) -> str:
    if isinstance(error, EtcdRejectedError):
        return "rejected"
    if isinstance(error, CorruptStateError):
        return "corrupt_state"
    return "unavailable"


class MasterAddress:
    """Rank 0's address for the workers' bootstrap, in each version's store.

    Rank 0 publishes it as soon as it confirmed (`EtcdRendezvous`'s `on_rank_zero`), while
    the others still confirm or wait for the final state: they then find it with one read
    instead of watching for it after their rendezvous returned.
    """

    def __init__(self, kv: KeyValue, config: RendezvousConfig) -> None:
        self._kv = kv
        self._config = config
        self._paths = RunPaths(config.run_path)
        self._published: tuple[int, RendezvousStoreInfo] | None = None
        self._store: tuple[int, EtcdStore] | None = None

    def store(self, version: int) -> EtcdStore:
        """The version's store, its directory made once (rank 0 asks before and after)."""
        if self._store is None or self._store[0] != version:
            prefix = self._paths.store(version)
            self._kv.ensure_directory(prefix)
            self._store = (version, EtcdStore(self._kv, prefix))
        return self._store[1]

    def publish(self, version: int) -> RendezvousStoreInfo:
        info = RendezvousStoreInfo.build(0, self.store(version), local_addr=self._config.local_addr)
        self._published = (version, info)
        return info

    def of_rank_zero(self, version: int) -> RendezvousStoreInfo:
        """What this node, rank 0 of `version`, published (publishing it if it has not)."""
        if self._published is not None and self._published[0] == version:
            return self._published[1]
        return self.publish(version)


class EtcdRdzvHandler(RendezvousHandler):
    """What torch calls. Every method torch calls raises etcd-rdzv's errors as torch's
    (`raised_for_torch`): the protocol below raises torch-free ones."""

    def __init__(
        self,
        rendezvous: EtcdRendezvous,
        kv: KeyValue,
        observer: Observer,
        master_address: MasterAddress,
    ) -> None:
        self._rendezvous = rendezvous
        self._kv = kv
        self._observer = observer
        self._master_address = master_address
        self._contact = EtcdContact(observer)
        self._closed_seen = False
        # The version whose members found the run closed while training, reported once.
        self._closed_under: int | None = None
        self.last_membership: Membership | None = None

    def get_backend(self) -> str:
        return BACKEND_NAME

    @raised_for_torch()
    def next_rendezvous(self) -> RendezvousInfo:
        config = self._rendezvous.config
        deadline = Deadline(config.timeout)
        for attempt in itertools.count(1):
            membership = self._rendezvous.next_rendezvous()
            self.last_membership = membership
            store = retry_while_failing(
                functools.partial(self._master_address.store, membership.version),
                (EtcdUnavailableError,),
                deadline,
            )
            bootstrap: RendezvousStoreInfo | None
            if membership.rank == 0:
                bootstrap = self._master_address.of_rank_zero(membership.version)
            else:
                bootstrap = self._wait_for_master(membership, store, deadline)
            if bootstrap is not None:
                return RendezvousInfo(store, membership.rank, membership.world_size, bootstrap)
            # Rank 0 died between the final state and publishing its address: the version can
            # never start. Leave it and form the next one, as after any other member's death.
            detail = f"rank 0 of version {membership.version} died before publishing its address"
            self._observer.retry(Phase.RENDEZVOUS, "master_gone", attempt, detail)
        raise AssertionError("unreachable: the loop returns or raises")

    def _wait_for_master(
        self, membership: Membership, store: EtcdStore, deadline: Deadline
    ) -> RendezvousStoreInfo | None:
        """Rank 0's address, waited for in the store while rank 0 lives; None once rank 0's
        keep-alive key is gone. torch's `RendezvousStoreInfo.build` would wait the store's
        timeout (5 minutes), whatever became of rank 0, and read the store once more per key."""
        keys = [RendezvousStoreInfo.MASTER_ADDR_KEY, RendezvousStoreInfo.MASTER_PORT_KEY]
        master = self._rendezvous.paths.keep_alive(membership.version, 0)
        while not deadline.expired():
            # A keep-alive TTL at a time: rank 0 renews its key more often than that.
            chunk = deadline.bound(self._rendezvous.config.ttls.keep_alive)
            try:
                address, port = store.wait_for_values(keys, datetime.timedelta(seconds=chunk))
                return RendezvousStoreInfo(address.decode(), int(port))
            except LookupError:
                pass
            try:
                self._kv.get(master)
            except KeyNotFound:
                return None
            except EtcdUnavailableError:
                pass  # rank 0's fate is unknown until etcd answers: keep waiting
        raise RendezvousTimeoutError(
            f"Rendezvous of run {self._rendezvous.config.run_id!r}: rank 0 of version "
            f"{membership.version} is alive but did not publish its address within "
            f"{self._rendezvous.config.timeout:g}s."
        )

    # --- what torch calls while the workers train: never raises for etcd's sake ---------------

    @raised_for_torch()
    def is_closed(self) -> bool:
        """Whether the run is closed; while etcd does not answer, the last answer (torch's
        own backend raises instead)."""
        answered, state = self._state_while_training("is_closed")
        if answered:
            self._closed_seen = state is not None and state.status is Status.CLOSED
        return self._closed_seen

    @raised_for_torch()
    def set_closed(self) -> None:
        self._rendezvous.set_closed()

    @raised_for_torch()
    def num_nodes_waiting(self) -> int:
        """Nodes waiting for this node's version to end (torch restarts its workers when
        positive); 0 while etcd does not answer: no node can join without etcd, so none
        waits that this job could take in."""
        answered, state = self._state_while_training("num_nodes_waiting")
        member_of = self.last_membership.version if self.last_membership else None
        if not answered:
            waiting = 0
        else:
            waiting = protocol.nodes_waiting(state, member_of)
            self._closed_seen = state is not None and state.status is Status.CLOSED
            if self._closed_seen and member_of is not None and self._closed_under != member_of:
                self._closed_under = member_of
                self._observer.closed_while_training(member_of)
        self._observer.nodes_waiting(waiting)
        return waiting

    def get_run_id(self) -> str:
        return self._rendezvous.config.run_id

    @raised_for_torch()
    def shutdown(self) -> bool:
        """Leave the run: stop this node's keep-alives, and close the run, unless other members
        of its final version still train or etcd does not answer. torch's backends close it
        whatever they leave behind, and the nodes left training can then never rendezvous
        again. A job whose members all finished (torch's exit barrier) is closed; otherwise
        the last member to leave closes it. True when the node left as it should."""
        try:
            return self._close_unless_others_train()
        finally:
            self._rendezvous.stop()
            self._observer.close()

    def _close_unless_others_train(self) -> bool:
        membership = self.last_membership
        version = membership.version if membership else None
        try:
            # Past torch's exit barrier every member's workers are done: the job is over.
            finished = membership is not None and self._master_address.store(
                membership.version
            ).holds(EXIT_BARRIER_DONE)
            others = [] if finished else self._rendezvous.members_training_besides(membership)
        except ETCD_FAILURES as error:
            self._contact.failed("shutdown", error)
            self._observer.run_left_open(version, "etcd_unanswered", [])
            return False
        self._contact.answered("shutdown")
        if others:
            self._observer.run_left_open(version, "members_training", others)
            return True
        try:
            self.set_closed()
        except Exception:
            run_id = self._rendezvous.config.run_id
            log.warning("etcd-rdzv: closing the rendezvous of run %s failed", run_id, exc_info=True)
            self._observer.run_left_open(version, "close_failed", [])
            return False
        return True

    def _state_while_training(self, call: str) -> tuple[bool, RendezvousState | None]:
        """(True, the run's state) when etcd answered `call`'s read, else (False, None)."""
        try:
            state = self._rendezvous.current_state()
        except ETCD_FAILURES as error:
            self._contact.failed(call, error)
            return False, None
        self._contact.answered(call)
        return True, state


@raised_for_torch()
def create_handler(
    params: RendezvousParameters, observer: Observer | None = None
) -> EtcdRdzvHandler:
    """Build a handler from torchrun's parameters; bad parameters fail here, clearly.

    Without an `observer`, telemetry is built as the parameters and environment ask.
    """
    config = RendezvousConfig.from_parameters(params)
    observer = build_telemetry(config) if observer is None else observer
    kv = connect(config, observer)
    master_address = MasterAddress(kv, config)
    rendezvous = EtcdRendezvous(kv, config, observer, on_rank_zero=master_address.publish)
    try:
        rendezvous.prepare()
    except BaseException:
        rendezvous.stop()
        observer.close()
        raise
    return EtcdRdzvHandler(rendezvous, kv, observer, master_address)
