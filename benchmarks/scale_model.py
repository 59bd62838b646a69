"""A scale model of what one rendezvous costs etcd per node, up to N = 10,000, in one process.

    .venv/bin/python -m benchmarks.scale_model --nodes 8 64 1024 10000 [--json OUT]

The benchmark (rendezvous_latency.py) counts etcd's requests against a real etcd, and a real
etcd on this machine stops at a few hundred nodes. This model runs the same rendezvous over the
simulator's in-memory etcd (tests/simulation/engine.py, `MemoryEtcd`): N real `EtcdRdzvHandler`s
with their `EtcdRendezvous`, one greenlet each on a virtual clock, min_nodes = max_nodes = N,
the v3 claims layout, telemetry off (the no-op observer), the default configuration otherwise
and no faults. Handlers are created first (`prepare`, as torchrun creates them before the
benchmark's release), then every node calls `next_rendezvous()`; counting stops when the last
one returns, as the benchmark's does.

Each node's client is a `CountingKeyValue`: the simulator's client, counting what the v3
transport (`kv/etcd_v3.py`) would ask etcd for each call, and what etcd would send back.

What a request is: one gRPC call etcd serves, as `grpc_server_started_total` counts them (the
v3 JSON gateway makes one per HTTP request). The model maps each `KeyValue` call onto the
transport's requests:
- a write with a TTL is a lease grant and then the write (unless a lease the same client's
  refused write left spare serves it within a second, as the transport reuses them);
- `ensure_directory` with a TTL is a read of its marker key, and a lease grant and a
  transaction when the marker is absent; without a TTL it is no request (v3 has no directories);
- `refresh` is one lease keep-alive (and first a read, for a key this client did not write);
- a watch counts once when opened, as etcd counts a stream once, however many messages it
  carries; a single-key watch that opens after the store moved past the caller's revision
  makes one read as well (the transport's shortcut: see `EtcdV3.watch`), a request of its
  own, during which the stream is sent the key's changes too;
- a call etcd never answered (an injected outage: none here) is no request.

What a byte is: the protobuf payload of every response message etcd sends the client, the
quantity etcd's `etcd_network_client_grpc_sent_bytes_total` is about: a response header
(cluster and member ids, revision, raft term) per response, each key-value with its key, value,
revisions, version and lease, per-message fields (a transaction's nested responses, a lease's id
and TTL, a claim's count). A watch sends a `created` response, then the events delivered to
this watcher: every watcher of a key is sent each event once. Keys and values are sent as
bytes; JSON and base64 (what the gateway then sends the client over HTTP, about 4/3 of it plus
field names) are not counted. Lease, cluster and member ids are taken as random 64-bit numbers
(9-10 byte varints); a key's create revision as its mod revision, its version as 1.

What the model leaves out:
- the network: latency is the simulator's (mostly a few ms, 1 % of requests up to a second
  longer), so the virtual duration says nothing about the real one; CPU is not modelled;
- gRPC framing (5 bytes per message), HTTP/2 frames and headers, TLS, the gateway's JSON;
- the requests etcd's own clients make (authentication, none here) and etcd's progress
  notifications on idle watch streams;
- keep-alive refreshes over time: a key is refreshed every third of its TTL, so they are
  counted only as far as the rendezvous' virtual duration reaches (the run's key every 2,400 s:
  never; a rank's every 3.3 s);
- retries after faults, and the extra load of contention on a real server: the requests are
  those of this schedule, one seed of the simulator's scheduler.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import sys
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.simulation.engine import Actor, SimulatedKeyValue, SimulatedRuntime, Simulation

from etcd_rdzv.config import RendezvousConfig, parse_endpoints
from etcd_rdzv.handler import EtcdRdzvHandler, MasterAddress
from etcd_rdzv.kv.base import (
    AlreadyExists,
    Change,
    Claim,
    CompareFailed,
    Entry,
    KeyNotFound,
    Listing,
)
from etcd_rdzv.kv.etcd_v3 import _LEASE_MARGIN_SECONDS, _lease_seconds
from etcd_rdzv.kv.memory import MemoryEtcd
from etcd_rdzv.rendezvous import EtcdRendezvous
from etcd_rdzv.telemetry import NOOP_OBSERVER

RUN_ID = "scale"
DEFAULT_NODES = (8, 64, 1024, 10_000)
CREATION, RENDEZVOUS = "creation", "rendezvous"

# --- what etcd sends: protobuf sizes -----------------------------------------------------------

# Widths of etcd's 64-bit identifiers as varints: cluster and member ids are random uint64s
# (10 bytes), lease ids random positive int64s (9 bytes); a raft term stays small.
_CLUSTER_ID = _MEMBER_ID = 1 << 63
_LEASE_ID = 1 << 62
_RAFT_TERM = 2
# etcd sends a watcher that starts in the past at most this many revisions of events in one
# response (`watchBatchMaxRevs`); the transport returns on the first response's first event.
_WATCH_BATCH_REVISIONS = 1000


def _varint(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _number(value: int) -> int:
    """A numeric field: tag and varint; proto3 leaves a zero out."""
    return 0 if value == 0 else 1 + _varint(value)


def _field(size: int) -> int:
    """A length-delimited field (bytes, embedded message) of `size` bytes; empty ones left out."""
    return 0 if size == 0 else 1 + _varint(size) + size


def _text(text: str) -> int:
    return _field(len(text.encode()))


def header(revision: int) -> int:
    """A response's `header` field: cluster id, member id, revision, raft term."""
    return _field(
        _number(_CLUSTER_ID) + _number(_MEMBER_ID) + _number(revision) + _number(_RAFT_TERM)
    )


