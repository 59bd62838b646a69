"""torchrun's `RendezvousHandler` for etcd-rdzv, and its `torchrun.handlers` entry point."""

from __future__ import annotations

import datetime
import itertools
import logging

from torch.distributed.elastic.rendezvous import (
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStoreInfo,
    RendezvousTimeoutError,
)

from etcd_rdzv import protocol
from etcd_rdzv.config import RendezvousConfig
from etcd_rdzv.kv import KeyNotFound, KeyValue, connect
from etcd_rdzv.protocol import Status
from etcd_rdzv.rendezvous import EtcdRendezvous, Membership, RunPaths
from etcd_rdzv.retry import Deadline
from etcd_rdzv.store import EtcdStore
from etcd_rdzv.telemetry import Observer, Phase, build_telemetry

log = logging.getLogger(__name__)

BACKEND_NAME = "etcd-rdzv"


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
        self.last_membership: Membership | None = None

    def get_backend(self) -> str:
        return BACKEND_NAME

    def next_rendezvous(self) -> RendezvousInfo:
        config = self._rendezvous.config
        deadline = Deadline(config.timeout)
        for attempt in itertools.count(1):
            membership = self._rendezvous.next_rendezvous()
            self.last_membership = membership
            store = self._master_address.store(membership.version)
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
            log.warning("etcd-rdzv: %s; starting a new rendezvous", detail)
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
        raise RendezvousTimeoutError(
            f"Rendezvous of run {self._rendezvous.config.run_id!r}: rank 0 of version "
            f"{membership.version} is alive but did not publish its address within "
            f"{self._rendezvous.config.timeout:g}s."
        )

    def is_closed(self) -> bool:
        state = self._rendezvous.current_state()
        return state is not None and state.status is Status.CLOSED

    def set_closed(self) -> None:
        self._rendezvous.set_closed()

    def num_nodes_waiting(self) -> int:
        member_of = self.last_membership.version if self.last_membership else None
        waiting = protocol.nodes_waiting(self._rendezvous.current_state(), member_of)
        self._observer.nodes_waiting(waiting)
        return waiting

    def get_run_id(self) -> str:
        return self._rendezvous.config.run_id

    def shutdown(self) -> bool:
        try:
            self.set_closed()
        except Exception:
            log.warning("etcd-rdzv: closing the rendezvous failed", exc_info=True)
            return False
        finally:
            self._rendezvous.stop()
            self._observer.close()
        return True


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
