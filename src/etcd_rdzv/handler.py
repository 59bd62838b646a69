"""torchrun's `RendezvousHandler` for etcd-rdzv, and its `torchrun.handlers` entry point."""

from __future__ import annotations

import logging

from torch.distributed.elastic.rendezvous import (
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStoreInfo,
)

from etcd_rdzv import protocol
from etcd_rdzv.config import RendezvousConfig
from etcd_rdzv.kv import KeyValue, connect
from etcd_rdzv.protocol import Status
from etcd_rdzv.rendezvous import EtcdRendezvous, Membership
from etcd_rdzv.store import EtcdStore
from etcd_rdzv.telemetry import Observer, build_telemetry

log = logging.getLogger(__name__)

BACKEND_NAME = "etcd-rdzv"


class EtcdRdzvHandler(RendezvousHandler):
    def __init__(self, rendezvous: EtcdRendezvous, kv: KeyValue, observer: Observer) -> None:
        self._rendezvous = rendezvous
        self._kv = kv
        self._observer = observer
        self.last_membership: Membership | None = None

    def get_backend(self) -> str:
        return BACKEND_NAME

    def next_rendezvous(self) -> RendezvousInfo:
        membership = self._rendezvous.next_rendezvous()
        self.last_membership = membership
        store_prefix = self._rendezvous.paths.store(membership.version)
        self._kv.ensure_directory(store_prefix)
        store = EtcdStore(self._kv, store_prefix)
        bootstrap = RendezvousStoreInfo.build(
            membership.rank, store, local_addr=self._rendezvous.config.local_addr
        )
        return RendezvousInfo(store, membership.rank, membership.world_size, bootstrap)

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
    rendezvous = EtcdRendezvous(kv, config, observer)
    try:
        rendezvous.prepare()
    except BaseException:
        rendezvous.stop()
        observer.close()
        raise
    return EtcdRdzvHandler(rendezvous, kv, observer)