def key_value(key: str, value: str | None, revision: int, lease: int = 0) -> int:
    """An `mvccpb.KeyValue`; a deletion's carries only its key and revision."""
    if value is None:
        return _text(key) + _number(revision)
    lease_field = _number(_LEASE_ID) if lease else 0
    return _text(key) + 2 * _number(revision) + _number(1) + _text(value) + lease_field


def _entry_size(entry: Entry) -> int:
    return key_value(entry.key, entry.value, entry.revision, entry.lease)


def range_response(revision: int, entries: Sequence[Entry], count: int | None = None) -> int:
    """A RangeResponse: a read of one key, a listing, or (`count` alone) a count-only range."""
    kvs = sum(_field(_entry_size(entry)) for entry in entries)
    return header(revision) + kvs + _number(len(entries) if count is None else count)


def put_response(revision: int) -> int:
    return header(revision)


def delete_response(revision: int, deleted: int) -> int:
    return header(revision) + _number(deleted)


def txn_response(revision: int, succeeded: bool, responses: Sequence[int]) -> int:
    """A TxnResponse; `responses` are the sizes of its nested responses (each with a header),
    each wrapped in a ResponseOp."""
    nested = sum(_field(_field(size)) for size in responses)
    return header(revision) + _number(int(succeeded)) + nested


def lease_response(revision: int, seconds: int) -> int:
    """A LeaseGrantResponse or LeaseKeepAliveResponse: id and TTL."""
    return header(revision) + _number(_LEASE_ID) + _number(seconds)


def time_to_live_response(revision: int, seconds: int) -> int:
    return lease_response(revision, seconds) + _number(seconds)


def watch_created(revision: int) -> int:
    """The first response of a watch stream (its watch id, the stream's first, is 0)."""
    return header(revision) + _number(1)


def watch_events(revision: int, changes: Sequence[Change]) -> int:
    """A WatchResponse carrying `changes` as events (type DELETE = 1, PUT = 0 left out)."""
    events = sum(
        _field(_number(int(c.deleted)) + _field(key_value(c.key, c.value, c.revision)))
        for c in changes
    )
    return header(revision) + events


# --- counting ------------------------------------------------------------------------------------

# The size of the range of every key below a prefix, by (prefix, store revision), per store.
_RANGE_SIZES: weakref.WeakKeyDictionary[MemoryEtcd, dict[tuple[str, int], int]] = (
    weakref.WeakKeyDictionary()
)


@dataclass
class Tally:
    """One node's calls and requests, and the bytes etcd sent it, over one stretch of time."""

    calls: Counter[str] = field(default_factory=Counter)  # KeyValue method -> calls
    requests: Counter[str] = field(default_factory=Counter)  # gRPC method -> requests
    sent: Counter[str] = field(default_factory=Counter)  # gRPC method -> bytes etcd sent

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.sent.values())

    def add(self, other: Tally) -> None:
        self.calls.update(other.calls)
        self.requests.update(other.requests)
        self.sent.update(other.sent)


