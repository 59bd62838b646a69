"""An etcd in memory: the `KeyValue` contract without a server, on a clock the caller owns.

`MemoryEtcd` is the server: one revision counter for the whole store, keys with their create
and modification revisions, leases that expire by `clock`, a history of events that watches
read from any revision, compaction, and faults to inject. `MemoryEtcd.client()` is a
`KeyValue` over it, as `EtcdV3` is over a real etcd: claims, leases granted a second longer
than asked, keys below a directory with a TTL attached to that directory's lease, refusals
that carry what the key holds, and the same request results reported to the observer. It
passes the contract suite both real transports pass (tests/integration/test_kv.py): a double
that behaved otherwise would be a bug.

Time is `clock()` (monotonic seconds): leases expire when it passes their deadline, checked
at every request. Watches wait in real seconds for another thread's write; a lease that
expires meanwhile is seen within `_EXPIRY_POLL_SECONDS`.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from etcd_rdzv.errors import EtcdRejectedError, EtcdUnavailableError
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
from etcd_rdzv.telemetry.observer import NOOP_OBSERVER, Observer

# As the v3 transport: a lease lives a second longer than the TTL asked for, at least 1 s.
_LEASE_MARGIN_SECONDS = 1.0
_EXPIRY_POLL_SECONDS = 0.05


@dataclass
class _Record:
    value: str
    create_revision: int
    mod_revision: int
    lease: int = 0


@dataclass
class _Lease:
    seconds: int
    expires_at: float
    keys: set[str] = field(default_factory=set)


@dataclass
class Faults:
    """What the next requests suffer; change them between requests, from any thread.

    `unavailable`: every request fails as against an etcd that does not answer.
    `lose_next_answers`: the next conditional writes (create, compare-and-swap, claim,
    compare-and-delete) raise `OutcomeUnknown`; each applies first if its entry is True.
    `latency`: seconds every request takes (real time).
    """

    unavailable: bool = False
    lose_next_answers: list[bool] = field(default_factory=list)
    latency: float = 0.0


class MemoryEtcd:
    """The store every client of one test or simulation shares."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.faults = Faults()
        self.revision = 1  # etcd's empty store is at revision 1
        self.compacted = 0
        self._changed = threading.Condition()
        self._keys: dict[str, _Record] = {}
        self._leases: dict[int, _Lease] = {}
        # (expires_at, lease) for every grant and refresh; entries a refresh outdated are
        # skipped when they come up: expiry costs no scan of every lease per request.
        self._expiries: list[tuple[float, int]] = []
        self._history: list[Change] = []
        self._next_lease = 1

    def client(self, observer: Observer = NOOP_OBSERVER, *, claims: bool = True) -> MemoryKeyValue:
        """A client; `claims=False` offers no claims, as the v2 transport (so the rendezvous
        takes torch's key layout over it)."""
        return MemoryKeyValue(self, observer, claims=claims)

    def keys(self, prefix: str) -> set[str]:
        """Every live key that starts with `prefix` (what `etcdctl get --prefix` lists)."""
        with self._changed:
            self._expire()
            return {key for key in self._keys if key.startswith(prefix)}

    def expire(self) -> None:
        """Expire the leases whose time has come now, as etcd does on its own (requests
        expire them too): watchers see the deletions."""
        with self._changed:
            self._expire()

    def expire_lease_of(self, key: str) -> bool:
        """End the lease `key` is attached to now (an injected early expiry); False without."""
        with self._changed:
            record = self._keys.get(key)
            if record is None or not record.lease or record.lease not in self._leases:
                return False
            self._revoke(record.lease)
            return True

    def next_expiry(self) -> float | None:
        """When the next lease expires, by `clock`; None without leases."""
        with self._changed:
            self._drop_outdated_expiries()
            return self._expiries[0][0] if self._expiries else None

    def changes_after(self, revision: int) -> list[Change]:
        """The history after `revision` (what a watch from it would be told, in order)."""
        with self._changed:
            start = bisect.bisect_right(self._history, revision, key=lambda change: change.revision)
            return self._history[start:]

    def compact(self, revision: int) -> None:
        """Forget the history up to `revision`: watches from before it get nothing."""
        with self._changed:
            self.compacted = max(self.compacted, revision)
            self._history = [c for c in self._history if c.revision > self.compacted]

    # --- used by clients, holding the lock -----------------------------------------------------

    def _expire(self) -> None:
        now = self.clock()
        while self._expiries and self._expiries[0][0] <= now:
            _, lease_id = heapq.heappop(self._expiries)
            lease = self._leases.get(lease_id)
            if lease is not None and lease.expires_at <= now:
                self._revoke(lease_id)

    def _drop_outdated_expiries(self) -> None:
        while self._expiries:
            at, lease_id = self._expiries[0]
            lease = self._leases.get(lease_id)
            if lease is not None and lease.expires_at == at:
                return
            heapq.heappop(self._expiries)

    def _extend(self, lease_id: int, lease: _Lease) -> None:
        lease.expires_at = self.clock() + lease.seconds
        heapq.heappush(self._expiries, (lease.expires_at, lease_id))

    def _revoke(self, lease_id: int) -> None:
        lease = self._leases.pop(lease_id)
        for key in sorted(lease.keys):
            self._delete(key)

    def _entry(self, key: str) -> Entry | None:
        record = self._keys.get(key)
        if record is None:
            return None
        return Entry(key, record.value, record.mod_revision, self.revision, lease=record.lease)

    def _put(self, key: str, value: str, lease: int) -> Entry:
        self.revision += 1
        old = self._keys.get(key)
        if old is not None and old.lease:
            self._leases[old.lease].keys.discard(key)
        created = old.create_revision if old is not None else self.revision
        self._keys[key] = _Record(value, created, self.revision, lease)
        if lease:
            self._leases[lease].keys.add(key)
        self._history.append(Change(key, value, self.revision))
        self._changed.notify_all()
        return Entry(key, value, self.revision, self.revision, lease=lease)

    def _delete(self, key: str) -> None:
        record = self._keys.pop(key)
        if record.lease and record.lease in self._leases:
            self._leases[record.lease].keys.discard(key)
        self.revision += 1
        self._history.append(Change(key, None, self.revision))
        self._changed.notify_all()

    def _grant(self, ttl: float) -> int:
        seconds = max(1, math.ceil(ttl + _LEASE_MARGIN_SECONDS))
        lease = self._next_lease
        self._next_lease += 1
        self._leases[lease] = _Lease(seconds, self.clock() + seconds)
        heapq.heappush(self._expiries, (self._leases[lease].expires_at, lease))
        return lease

    def _last_change(self, key: str) -> Change:
        return next(change for change in reversed(self._history) if change.key == key)

    def _first_change(self, key: str, after: int, recursive: bool) -> Change | None:
        below = key.rstrip("/") + "/"
        # The history is in revision order: skip what the watcher has seen without a scan.
        start = bisect.bisect_right(self._history, after, key=lambda change: change.revision)
        for change in itertools.islice(self._history, start, None):
            if change.key == key if not recursive else change.key.startswith(below):
                return change
        return None


