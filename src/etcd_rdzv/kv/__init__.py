"""etcd behind a small key-value interface, named by what the protocol needs.

Revisions are etcd's: `modifiedIndex`/`X-Etcd-Index` over v2, `mod_revision`/header revision
over v3. Conditional writes compare revisions, not values: a value can come back, a revision
cannot. TTLs are in seconds; over v3 a TTL key is a key attached to a lease.
"""

from etcd_rdzv.kv.base import (
    AlreadyExists,
    Change,
    CompareFailed,
    Entry,
    KeyNotFound,
    KeyValue,
    KvError,
    Listing,
    OutcomeUnknown,
)

__all__ = [
    "AlreadyExists",
    "Change",
    "CompareFailed",
    "Entry",
    "KeyNotFound",
    "KeyValue",
    "KvError",
    "Listing",
    "OutcomeUnknown",
]