class CountingKeyValue(SimulatedKeyValue):
    """A node's simulated client that counts, per call, the requests the v3 transport would
    make of etcd and the bytes etcd would send back (see the module's docstring).

    Counting needs what etcd held when a request reached it. Between a request's step and its
    return no other actor runs, so the store right after a call is the store that answered it;
    what it held just before (did this call write?) is caught in `_request`. A watch is
    played as the transport's requests, each a step of its own.
    """

    def __init__(self, sim: Simulation, node: str) -> None:
        super().__init__(sim, node, claims=True)
        self.phase = CREATION
        self.tallies: dict[str, Tally] = {CREATION: Tally(), RENDEZVOUS: Tally()}
        self._etcd = sim.etcd
        # Keys whose lease this client knows without a read (v3's `_key_leases` and
        # directories): it wrote them with a TTL, or marked them as a directory.
        self._leased: set[str] = set()
        # Lease seconds -> virtual time a refused TTL write left its lease spare.
        self._spares: dict[int, float] = {}
        # The store's revision when each actor's last request reached it, before it applied.
        self._served_at: dict[Actor | None, int] = {}

    @property
    def tally(self) -> Tally:
        return self.tallies[self.phase]

    def total(self) -> Tally:
        whole = Tally()
        for tally in self.tallies.values():
            whole.add(tally)
        return whole

    # --- the interface, counted ----------------------------------------------------------------

    def get(self, key: str) -> Entry:
        self._called("get")
        try:
            entry = super().get(key)
        except KeyNotFound:
            self._answer("Range", range_response(self._etcd.revision, ()))
            raise
        self._answer("Range", range_response(entry.read_revision, (entry,)))
        return entry

    def create(self, key: str, value: str, ttl: float | None = None) -> Entry:
        self._called("create")
        self._granted(ttl)
        try:
            entry = super().create(key, value, ttl)
        except AlreadyExists as taken:
            self._refused(ttl, taken.current)
            raise
        self._written(key, ttl, txn_response(entry.revision, True, [put_response(entry.revision)]))
        return entry

    def put(self, key: str, value: str, ttl: float | None = None) -> Entry:
        self._called("put")
        self._granted(ttl)
        entry = super().put(key, value, ttl)
        self._written(key, ttl, put_response(entry.revision), rpc="Put")
        return entry

    def compare_and_swap(
        self, key: str, value: str, expected: Entry, ttl: float | None = None
    ) -> Entry:
        self._called("compare_and_swap")
        self._granted(ttl)
        try:
            entry = super().compare_and_swap(key, value, expected, ttl)
        except CompareFailed as refusal:
            self._refused(ttl, refusal.current)
            raise
        self._written(key, ttl, txn_response(entry.revision, True, [put_response(entry.revision)]))
        return entry

    def claim(
        self, key: str, value: str, *, guard: Entry, queue: str, ttl: float | None = None
    ) -> Claim:
        self._called("claim")
        self._granted(ttl)
        try:
            claimed = super().claim(key, value, guard=guard, queue=queue, ttl=ttl)
        except CompareFailed as refusal:
            self._refused(ttl, refusal.current)
            raise
        except AlreadyExists:
            # The guard held, so the failure branch's read of it finds it as the caller saw it.
            self._refused(ttl, guard)
            raise
        revision = claimed.entry.revision
        counted = range_response(revision, (), count=claimed.position)
        self._written(key, ttl, txn_response(revision, True, [put_response(revision), counted]))
        return claimed

    def compare_and_delete(self, key: str, expected: Entry) -> None:
        self._called("compare_and_delete")
        try:
            super().compare_and_delete(key, expected)
        except CompareFailed:
            self._answer("Txn", txn_response(self._etcd.revision, False, ()))
            raise
        revision = self._etcd.revision
        self._answer("Txn", txn_response(revision, True, [delete_response(revision, 1)]))
        self._leased.discard(key)

    def refresh(self, key: str, ttl: float) -> None:
        self._called("refresh")
        if key not in self._leased:
            # The transport reads a key it did not write for its lease first.
            entry = self._etcd._entry(key)
            self._answer(
                "Range", range_response(self._etcd.revision, () if entry is None else (entry,))
            )
        try:
            super().refresh(key, ttl)
        except KeyNotFound:
            self._answer("LeaseKeepAlive", lease_response(self._etcd.revision, 0))
            raise
        self._answer("LeaseKeepAlive", lease_response(self._etcd.revision, _lease_seconds(ttl)))

    def ensure_directory(self, key: str, ttl: float | None = None) -> None:
        self._called("ensure_directory")
        super().ensure_directory(key, ttl)
        if ttl is None:
            return  # v3 has no directories: no request
        marker = self._etcd._entry(key)
        revision = self._etcd.revision
        if revision != self._served_at.get(self._sim.current):
            # This call wrote the marker: the transport read it absent, granted its lease and
            # created it in a transaction.
            self._answer("Range", range_response(revision - 1, ()))
            self._answer("LeaseGrant", lease_response(revision - 1, _lease_seconds(ttl)))
            self._answer("Txn", txn_response(revision, True, [put_response(revision)]))
        else:
            self._answer("Range", range_response(revision, () if marker is None else (marker,)))
        self._leased.add(key)

    def list(self, prefix: str) -> Listing:
        self._called("list")
        listing = super().list(prefix)
        # etcd answers a range of every key below the prefix, however deep; the transport
        # keeps the direct children.
        start = prefix.rstrip("/") + "/"
        # One revision is one content of the store: after the final version every node lists
        # the version's store at about the same revision, and a scan of every key each time
        # would be O(N) per node.
        sizes = _RANGE_SIZES.setdefault(self._etcd, {})
        size = sizes.get((start, listing.revision))
        if size is None:
            below = [self._etcd._entry(key) for key in self._etcd._keys if key.startswith(start)]
            size = range_response(listing.revision, [e for e in below if e is not None])
            sizes[(start, listing.revision)] = size
        self._answer("Range", size)
        return listing

    def watch(
        self, key: str, after_revision: int, timeout: float, recursive: bool = False
    ) -> Change | None:
        """As the v3 transport watches (`EtcdV3.watch`): the stream opens (a request, and its
        `created` response); a recursive one starts after `after_revision` and is sent what it
        missed at once; a single-key one starts at the present and, if the store moved past
        `after_revision`, reads the key (a request of its own, while the stream is sent the
        key's changes). Then it waits on the simulator's watch for the stream's first event."""
        self._called("watch")
        if timeout <= 0:
            return None  # no request, as the transport
        until = self._sim.now + timeout
        with self._request("watch") as server:
            opened_at = server.revision
            missed = server.changes_after(after_revision) if recursive else []
        self._answer("Watch", watch_created(opened_at))
        if recursive:
            below = key.rstrip("/") + "/"
            last = after_revision + _WATCH_BATCH_REVISIONS
            batch = [c for c in missed if c.key.startswith(below) and c.revision <= last]
            if batch:
                self.tally.sent["Watch"] += watch_events(opened_at, batch)
                return batch[0]
        elif opened_at > after_revision:
            # The store moved on since the caller's read: one read of the key covers the gap.
            try:
                entry: Entry | None = super().get(key)
            except KeyNotFound:
                entry = None
            read_at = self._etcd.revision
            self._answer("Range", range_response(read_at, () if entry is None else (entry,)))
            # Meanwhile the stream was sent the key's changes since it opened: sent, and
            # thrown away when the read already found the change.
            for streamed in self._etcd.changes_after(opened_at):
                if streamed.key == key:
                    self.tally.sent["Watch"] += watch_events(streamed.revision, [streamed])
            if entry is not None and entry.revision > after_revision:
                return Change(key, entry.value, entry.revision)
        left = until - self._sim.now
        if left <= 0:
            return None
        # The stream's first event after it opened (the simulator's watch: no request counted).
        change = super().watch(key, opened_at, left, recursive)
        if change is not None:
            self.tally.sent["Watch"] += watch_events(change.revision, [change])
        return change

    def time_left(self, entry: Entry) -> float | None:
        self._called("time_left")
        left = super().time_left(entry)
        if entry.lease:
            seconds = 0 if left is None else round(left)
            self._answer("LeaseTimeToLive", time_to_live_response(self._etcd.revision, seconds))
        return left

    # --- bookkeeping ---------------------------------------------------------------------------

    @contextmanager
    def _request(self, operation: str, *, conditional: bool = False) -> Iterator[MemoryEtcd]:
        with super()._request(operation, conditional=conditional) as server:
            self._served_at[self._sim.current] = server.revision
            yield server

    def _called(self, method: str) -> None:
        self.tally.calls[method] += 1

    def _answer(self, rpc: str, size: int) -> None:
        tally = self.tally
        tally.requests[rpc] += 1
        tally.sent[rpc] += size

    def _granted(self, ttl: float | None) -> None:
        """A TTL write asks for a lease first, unless one its refused write left spare serves."""
        if ttl is None:
            return
        seconds = _lease_seconds(ttl)
        spare_since = self._spares.pop(seconds, None)
        if spare_since is not None and self._sim.now - spare_since < _LEASE_MARGIN_SECONDS:
            return
        self._answer("LeaseGrant", lease_response(self._etcd.revision, seconds))

    def _written(self, key: str, ttl: float | None, size: int, rpc: str = "Txn") -> None:
        self._answer(rpc, size)
        if ttl is not None:
            self._leased.add(key)
        else:
            self._leased.discard(key)

    def _refused(self, ttl: float | None, current: Entry | None) -> None:
        """A transaction whose compare failed: its failure branch read the key it names."""
        revision = self._etcd.revision
        found = () if current is None else (current,)
        self._answer("Txn", txn_response(revision, False, [range_response(revision, found)]))
        if ttl is not None:
            self._spares[_lease_seconds(ttl)] = self._sim.now


