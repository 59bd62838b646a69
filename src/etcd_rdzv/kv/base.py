"""The key-value interface every etcd transport implements, and its errors."""

from __future__ import annotations

import abc
from dataclasses import dataclass


class KvError(Exception):
    """Base of the errors a transport raises; no client library's exception leaks past it."""


class KeyNotFound(KvError):
    def __init__(self, key: str, revision: int | None = None) -> None:
        super().__init__(f"key not found: {key}")
        self.key = key
        # The store revision at which the key was seen absent: watch after it.
        self.revision = revision


class AlreadyExists(KvError):
    def __init__(self, key: str, current: Entry | None = None) -> None:
        super().__init__(f"key already exists: {key}")
        self.key = key
        # What the key holds, when the refusal told it (v3 does): no read needed.
        self.current = current


class CompareFailed(KvError):
    """A conditional write found the key changed (or gone) since it was read."""

    def __init__(self, key: str, current: Entry | None = None) -> None:
        super().__init__(f"key changed since it was read: {key}")
        self.key = key
        # What the key holds now, when the refusal told it (v3 does); None also when gone.
        self.current = current


class OutcomeUnknown(KvError):
    """A conditional write was sent but its answer was lost: it may or may not have applied.

    Never retried blindly: a second compare-and-swap could repeat an effect (take a rank twice).
    Callers re-read the state and decide from what they see.
    """


@dataclass(frozen=True)
class Entry:
    key: str
    value: str
    # When the key was last written.
    revision: int
    # The store revision this read reflects; a watch after it misses nothing.
    read_revision: int
    # Seconds the key has left to live, when it has a TTL and the read told it (v2 does).
    ttl: float | None = None
    # The v3 lease the key is attached to; 0 for none, and always over v2.
    lease: int = 0


@dataclass(frozen=True)
class Change:
    """One event seen by a watch."""

    key: str
    value: str | None  # None: deleted or expired
    revision: int

    @property
    def deleted(self) -> bool:
        return self.value is None

    def entry(self) -> Entry | None:
        if self.value is None:
            return None
        return Entry(self.key, self.value, self.revision, self.revision)


@dataclass(frozen=True)
class Claim:
    """A key created by `KeyValue.claim`, and its place among the keys of its queue."""

    entry: Entry
    # How many keys the queue held right after this one was created, this one included.
    position: int


@dataclass(frozen=True)
class Listing:
    """The keys directly below a prefix, as of one store revision."""

    entries: tuple[Entry, ...]
    revision: int

    @property
    def keys(self) -> frozenset[str]:
        return frozenset(entry.key for entry in self.entries)


class KeyValue(abc.ABC):
    """What the rendezvous needs from etcd. Keys are absolute paths like `/a/b`."""

    # Whether `claim` works: it needs multi-key transactions, which only etcd v3 has.
    supports_claims = False

    @abc.abstractmethod
    def describe(self) -> str:
        """The endpoints, for error messages."""

    @abc.abstractmethod
    def get(self, key: str) -> Entry:
        """Raises KeyNotFound."""

    @abc.abstractmethod
    def create(self, key: str, value: str, ttl: float | None = None) -> Entry:
        """Write only if absent. Raises AlreadyExists, OutcomeUnknown."""

    @abc.abstractmethod
    def put(self, key: str, value: str, ttl: float | None = None) -> Entry:
        """Write unconditionally."""

    @abc.abstractmethod
    def compare_and_swap(
        self, key: str, value: str, expected: Entry, ttl: float | None = None
    ) -> Entry:
        """Write if the key is still at `expected.revision`; `ttl=None` makes it permanent.

        Raises CompareFailed (also when the key is gone), OutcomeUnknown.
        """

    @abc.abstractmethod
    def compare_and_delete(self, key: str, expected: Entry) -> None:
        """Delete if the key is still at `expected.revision`. Raises CompareFailed."""

    @abc.abstractmethod
    def refresh(self, key: str, ttl: float) -> None:
        """Extend a TTL key's life without waking watchers. Raises KeyNotFound."""

    @abc.abstractmethod
    def ensure_directory(self, key: str, ttl: float | None = None) -> None:
        """Make sure a directory exists (v2); transports without directories do nothing."""

    @abc.abstractmethod
    def list(self, prefix: str) -> Listing:
        """The keys directly below `prefix`.

        Over v2 an absent directory raises KeyNotFound; v3 has no directories and lists nothing.
        """

    @abc.abstractmethod
    def watch(
        self, key: str, after_revision: int, timeout: float, recursive: bool = False
    ) -> Change | None:
        """The first change to `key` (or below it) after `after_revision`.

        For a single key, a transport may answer with a later change of it instead (its value
        now): callers act on the latest state, never on a past one.

        None when `timeout` passed first, or when etcd no longer holds that history: either
        way the caller re-reads.
        """

    def claim(
        self, key: str, value: str, *, guard: Entry, queue: str, ttl: float | None = None
    ) -> Claim:
        """Create `key` only while `guard.key` is still at `guard.revision`, and in the same step
        count the keys that start with `queue`: the claim's position among them.

        Claims of different keys never contend with each other, unlike compare-and-swaps of
        one shared key; the guard makes them all fail at once when the shared key moves on.
        Raises CompareFailed (for the guard's key, with its current entry), AlreadyExists,
        OutcomeUnknown.
        """
        raise NotImplementedError(f"{type(self).__name__} has no multi-key transactions")

    def time_left(self, entry: Entry) -> float | None:
        """Seconds `entry`'s key has left to live; None when it has no TTL.

        v2 reads carry it; v3 reads do not (it asks the key's lease, one more request).
        """
        return entry.ttl

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections."""
