"""A c10d `Store` over the key-value interface, for the job's bootstrap after a rendezvous.

Keys and values are stored base64-encoded under `<run>/rdzv/v_<version>/kv/`, exactly as
torch's `EtcdStore` does, so agents of both backends share one store in a mixed rendezvous.
"""

from __future__ import annotations

import datetime
from base64 import b64decode, b64encode
from collections.abc import Sequence

# torch exports Store at runtime but its stubs do not list it.
from torch.distributed import Store  # type: ignore[attr-defined]

from etcd_rdzv.kv import AlreadyExists, CompareFailed, KeyNotFound, KeyValue
from etcd_rdzv.retry import CAS_BACKOFF, Deadline

_DEFAULT_TIMEOUT = datetime.timedelta(seconds=300)


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
        self._kv.put(self._path(key), _encode(value))

    def get(self, key: str) -> bytes:
        return self.wait_for_values([key], self.timeout)[0]

    def add(self, key: str, value: int) -> int:
        path = self._path(key)
        try:
            self._kv.create(path, _encode(str(value)))
            return value
        except AlreadyExists:
            pass
        for attempt in range(CAS_BACKOFF.max_attempts):
            current = self._kv.get(path)
            total = int(_decode(current.value)) + value
            try:
                self._kv.compare_and_swap(path, _encode(str(total)), current)
                return total
            except CompareFailed:
                CAS_BACKOFF.sleep(attempt)
        raise RuntimeError(f"EtcdStore.add({key!r}) lost too many races")

    def compare_set(
        self, key: str, expected_value: bytes | str, desired_value: bytes | str
    ) -> bytes:
        path = self._path(key)
        expected = _as_bytes(expected_value)
        for attempt in range(CAS_BACKOFF.max_attempts):
            try:
                current = self._kv.get(path)
            except KeyNotFound:
                if expected:
                    return expected  # c10d: a missing key with a non-empty expectation is left be
                try:
                    self._kv.create(path, _encode(desired_value))
                    return _as_bytes(desired_value)
                except AlreadyExists:
                    continue
            value = _decode(current.value)
            if value != expected:
                return value
            try:
                self._kv.compare_and_swap(path, _encode(desired_value), current)
                return _as_bytes(desired_value)
            except CompareFailed:
                CAS_BACKOFF.sleep(attempt)
        raise RuntimeError(f"EtcdStore.compare_set({key!r}) lost too many races")

    def delete_key(self, key: str) -> bool:
        path = self._path(key)
        for attempt in range(CAS_BACKOFF.max_attempts):
            try:
                self._kv.compare_and_delete(path, self._kv.get(path))
                return True
            except KeyNotFound:
                return False
            except CompareFailed:
                CAS_BACKOFF.sleep(attempt)
        return False

    def check(self, keys: list[str]) -> bool:
        wanted = {self._path(key) for key in keys}
        try:
            present = self._kv.list(self.prefix.rstrip("/")).keys
        except KeyNotFound:
            return False
        return wanted <= present

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        self.wait_for_values(keys, timeout or self.timeout)

    def num_keys(self) -> int:
        try:
            return len(self._kv.list(self.prefix.rstrip("/")).entries)
        except KeyNotFound:
            return 0

    def multi_get(self, keys: list[str]) -> list[bytes]:
        return self.wait_for_values(keys, self.timeout)

    def multi_set(self, keys: list[str], values: Sequence[bytes | str]) -> None:
        for key, value in zip(keys, values, strict=True):
            self.set(key, value)

    def wait_for_values(self, keys: Sequence[str], timeout: datetime.timedelta) -> list[bytes]:
        """The values of `keys` once all exist (one listing when they do); between listings, a
        watch of the first key still missing, not a poll. Raises LookupError after `timeout`.

        A single-key watch, not one of the directory: over v3 a watch of a directory that
        starts in the past waits for etcd's next sync of lagging watchers (100 ms), and the
        directory moves while its keys are being set."""
        paths = [self._path(key) for key in keys]
        directory = self.prefix.rstrip("/")
        deadline = Deadline(timeout.total_seconds())
        while True:
            try:
                listing = self._kv.list(directory)
                values = {entry.key: entry.value for entry in listing.entries}
                revision = listing.revision
            except KeyNotFound as gone:
                values, revision = {}, gone.revision or 0
            missing = [path for path in paths if path not in values]
            if not missing:
                return [_decode(values[path]) for path in paths]
            if deadline.expired():
                absent = [key for key, path in zip(keys, paths, strict=True) if path not in values]
                raise LookupError(
                    f"EtcdStore: keys {absent} not set within {timeout.total_seconds():g}s "
                    f"under {self.prefix}"
                )
            self._kv.watch(missing[0], revision, deadline.remaining())

    def _path(self, key: str) -> str:
        return self.prefix + _encode(key)


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _encode(value: bytes | str) -> str:
    return b64encode(_as_bytes(value)).decode()


def _decode(value: str) -> bytes:
    return b64decode(value.encode())
