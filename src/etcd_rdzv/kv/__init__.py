"""etcd behind a small key-value interface, named by what the protocol needs.

Revisions are etcd's: `modifiedIndex`/`X-Etcd-Index` over v2, `mod_revision`/header revision
over v3. Conditional writes compare revisions, not values: a value can come back, a revision
cannot. TTLs are in seconds; over v3 a TTL key is a key attached to a lease.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from etcd_rdzv.kv.base import (
    AlreadyExists,
    Change,
    Claim,
    CompareFailed,
    Entry,
    KeyNotFound,
    KeyValue,
    KvError,
    Listing,
    OutcomeUnknown,
)

if TYPE_CHECKING:
    from etcd_rdzv.config import RendezvousConfig
    from etcd_rdzv.telemetry import Observer


def connect(config: RendezvousConfig, observer: Observer) -> KeyValue:
    """The transport `config.etcd_api` names; each imports its client library only when chosen."""
    if config.etcd_api == "v2":
        from etcd_rdzv.kv.etcd_v2 import EtcdV2

        return EtcdV2(config, observer)
    from etcd_rdzv.kv.etcd_v3 import EtcdV3

    return EtcdV3(config, observer)


__all__ = [
    "AlreadyExists",
    "Change",
    "Claim",
    "CompareFailed",
    "Entry",
    "KeyNotFound",
    "KeyValue",
    "KvError",
    "Listing",
    "OutcomeUnknown",
    "connect",
]