# --- one rendezvous of N nodes -----------------------------------------------------------------


@dataclass
class ModelRun:
    nodes: int
    seed: int
    per_node: list[dict[str, Tally]]  # per node: CREATION and RENDEZVOUS tallies
    wall_seconds: float
    virtual_seconds: float  # from the release to the last return, on the simulator's clock
    steps: int

    def node_totals(self) -> list[Tally]:
        totals = []
        for tallies in self.per_node:
            whole = Tally()
            for tally in tallies.values():
                whole.add(tally)
            totals.append(whole)
        return totals

    def total(self, phase: str | None = None) -> Tally:
        whole = Tally()
        for tallies in self.per_node:
            for name, tally in tallies.items():
                if phase is None or name == phase:
                    whole.add(tally)
        return whole

    def summary(self) -> dict[str, Any]:
        totals = self.node_totals()
        requests = [t.total_requests for t in totals]
        sent = [t.total_bytes for t in totals]
        everything, rendezvous = self.total(), self.total(RENDEZVOUS)
        n = self.nodes
        return {
            "nodes": n,
            "seed": self.seed,
            "requests_per_node": everything.total_requests / n,
            "rendezvous_requests_per_node": rendezvous.total_requests / n,
            "bytes_per_node": everything.total_bytes / n,
            "rendezvous_bytes_per_node": rendezvous.total_bytes / n,
            "requests_total": everything.total_requests,
            "bytes_total": everything.total_bytes,
            "requests_per_node_min_median_max": [
                min(requests),
                statistics.median(requests),
                max(requests),
            ],
            "bytes_per_node_min_median_max": [min(sent), statistics.median(sent), max(sent)],
            "calls_per_node": {k: v / n for k, v in sorted(everything.calls.items())},
            "requests_per_node_by_method": {
                k: v / n for k, v in sorted(everything.requests.items())
            },
            "bytes_per_node_by_method": {k: v / n for k, v in sorted(everything.sent.items())},
            "wall_seconds": round(self.wall_seconds, 2),
            "virtual_seconds": round(self.virtual_seconds, 4),
            "steps": self.steps,
        }


