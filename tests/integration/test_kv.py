"""The key-value contract: one suite, three implementations.

Both transports against a real etcd (`v3`, and `v2` with the v2 API on), and the in-memory
etcd (`memory`, `etcd_rdzv.kv.memory`), which follows the v3 transport: what it must do, it
must do exactly as etcd does, or it is a test double that lies.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from etcd_rdzv.errors import EtcdUnavailableError
from etcd_rdzv.kv import AlreadyExists, CompareFailed, KeyNotFound, KeyValue
from etcd_rdzv.kv.memory import MemoryEtcd
from etcd_rdzv.telemetry import NOOP_OBSERVER, Observer
from etcd_rdzv_devtools.local_etcd import LocalEtcd, free_loopback_ports
from tests.conftest import etcd_keys, open_kv

IMPLEMENTATIONS = ("v3", "v2", "memory")
# Multi-key transactions: etcd's v3 API, and the in-memory etcd that follows it.
with_claims = pytest.mark.parametrize("etcd_api", ["v3", "memory"], indirect=True)
v2_only = pytest.mark.parametrize("etcd_api", ["v2"], indirect=True)


@pytest.fixture(scope="session", params=IMPLEMENTATIONS)
def etcd_api(request: pytest.FixtureRequest) -> str:
    """Overrides the suite's: here the in-memory etcd is a third implementation."""
    return str(request.param)


@dataclass
class Implementation:
    """One implementation of the contract, and what the tests ask its server directly."""

    api: str
    server: LocalEtcd | MemoryEtcd

    def client(self, observer: Observer = NOOP_OBSERVER) -> KeyValue:
        if isinstance(self.server, MemoryEtcd):
            return self.server.client(observer)
        return open_kv(self.server, self.api, observer=observer)

    def keys(self, prefix: str) -> set[str]:
        """The keys below `prefix` as the server lists them (for etcd: `etcdctl`)."""
        if isinstance(self.server, MemoryEtcd):
            return self.server.keys(prefix)
        return etcd_keys(self.server, self.api, prefix)

    def compact(self, revision: int) -> None:
        if isinstance(self.server, MemoryEtcd):
            self.server.compact(revision)
            return
        body = json.dumps({"revision": str(revision), "physical": True}).encode()
        compact = urllib.request.Request(f"{self.server.client_url}/v3/kv/compaction", data=body)
        with urllib.request.urlopen(compact, timeout=10) as answer:
            assert answer.status == 200

    def unreachable(self) -> tuple[KeyValue, str]:
        """A client whose etcd does not answer, and what its errors name."""
        if isinstance(self.server, MemoryEtcd):
            gone = MemoryEtcd()
            gone.faults.unavailable = True
            return gone.client(), "memory"
        endpoint = f"127.0.0.1:{free_loopback_ports(1)[0]}"
        return open_kv(endpoint, self.api, request_timeout=1.0), endpoint


@pytest.fixture
def implementation(etcd_api: str, request: pytest.FixtureRequest) -> Implementation:
    if etcd_api == "memory":
        return Implementation("memory", MemoryEtcd())
    return Implementation(etcd_api, request.getfixturevalue("etcd"))


@pytest.fixture
def kv(implementation: Implementation) -> Iterator[KeyValue]:
    client = implementation.client()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def base(run_id: str) -> str:
    return f"/kv-contract/{run_id}"


def test_create_is_only_if_absent_and_get_reads_it_back(kv: KeyValue, base: str) -> None:
    created = kv.create(f"{base}/a", "1")
    with pytest.raises(AlreadyExists):
        kv.create(f"{base}/a", "2")
    read = kv.get(f"{base}/a")
    assert (read.value, read.revision) == ("1", created.revision)
    assert read.read_revision >= created.revision
    with pytest.raises(KeyNotFound) as absent:
        kv.get(f"{base}/missing")
    assert absent.value.revision is not None and absent.value.revision >= created.revision


def test_compare_and_swap_and_delete_compare_revisions(kv: KeyValue, base: str) -> None:
    first = kv.put(f"{base}/k", "same")
    second = kv.compare_and_swap(f"{base}/k", "same", first)
    assert second.revision > first.revision
    # The value came back to what it was; the revision did not: the stale swap fails.
    with pytest.raises(CompareFailed):
        kv.compare_and_swap(f"{base}/k", "other", first)
    with pytest.raises(CompareFailed):
        kv.compare_and_delete(f"{base}/k", first)
    kv.compare_and_delete(f"{base}/k", second)
    with pytest.raises(KeyNotFound):
        kv.get(f"{base}/k")
    # Swapping a key that is gone fails the compare too.
    with pytest.raises(CompareFailed):
        kv.compare_and_swap(f"{base}/k", "x", second)


