"""A c10d `Store` over the key-value interface, for the job's bootstrap after a rendezvous.

Keys and values are stored base64-encoded under `<run>/rdzv/v_<version>/kv/`, exactly as
torch's `EtcdStore` does, so agents of both backends share one store in a mixed rendezvous.

Every operation may take the store's timeout, as in any c10d store: an etcd that does not
answer for a while costs an operation time, not its result (torch's agent reads and writes
here right after a rendezvous and in its exit barrier).
"""

from __future__ import annotations

import datetime
from base64 import b64decode, b64encode
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

# torch exports Store at runtime but its stubs do not list it.
from torch.distributed import Store  # type: ignore[attr-defined]

from etcd_rdzv.agent_errors import raised_for_torch
from etcd_rdzv.errors import EtcdUnavailableError
from etcd_rdzv.kv import Entry, KeyNotFound, KeyValue
from etcd_rdzv.retry import TRANSIENT_BACKOFF, Deadline, retry_while_failing
from etcd_rdzv.swap import Delete, Keep, Put, SwapExhausted, swap

_DEFAULT_TIMEOUT = datetime.timedelta(seconds=300)
T = TypeVar("T")


class EtcdStore(Store):
    # A property of the C++ base class, set by set_timeout(); declared for the type checker.
    timeout: datetime.timedelta

    def __init__(
        self, kv: KeyValue, prefix: str, timeout: datetime.timedelta = _DEFAULT_TIMEOUT
    ) -> None:
        super().__init__()  # the pybind trampoline needs it
        self._kv = kv
        # torch's EtcdStore exposes `prefix` with a trailing slash; tools read the version from it.
        self.prefix = prefix.rstrip("/") + "/"
        self.set_timeout(timeout)

    def set(self, key: str, value: bytes | str) -> None:
        path, encoded = self._path(key), _encode(value)
        self._patiently(lambda: self._kv.put(path, encoded))

    def get(self, key: str) -> bytes:
        return self.wait_for_values([key], self.timeout)[0]

    def add(self, key: str, value: int) -> int:
        return self._patiently(lambda: self._add(key, value))

    def _add(self, key: str, value: int) -> int:
        def added(current: Entry | None) -> Put[int]:
            total = value if current is None else int(_decode(current.value)) + value
            return Put(_encode(str(total)), total)

        # Created without a read: most counters are added to by one node first.
        return self._swap(key, added, current=None)

    def compare_set(
        self, key: str, expected_value: bytes | str, desired_value: bytes | str
    ) -> bytes:
        return self._patiently(lambda: self._compare_set(key, expected_value, desired_value))

    def _compare_set(
        self, key: str, expected_value: bytes | str, desired_value: bytes | str
    ) -> bytes:
        expected, desired = _as_bytes(expected_value), _as_bytes(desired_value)

        def compared(current: Entry | None) -> Put[bytes] | Keep[bytes]:
            if current is None:
                # c10d: a missing key with a non-empty expectation is left be.
                return Keep(expected) if expected else Put(_encode(desired), desired)
            value = _decode(current.value)
            return Put(_encode(desired), desired) if value == expected else Keep(value)

        return self._swap(key, compared)

    def delete_key(self, key: str) -> bool:
        return self._patiently(lambda: self._delete_key(key))

    def _delete_key(self, key: str) -> bool:
        def deleted(current: Entry | None) -> Delete[bool] | Keep[bool]:
            return Keep(False) if current is None else Delete(True)

        return self._swap(key, deleted)

    def check(self, keys: list[str]) -> bool:
        wanted = {self._path(key) for key in keys}
        return wanted <= self._patiently(self._values)[0].keys()

    def holds(self, key: str) -> bool:
        """Whether `key` is set now: one read, no waiting, and etcd's failures raised."""
        try:
            self._kv.get(self._path(key))
        except KeyNotFound:
            return False
        return True

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        self.wait_for_values(keys, timeout or self.timeout)

    def num_keys(self) -> int:
        return len(self._patiently(self._values)[0])

    def multi_get(self, keys: list[str]) -> list[bytes]:
        return self.wait_for_values(keys, self.timeout)

    def multi_set(self, keys: list[str], values: Sequence[bytes | str]) -> None:
        for key, value in zip(keys, values, strict=True):
            self.set(key, value)

    @raised_for_torch()
    def wait_for_values(self, keys: Sequence[str], timeout: datetime.timedelta) -> list[bytes]:
        """The values of `keys` once all exist (one listing when they do); between listings, a
        watch of the first key still missing, not a poll. Raises LookupError after `timeout`.

        A single-key watch, not one of the directory: over v3 a watch of a directory that
        starts in the past waits for etcd's next sync of lagging watchers (100 ms), and the
        directory moves while its keys are being set."""
        paths = [self._path(key) for key in keys]
        deadline = Deadline(timeout.total_seconds())
        values: dict[str, str] = {}
        unanswered = 0
        while True:
            try:
                values, revision = self._values()
                unanswered = 0
            except EtcdUnavailableError:
                unanswered += 1  # waiting out an outage is waiting for the keys
            missing = [path for path in paths if path not in values]
            if not missing and not unanswered:
                return [_decode(values[path]) for path in paths]
            if deadline.expired():
                absent = [key for key, path in zip(keys, paths, strict=True) if path in missing]
                why = " (etcd did not answer)" if unanswered else ""
                raise LookupError(
                    f"EtcdStore: keys {absent} not set within {timeout.total_seconds():g}s "
                    f"under {self.prefix}{why}"
                )
            if not unanswered:
                try:
                    self._kv.watch(missing[0], revision, deadline.remaining())
                    continue
                except EtcdUnavailableError:
                    unanswered += 1
            TRANSIENT_BACKOFF.sleep(min(unanswered, 8), deadline)

    def _values(self) -> tuple[dict[str, str], int]:
        """The store's keys and values, and the revision they were read at."""
        try:
            listing = self._kv.list(self.prefix.rstrip("/"))
        except KeyNotFound as gone:
            return {}, gone.revision or 0
        return {entry.key: entry.value for entry in listing.entries}, listing.revision

    def _patiently(self, operation: Callable[[], T]) -> T:
        """`operation`, retried while etcd does not answer, within the store's timeout; what
        it finally raises, raised as torch's errors (torch's callers catch those)."""
        with raised_for_torch():
            return retry_while_failing(
                operation, (EtcdUnavailableError,), Deadline(self.timeout.total_seconds())
            )

    def _swap(
        self,
        key: str,
        decide: Callable[[Entry | None], Put[T] | Keep[T] | Delete[T]],
        **options: Any,
    ) -> T:
        try:
            result, _ = swap(self._kv, self._path(key), decide, **options)
        except SwapExhausted:
            raise RuntimeError(f"EtcdStore: {key!r} kept changing: lost too many races") from None
        return result

    def _path(self, key: str) -> str:
        return self.prefix + _encode(key)


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _encode(value: bytes | str) -> str:
    return b64encode(_as_bytes(value)).decode()


def _decode(value: str) -> bytes:
    return b64decode(value.encode())