def run_model(
    nodes: int,
    *,
    seed: int = 0,
    client: Callable[[Simulation, str], CountingKeyValue] = CountingKeyValue,
) -> ModelRun:
    """One rendezvous of `nodes` nodes over the in-memory etcd, counted per node; `client`
    makes each node's client (a test's spy)."""
    started = time.monotonic()
    sim = Simulation(seed)
    config = RendezvousConfig(RUN_ID, parse_endpoints("memory:2379"), nodes, nodes)
    names = [f"n{i:05d}" for i in range(nodes)]
    clients = [client(sim, name) for name in names]
    handlers: list[EtcdRdzvHandler | None] = [None] * nodes
    created = 0
    results: list[tuple[int, int, str, int]] = []  # (rank, world size, master, version)
    # Claimants as the default names them (host, pid, 8 hex digits), but reproducible.
    host, pid = socket.gethostname(), os.getpid()

    def create(index: int) -> Callable[[], None]:
        def body() -> None:
            kv = clients[index]
            runtime = SimulatedRuntime(sim, names[index])
            # As `handler.create_handler` builds one, with the simulator's client and clock.
            master = MasterAddress(kv, config)
            rendezvous = EtcdRendezvous(
                kv,
                config,
                NOOP_OBSERVER,
                on_rank_zero=master.publish,
                runtime=runtime,
                claimant=f"{host}-{pid}-{index:08x}",
            )
            rendezvous.prepare()
            handlers[index] = EtcdRdzvHandler(rendezvous, kv, NOOP_OBSERVER, master)
            nonlocal created
            created += 1

        return body

    def rendezvous(handler: EtcdRdzvHandler) -> Callable[[], None]:
        def body() -> None:
            info = handler.next_rendezvous()
            membership = handler.last_membership
            bootstrap = info.bootstrap_store_info
            assert membership is not None and bootstrap is not None
            master = f"{bootstrap.master_addr}:{bootstrap.master_port}"
            results.append((info.rank, info.world_size, master, membership.version))

        return body

    for index, name in enumerate(names):
        sim.spawn(name, f"{name}/create", create(index))
    _run_until(sim, lambda: created == nodes)
    released_at = sim.now
    for kv in clients:
        kv.phase = RENDEZVOUS
    for name, handler in zip(names, handlers, strict=True):
        assert handler is not None
        sim.spawn(name, f"{name}/rendezvous", rendezvous(handler))
    _run_until(sim, lambda: len(results) == nodes)
    virtual = sim.now - released_at
    steps = sim.steps
    sim.drain()
    _check(results, nodes)
    return ModelRun(
        nodes,
        seed,
        [kv.tallies for kv in clients],
        time.monotonic() - started,
        virtual,
        steps,
    )