@with_claims
def test_refusals_over_v3_carry_what_the_key_holds(kv: KeyValue, base: str) -> None:
    held = kv.create(f"{base}/a", "1")
    with pytest.raises(AlreadyExists) as exists:
        kv.create(f"{base}/a", "2")
    assert exists.value.current is not None
    assert (exists.value.current.value, exists.value.current.revision) == ("1", held.revision)
    moved = kv.put(f"{base}/a", "3")
    with pytest.raises(CompareFailed) as lost:
        kv.compare_and_swap(f"{base}/a", "4", held)
    assert lost.value.current is not None
    assert (lost.value.current.value, lost.value.current.revision) == ("3", moved.revision)


@with_claims
def test_claims_count_their_queue_and_fail_together_when_the_guard_moves(
    kv: KeyValue, base: str
) -> None:
    guard = kv.put(f"{base}/state", "joinable")
    queue = f"{base}/joined/"
    kv.put(f"{base}/joinedx", "outside the queue")
    positions = [
        kv.claim(f"{queue}{name}", name, guard=guard, queue=queue).position for name in "abc"
    ]
    assert positions == [1, 2, 3]
    # The guard is unchanged by claims: no claim contends with another.
    assert kv.get(f"{base}/state").revision == guard.revision
    with pytest.raises(AlreadyExists):
        kv.claim(f"{queue}a", "again", guard=guard, queue=queue)
    frozen = kv.compare_and_swap(f"{base}/state", "frozen", guard)
    with pytest.raises(CompareFailed) as refused:
        kv.claim(f"{queue}d", "late", guard=guard, queue=queue)
    assert refused.value.key == f"{base}/state"
    assert refused.value.current is not None and refused.value.current.revision == frozen.revision
    assert kv.list(f"{base}/joined").keys == {f"{queue}{name}" for name in "abc"}