class MemoryKeyValue(KeyValue):
    """One client of a `MemoryEtcd`, with the v3 transport's semantics."""

    supports_claims = True

    def __init__(
        self, server: MemoryEtcd, observer: Observer = NOOP_OBSERVER, *, claims: bool = True
    ) -> None:
        self.supports_claims = claims
        self._server = server
        self._observer = observer
        # Directory marker key -> (its lease, TTL), as the v3 transport keeps them per client.
        self._directories: dict[str, tuple[int, float]] = {}

    def describe(self) -> str:
        return "memory"

    # --- the interface -----------------------------------------------------------------------

    def get(self, key: str) -> Entry:
        with self._request("get") as server:
            entry = server._entry(key)
            if entry is None:
                raise KeyNotFound(key, server.revision)
            return entry

    def create(self, key: str, value: str, ttl: float | None = None) -> Entry:
        with self._request("create", conditional=True) as server:
            current = server._entry(key)
            if current is not None:
                raise AlreadyExists(key, current)
            return self._write(server, key, value, ttl)

    def put(self, key: str, value: str, ttl: float | None = None) -> Entry:
        with self._request("put") as server:
            return self._write(server, key, value, ttl)

    def compare_and_swap(
        self, key: str, value: str, expected: Entry, ttl: float | None = None
    ) -> Entry:
        with self._request("compare_and_swap", conditional=True) as server:
            current = server._entry(key)
            if current is None or current.revision != expected.revision:
                raise CompareFailed(key, current)
            return self._write(server, key, value, ttl)

    def claim(
        self, key: str, value: str, *, guard: Entry, queue: str, ttl: float | None = None
    ) -> Claim:
        if not self.supports_claims:
            raise NotImplementedError("this client offers no claims (claims=False)")
        with self._request("claim", conditional=True) as server:
            current = server._entry(guard.key)
            if current is None or current.revision != guard.revision:
                raise CompareFailed(guard.key, current)
            if server._entry(key) is not None:
                raise AlreadyExists(key)
            entry = self._write(server, key, value, ttl)
            position = sum(1 for other in server._keys if other.startswith(queue))
            return Claim(entry, position)

    def compare_and_delete(self, key: str, expected: Entry) -> None:
        with self._request("compare_and_delete", conditional=True) as server:
            current = server._entry(key)
            if current is None or current.revision != expected.revision:
                raise CompareFailed(key)
            server._delete(key)

    def refresh(self, key: str, ttl: float) -> None:
        with self._request("refresh") as server:
            record = server._keys.get(key)
            if record is not None and not record.lease:
                raise EtcdRejectedError(f"etcd at memory: {key} has no TTL to refresh")
            lease = server._leases.get(record.lease) if record is not None else None
            if record is None or lease is None:
                raise KeyNotFound(key, server.revision)
            server._extend(record.lease, lease)

    def ensure_directory(self, key: str, ttl: float | None = None) -> None:
        """A directory with a TTL is a marker key on a lease (as over v3); keys written below it
        without a TTL by this client attach to that lease and go when it expires."""
        if ttl is None:
            return
        with self._request("create") as server:
            self._mark_directory(server, key, ttl)

    def list(self, prefix: str) -> Listing:
        start = prefix.rstrip("/") + "/"
        with self._request("list") as server:
            entries = []
            for key in sorted(server._keys):
                if key.startswith(start) and "/" not in key[len(start) :]:
                    entry = server._entry(key)
                    assert entry is not None
                    entries.append(entry)
            return Listing(tuple(entries), server.revision)

    def watch(
        self, key: str, after_revision: int, timeout: float, recursive: bool = False
    ) -> Change | None:
        """As the interface says; a single key's watch answers with the key's latest change
        after `after_revision` (its value now), as the v3 transport's does."""
        if timeout <= 0:
            return None
        deadline = time.monotonic() + timeout
        try:
            with self._request("watch") as server:
                if after_revision < server.compacted:
                    raise _HistoryGone(key)
                while True:
                    change = server._first_change(key, after_revision, recursive)
                    if change is not None:
                        return change if recursive else server._last_change(key)
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise _WatchTimedOut(key)
                    server._changed.wait(min(left, _EXPIRY_POLL_SECONDS))
                    server._expire()
        except (_WatchTimedOut, _HistoryGone):
            return None

    def time_left(self, entry: Entry) -> float | None:
        if not entry.lease:
            return None
        with self._request("get") as server:
            lease = server._leases.get(entry.lease)
            return 0.0 if lease is None else max(0.0, lease.expires_at - server.clock())

    def close(self) -> None:
        pass

    # --- execution ---------------------------------------------------------------------------

    @contextmanager
    def _request(self, operation: str, *, conditional: bool = False) -> Iterator[MemoryEtcd]:
        """One request: its faults, the store's lock and expiries, and its reported result."""
        server = self._server
        started = time.monotonic()
        result = "ok"
        try:
            if server.faults.latency:
                time.sleep(server.faults.latency)
            if server.faults.unavailable:
                raise EtcdUnavailableError(
                    f"etcd at memory did not answer {operation} (an injected outage)"
                )
            with server._changed:
                server._expire()
                lose = None
                if conditional and server.faults.lose_next_answers:
                    lose = server.faults.lose_next_answers.pop(0)
                if lose is False:
                    raise _lost(operation)
                try:
                    yield server
                except KvError:
                    if lose:
                        raise _lost(operation) from None
                    raise
                if lose:
                    raise _lost(operation)
        except Exception as failure:
            result = _result_of(failure)
            raise
        finally:
            self._observer.etcd_request(operation, result, time.monotonic() - started)

    def _write(self, server: MemoryEtcd, key: str, value: str, ttl: float | None) -> Entry:
        if ttl is not None:
            return server._put(key, value, server._grant(ttl))
        enclosing = [d for d in self._directories if key.startswith(d.rstrip("/") + "/")]
        if not enclosing:
            return server._put(key, value, 0)
        directory = max(enclosing, key=len)
        lease, ttl = self._directories[directory]
        if lease not in server._leases:
            # The directory's lease expired (every agent stopped refreshing it): as the v3
            # transport, give the directory a new one and write below it.
            lease = self._mark_directory(server, directory, ttl)
        return server._put(key, value, lease)

    def _mark_directory(self, server: MemoryEtcd, key: str, ttl: float) -> int:
        marker = server._keys.get(key)
        if marker is None:
            lease = server._grant(ttl)
            server._put(key, "", lease)
        else:
            lease = marker.lease
        if lease:
            self._directories[key] = (lease, ttl)
        return lease


class _WatchTimedOut(KvError):
    """A watch saw nothing before its timeout: reported as `timeout`, answered with None."""


class _HistoryGone(KvError):
    """A watch from a compacted revision: reported as `history_gone`, answered with None."""


def _lost(operation: str) -> OutcomeUnknown:
    return OutcomeUnknown(f"etcd at memory: the answer to {operation} was lost")


def _result_of(failure: Exception) -> str:
    """The `result` label the real transports report for the same failure."""
    return {
        AlreadyExists: "already_exists",
        CompareFailed: "compare_failed",
        KeyNotFound: "not_found",
        OutcomeUnknown: "outcome_unknown",
        EtcdUnavailableError: "unavailable",
        EtcdRejectedError: "error",
        _WatchTimedOut: "timeout",
        _HistoryGone: "history_gone",
    }.get(type(failure), "error")