def _run_until(sim: Simulation, done: Callable[[], bool]) -> None:
    # Not `until nothing can run`: the refreshers sleep for ever, and the clock would follow.
    while not done():
        if sim.errors:
            raise RuntimeError(f"a node raised: {sim.errors[0]}")
        if not sim.run_step():
            raise RuntimeError("the simulation stopped before every node was done")


def _check(results: list[tuple[int, int, str, int]], nodes: int) -> None:
    """One membership of all the nodes: ranks 0..N-1 once each, one world size, one master."""
    ranks = sorted(rank for rank, _, _, _ in results)
    shapes = {(size, master, version) for _, size, master, version in results}
    if ranks != list(range(nodes)) or len(shapes) != 1 or next(iter(shapes))[0] != nodes:
        raise RuntimeError(f"not one membership of {nodes} nodes: {sorted(results)[:8]} ...")


# --- the command -----------------------------------------------------------------------------


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def format_tables(summaries: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| N | requests/node | of which rendezvous | bytes/node | bytes/node min-max "
        "| requests total | bytes total | virtual s | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        low, _, high = s["bytes_per_node_min_median_max"]
        lines.append(
            f"| {s['nodes']:,} | {s['requests_per_node']:.2f} "
            f"| {s['rendezvous_requests_per_node']:.2f} | {_human(s['bytes_per_node'])} "
            f"| {_human(low)} - {_human(high)} | {s['requests_total']:,} "
            f"| {_human(s['bytes_total'])} | {s['virtual_seconds']:.3f} "
            f"| {s['wall_seconds']:.1f} |"
        )
    methods = sorted({m for s in summaries for m in s["requests_per_node_by_method"]})
    lines += [
        "",
        "Per node, by gRPC method: requests / bytes etcd sent",
        "",
        "| N | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for s in summaries:
        cells = [
            f"{s['requests_per_node_by_method'].get(m, 0):.2f} / "
            f"{_human(s['bytes_per_node_by_method'].get(m, 0))}"
            for m in methods
        ]
        lines.append(f"| {s['nodes']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scale_model",
        description="etcd requests and bytes per node of one rendezvous, over the in-memory "
        "etcd (see the module's docstring for what is counted and what is left out)",
    )
    parser.add_argument("--nodes", type=int, nargs="+", default=list(DEFAULT_NODES))
    parser.add_argument("--seed", type=int, default=0, help="the simulator's schedule")
    parser.add_argument("--json", type=Path, help="write the summaries here")
    args = parser.parse_args(argv)
    # Telemetry off, as the benchmark's `log_level=WARNING`.
    logging.getLogger("etcd_rdzv").setLevel(logging.WARNING)
    summaries = []
    for nodes in args.nodes:
        summary = run_model(nodes, seed=args.seed).summary()
        summaries.append(summary)
        print(
            f"N = {nodes:,}: {summary['requests_per_node']:.2f} requests and "
            f"{_human(summary['bytes_per_node'])} per node, in {summary['wall_seconds']:.1f} s",
            flush=True,
        )
    print()
    print(format_tables(summaries))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"runs": summaries}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