@with_claims
def test_concurrent_claims_take_every_position_exactly_once(kv: KeyValue, base: str) -> None:
    guard = kv.put(f"{base}/state", "joinable")
    queue = f"{base}/joined/"
    positions: list[int] = []

    def claim(name: str) -> None:
        positions.append(kv.claim(f"{queue}{name}", name, guard=guard, queue=queue).position)

    threads = [threading.Thread(target=claim, args=(f"n{i}",)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(positions) == list(range(1, 17))


@v2_only
def test_v2_has_no_claims(kv: KeyValue, base: str) -> None:
    assert not kv.supports_claims
    guard = kv.put(f"{base}/state", "joinable")
    with pytest.raises(NotImplementedError):
        kv.claim(f"{base}/joined/a", "a", guard=guard, queue=f"{base}/joined/")


def test_list_shows_direct_children_only(kv: KeyValue, base: str) -> None:
    kv.put(f"{base}/dir/a", "1")
    kv.put(f"{base}/dir/b", "2", ttl=30)
    kv.put(f"{base}/dir/sub/c", "3")
    kv.put(f"{base}/dirx", "not below dir")
    listing = kv.list(f"{base}/dir")
    assert listing.keys == {f"{base}/dir/a", f"{base}/dir/b"}
    assert {e.key: e.value for e in listing.entries} == {f"{base}/dir/a": "1", f"{base}/dir/b": "2"}


def test_a_ttl_key_expires_unless_refreshed(
    kv: KeyValue, base: str, implementation: Implementation
) -> None:
    kv.put(f"{base}/kept", "v", ttl=2)
    kv.put(f"{base}/dropped", "v", ttl=2)
    entry = kv.get(f"{base}/kept")
    left = kv.time_left(entry)
    assert left is not None and 0 < left <= 3
    deadline = time.monotonic() + 10
    while f"{base}/dropped" in implementation.keys(base):
        assert time.monotonic() < deadline, "a TTL key outlived its TTL by far"
        kv.refresh(f"{base}/kept", 2)
        time.sleep(0.3)
    assert kv.get(f"{base}/kept").value == "v"


def test_refreshing_an_expired_key_says_it_is_gone(kv: KeyValue, base: str) -> None:
    kv.put(f"{base}/short", "v", ttl=1)
    deadline = time.monotonic() + 10
    while True:
        try:
            kv.get(f"{base}/short")
        except KeyNotFound:
            break
        assert time.monotonic() < deadline
        time.sleep(0.2)
    with pytest.raises(KeyNotFound):
        kv.refresh(f"{base}/short", 1)


def test_a_directory_with_a_ttl_takes_its_untimed_keys_along(
    kv: KeyValue, base: str, implementation: Implementation
) -> None:
    run = f"{base}/run"
    kv.ensure_directory(run, ttl=2)
    kv.ensure_directory(run, ttl=2)  # idempotent
    kv.put(f"{run}/rdzv/version_counter", "1")
    kv.create(f"{run}/rdzv/active_version", "{}")
    assert {f"{run}/rdzv/version_counter", f"{run}/rdzv/active_version"} <= implementation.keys(run)
    deadline = time.monotonic() + 10
    while implementation.keys(f"{run}/"):
        assert time.monotonic() < deadline, "keys outlived their directory's TTL"
        time.sleep(0.2)


def test_another_client_keeps_a_directory_alive(
    kv: KeyValue, base: str, implementation: Implementation
) -> None:
    run = f"{base}/run"
    kv.ensure_directory(run, ttl=2)
    kv.put(f"{run}/key", "v")
    other = implementation.client()
    try:
        other.ensure_directory(run, ttl=2)
        for _ in range(12):  # 3.6 s, past the TTL
            other.refresh(run, 2)
            time.sleep(0.3)
        assert kv.get(f"{run}/key").value == "v"
    finally:
        other.close()


def test_watch_sees_the_first_change_after_a_revision(kv: KeyValue, base: str) -> None:
    start = kv.put(f"{base}/w", "0")
    later = kv.put(f"{base}/w", "1")
    change = kv.watch(f"{base}/w", start.revision, timeout=5)
    assert change is not None and (change.value, change.revision) == ("1", later.revision)

    def delete_soon() -> None:
        kv.compare_and_delete(f"{base}/w", later)

    deleter = threading.Timer(0.2, delete_soon)
    deleter.start()
    try:
        gone = kv.watch(f"{base}/w", later.revision, timeout=10)
    finally:
        deleter.join()
    assert gone is not None and gone.deleted


def test_recursive_watch_sees_keys_below_and_times_out_quietly(kv: KeyValue, base: str) -> None:
    mark = kv.put(f"{base}/tree/x", "0")
    kv.put(f"{base}/treex", "outside")
    assert kv.watch(f"{base}/tree", mark.revision, timeout=0.5, recursive=True) is None
    below = kv.put(f"{base}/tree/deep/y", "1")
    change = kv.watch(f"{base}/tree", mark.revision, timeout=5, recursive=True)
    assert change is not None and (change.key, change.revision) == (below.key, below.revision)


def test_values_are_text_exactly(kv: KeyValue, base: str) -> None:
    text = '{"unicode": "naïve ✓", "quote": "\\"", "newline": "a\\nb"}'
    kv.put(f"{base}/text", text)
    assert kv.get(f"{base}/text").value == text


def test_unreachable_etcd_is_a_clear_error_within_the_timeout(
    implementation: Implementation,
) -> None:
    kv, named = implementation.unreachable()
    started = time.monotonic()
    try:
        with pytest.raises(EtcdUnavailableError, match=named):
            kv.get("/anything")
    finally:
        kv.close()
    assert time.monotonic() - started < 5


class RequestLog(Observer):
    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []

    def etcd_request(self, operation: str, result: str, seconds: float) -> None:
        self.requests.append((operation, result))


def test_refusals_are_counted_alike_by_every_implementation(
    implementation: Implementation, base: str
) -> None:
    log = RequestLog()
    kv = implementation.client(observer=log)
    try:
        first = kv.put(f"{base}/m", "1")
        kv.put(f"{base}/m", "2")
        with pytest.raises(CompareFailed):
            kv.compare_and_swap(f"{base}/m", "3", first)
        with pytest.raises(AlreadyExists):
            kv.create(f"{base}/m", "4")
        with pytest.raises(KeyNotFound):
            kv.get(f"{base}/absent")
    finally:
        kv.close()
    results = {(operation, result) for operation, result in log.requests if result != "ok"}
    assert results == {
        ("compare_and_swap", "compare_failed"),
        ("create", "already_exists"),
        ("get", "not_found"),
    }


@with_claims
def test_a_watch_into_compacted_history_returns_nothing_for_a_re_read(
    base: str, implementation: Implementation
) -> None:
    log = RequestLog()
    kv = implementation.client(observer=log)
    try:
        first = kv.put(f"{base}/c", "1")
        latest = kv.put(f"{base}/c", "2")
        implementation.compact(latest.revision)
        # The first write is gone from etcd's history: the caller must read again. (A single
        # key's watch reads the key at once instead, so watch the directory.)
        assert kv.watch(base, first.revision - 1, timeout=30, recursive=True) is None
    finally:
        kv.close()
    assert ("watch", "history_gone") in log.requests
