"""The rendezvous algorithm: torch's etcd protocol, one method per phase.

    next_rendezvous
      setup            create the next version, or observe the current one
      join             take a rank in a joinable version (compare-and-swap)
      last call        the node that reached min_nodes holds the window open, then freezes it
      frozen wait      wait until the participant set is frozen
      confirm          publish a keep-alive key and add it to the state
      final wait       wait until every participant confirmed: the version is final
    wait next version  a final version exists: announce ourselves waiting, and wait until it
                       ends (its members re-rendezvous, or one of them dies)

Each wait is an etcd watch on the state key, never a sleep. A phase that finds the state
moved on raises `_StartOver`; `next_rendezvous` starts again from setup until its deadline.

Two layouts, one per etcd API. Over v2 a node joins and confirms by a compare-and-swap of the
shared state, exactly as torch's backend does, so both can take part in one rendezvous. Over
v3 (which torch never speaks) it claims a key of its own instead (see `protocol`, "claims"):
no node loses a compare-and-swap to another, and waiting nodes wake up only when the version
freezes and when it goes final.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from etcd_rdzv import protocol
from etcd_rdzv.config import RendezvousConfig
from etcd_rdzv.errors import (
    ConfigurationError,
    CorruptStateError,
    EtcdUnavailableError,
    RendezvousClosedError,
    RendezvousTimeoutError,
)
from etcd_rdzv.kv import (
    AlreadyExists,
    CompareFailed,
    Entry,
    KeyNotFound,
    KeyValue,
    KvError,
    OutcomeUnknown,
)
from etcd_rdzv.layouts import NodeIdentity, RunPaths, layout_for
from etcd_rdzv.leases import KeepAlive
from etcd_rdzv.protocol import Lifetime, RendezvousState, Status
from etcd_rdzv.retry import CAS_BACKOFF, TRANSIENT_BACKOFF, Deadline
from etcd_rdzv.runtime import SYSTEM, Runtime
from etcd_rdzv.telemetry import NOOP_OBSERVER, Observer, Outcome, Phase, PhaseScope

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Membership:
    version: int
    rank: int
    world_size: int


class _StartOver(Exception):
    """The state moved on under this phase: start again from setup.

    `reason` is one of a few fixed codes (a metric label); `detail` says it for people.
    """

    def __init__(self, phase: Phase, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.phase = phase
        self.reason = reason
        self.detail = detail


Snapshot = tuple[Entry, RendezvousState]


class EtcdRendezvous:
    def __init__(
        self,
        kv: KeyValue,
        config: RendezvousConfig,
        observer: Observer = NOOP_OBSERVER,
        on_rank_zero: Callable[[int], object] | None = None,
        *,
        runtime: Runtime = SYSTEM,
        claimant: str | None = None,
    ) -> None:
        """`on_rank_zero(version)` runs once this node confirmed rank 0 of `version`, while
        the others may still confirm: the handler publishes the master address there.
        `runtime` is the clock, sleep and threads (a simulation's in tests); `claimant` names
        this node's join claims (unique per process and rendezvous object unless given)."""
        self._runtime = runtime
        self.config = config
        self._on_rank_zero = on_rank_zero
        self.paths = RunPaths(config.run_path)
        self._kv = kv
        self._layout = layout_for(kv, self.paths)
        self._observer = observer
        self._run_keep_alive: KeepAlive | None = None
        self._rank_keep_alive: KeepAlive | None = None
        self._last_seen: tuple[int | None, str] | None = None
        # Under claims a joinable document lists nobody: the claims this node counted last.
        self._claims_counted: tuple[int, int] | None = None  # (version, claims)
        self._lock = threading.Lock()
        # Names this node's join claims; unique per process and per rendezvous object.
        self._claimant = claimant or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # The value of this node's keys (claims, keep-alives): the same for every version.
        self._identity = _node_identity(config.local_addr, config.ttls.keep_alive)

    # --- lifecycle ---------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the run's directories and keep the run alive.

        The version counter is left to the node that opens the first version: one request per
        node fewer, and torch's nodes create it for themselves.
        """
        if self.config.prefix != "/":
            self._kv.ensure_directory(self.config.prefix)
        self._kv.ensure_directory(self.paths.run, ttl=self.config.ttls.run)
        if self._run_keep_alive is None:
            self._run_keep_alive = KeepAlive(
                self._kv,
                self.paths.run,
                self.config.ttls.run,
                "run",
                self._observer,
                runtime=self._runtime,
            ).start()
        self._kv.ensure_directory(self.paths.rdzv)

    def stop(self) -> None:
        """Stop every refresher; the run's keys then expire on their own."""
        self._release_rank()
        if self._run_keep_alive is not None:
            self._run_keep_alive.stop()
            self._run_keep_alive = None

    # --- the barrier -------------------------------------------------------------------------

    def next_rendezvous(self) -> Membership:
        """Block until this node is a confirmed participant of a final version."""
        deadline = Deadline(self.config.timeout, self._runtime.monotonic)
        with self._phase(Phase.RENDEZVOUS) as scope:
            attempt = 0
            last_problem = "no state seen yet"
            while not deadline.expired():
                self._release_rank()
                try:
                    membership = self._attempt(deadline, attempt)
                except _StartOver as start_over:
                    attempt += 1
                    last_problem = start_over.detail
                    # No pause: a phase starts over only on a state that changed under it,
                    # so the next attempt acts on new state or waits on a watch.
                    self._observer.retry(
                        start_over.phase, start_over.reason, attempt, start_over.detail
                    )
                    continue
                except (EtcdUnavailableError, OutcomeUnknown) as error:
                    attempt += 1
                    last_problem = f"etcd error: {error}"
                    self._observer.retry(None, "etcd_unavailable", attempt, str(error))
                    log.warning("rendezvous attempt failed, retrying: %s", error)
                    TRANSIENT_BACKOFF.sleep(min(attempt, 8), deadline, self._runtime)
                    continue
                scope.annotate(
                    version=membership.version,
                    rank=membership.rank,
                    world_size=membership.world_size,
                )
                return membership
            raise RendezvousTimeoutError(
                f"Rendezvous of run {self.config.run_id!r} did not complete within "
                f"{self.config.timeout:g}s (min {self.config.min_nodes}, max "
                f"{self.config.max_nodes} nodes); last: {last_problem}; state: "
                f"{self._describe_last_seen()}."
            )

    def _attempt(self, deadline: Deadline, attempt: int) -> Membership:
        with self._phase(Phase.SETUP, attempt=attempt + 1) as scope:
            entry, state = self._create_or_observe()
            scope.annotate(version=state.version, state=state.status.value)
            if state.status in (Status.SETUP, Status.FROZEN):
                # Another node's transition is under way: setup lasts until it ends.
                self._await(
                    (entry, state),
                    Phase.SETUP,
                    done=lambda s: False,
                    still=lambda s: s.status is state.status and s.version == state.version,
                    deadline=deadline,
                )
        if state.status is Status.CLOSED:
            raise RendezvousClosedError(f"Rendezvous of run {self.config.run_id!r} is closed.")
        if state.status is Status.FINAL:
            self._wait_next_version((entry, state), deadline)
            raise _StartOver(Phase.WAIT_NEXT_VERSION, "version_ended", "the final version ended")
        assert state.status is Status.JOINABLE and state.version is not None
        return self._take_part(state.version, (entry, state), deadline)

    def _take_part(self, version: int, snapshot: Snapshot, deadline: Deadline) -> Membership:
        self._enter_version(version, snapshot[1])
        if self._layout.joins_by_claims:
            return self._take_part_by_claims(version, snapshot, deadline)
        with self._phase(Phase.JOIN, version=version) as scope:
            joined, snapshot = self._join(version, snapshot, deadline, scope)
            scope.annotate(rank=joined.rank, participants=joined.state.world_size)
        if joined.holds_last_call:
            with self._phase(Phase.LAST_CALL, version=version, rank=joined.rank):
                snapshot = self._hold_last_call(version, snapshot, deadline)
        with self._phase(Phase.FROZEN_WAIT, version=version, rank=joined.rank) as scope:
            snapshot = self._await(
                snapshot,
                Phase.FROZEN_WAIT,
                done=lambda s: s.is_version(Status.FROZEN, version),
                still=lambda s: s.is_version(Status.JOINABLE, version),
                deadline=deadline,
            )
            scope.annotate(participants=snapshot[1].world_size)
        with self._phase(Phase.CONFIRM, version=version, rank=joined.rank):
            snapshot = self._confirm(version, joined.rank, deadline)
        return self._await_final(version, joined.rank, snapshot, deadline)

    def _take_part_by_claims(
        self, version: int, snapshot: Snapshot, deadline: Deadline
    ) -> Membership:
        """The same phases, joining and confirming by claims (etcd v3)."""
        with self._phase(Phase.JOIN, version=version) as scope:
            claimed = self._claim_rank(version, snapshot)
            if claimed.too_late:
                scope.annotate(participants=self.config.max_nodes)
            else:
                scope.annotate(rank=claimed.rank, participants=claimed.rank + 1)
                if claimed.freezes:
                    snapshot = self._freeze(version, snapshot, Phase.JOIN, self.config.max_nodes)
        if claimed.too_late:
            self._await_freeze(version, snapshot, claimed, deadline)
            raise _StartOver(Phase.JOIN, "version_full", f"version {version} filled up first")
        rank = claimed.rank
        if claimed.holds_last_call:
            with self._phase(Phase.LAST_CALL, version=version, rank=rank):
                snapshot = self._hold_last_call(version, snapshot, deadline)
        with self._phase(Phase.FROZEN_WAIT, version=version, rank=rank) as scope:
            snapshot = self._await_freeze(version, snapshot, claimed, deadline)
            scope.annotate(participants=snapshot[1].world_size)
        if rank >= snapshot[1].world_size:
            # Its claim came after the last-call holder counted the claims and froze.
            raise _StartOver(Phase.FROZEN_WAIT, "version_full", f"version {version} froze first")
        with self._phase(Phase.CONFIRM, version=version, rank=rank):
            snapshot = self._claim_confirmation(version, rank, snapshot)
        return self._await_final(version, rank, snapshot, deadline)

    def _await_final(
        self, version: int, rank: int, snapshot: Snapshot, deadline: Deadline
    ) -> Membership:
        """Final wait, in either layout; rank 0 publishes what the others need meanwhile."""
        with self._phase(Phase.FINAL_WAIT, version=version, rank=rank):
            if rank == 0 and self._on_rank_zero is not None:
                self._on_rank_zero(version)
            _, state = self._await(
                snapshot,
                Phase.FINAL_WAIT,
                done=lambda s: s.is_version(Status.FINAL, version),
                still=lambda s: s.is_version(Status.FROZEN, version),
                deadline=deadline,
            )
        return Membership(version, rank, state.world_size)

    # --- phases ------------------------------------------------------------------------------

    def _create_or_observe(self) -> Snapshot:
        """Setup: open the next version if there is none, else report the current state.

        Read first: all but one node find a state, and a read is one request where a refused
        create is two over v3 (its placeholder's lease, then the transaction).
        """
        try:
            return self._read_state(Phase.SETUP)
        except _StartOver:
            pass  # no active version: open one
        placeholder_state = protocol.setup(now=self._runtime.time())
        try:
            placeholder = self._kv.create(
                self.paths.active_version, placeholder_state.encode(), ttl=self.config.ttls.setup
            )
        except AlreadyExists as taken:
            return self._state_after(taken, Phase.SETUP)
        self._see(placeholder_state, made=True)
        version = self._increment_version_counter()
        self._kv.ensure_directory(self.paths.version_dir(version))
        # The version's trace travels in its state: no node reads a key of its own for it.
        trace_context = self._observer.open_version(version)
        opened = protocol.open_version(
            version,
            now=self._runtime.time(),
            trace_context=trace_context,
            nodes=(self.config.min_nodes, self.config.max_nodes),
        )
        try:
            entry = self._kv.compare_and_swap(
                self.paths.active_version, opened.encode(), placeholder, ttl=None
            )
        except CompareFailed:
            # The placeholder expired or the run was closed meanwhile.
            raise _StartOver(Phase.SETUP, "setup_replaced", "setup placeholder replaced") from None
        self._see(opened, made=True)
        log.info("opened rendezvous version %d of run %s", version, self.config.run_id)
        return entry, opened

    def _join(
        self, version: int, snapshot: Snapshot, deadline: Deadline, scope: PhaseScope
    ) -> tuple[protocol.Joined, Snapshot]:
        entry, state = snapshot
        for attempt in range(CAS_BACKOFF.max_attempts):
            if not state.is_version(Status.JOINABLE, version):
                raise _StartOver(
                    Phase.JOIN, "state_moved_on", f"version {version} stopped being joinable"
                )
            if state.world_size >= self.config.max_nodes:
                raise ConfigurationError(
                    f"Run {self.config.run_id!r}: version {version} is joinable with "
                    f"{state.world_size} participants, as many as this node's max_nodes "
                    f"{self.config.max_nodes} or more: every node of a run must use the same "
                    "--nnodes MIN:MAX."
                )
            joined = protocol.join(
                state, self.config.min_nodes, self.config.max_nodes, now=self._runtime.time()
            )
            try:
                entry = self._kv.compare_and_swap(
                    self.paths.active_version,
                    joined.state.encode(),
                    entry,
                    ttl=self._ttl(joined.lifetime),
                )
            except CompareFailed:
                scope.event("compare_failed", attempt=attempt + 1)
                self._observer.retry(Phase.JOIN, "compare_failed", attempt + 1)
                CAS_BACKOFF.sleep(attempt, deadline, self._runtime)
                entry, state = self._read_state(Phase.JOIN)
                continue
            self._see(joined.state, made=True)
            return joined, (entry, joined.state)
        raise _StartOver(Phase.JOIN, "cas_exhausted", "too many lost compare-and-swaps")

    def _claim_rank(self, version: int, snapshot: Snapshot) -> protocol.ClaimedRank:
        """Join by claim: a key of our own, created while the joinable state is unchanged."""
        entry, state = snapshot
        if not state.is_version(Status.JOINABLE, version):
            raise _StartOver(Phase.JOIN, "state_moved_on", f"version {version} is not joinable")
        ours = (self.config.min_nodes, self.config.max_nodes)
        declared = protocol.declared_nodes(state)
        if declared is not None and declared != ours:
            raise ConfigurationError(
                f"Run {self.config.run_id!r}: version {version} was opened with --nnodes "
                f"{declared[0]}:{declared[1]} and this node has min_nodes {ours[0]}, max_nodes "
                f"{ours[1]}: every node of a run must use the same --nnodes MIN:MAX."
            )
        key = self.paths.join_claims(version) + self._claimant
        try:
            position = self._kv.claim(
                key, self._identity, guard=entry, queue=self.paths.join_claims(version)
            ).position
        except CompareFailed as moved:
            # Frozen (or gone) under us; the refusal carries the state that replaced it.
            self._observer.retry(Phase.JOIN, "compare_failed", 1)
            if moved.current is not None:
                self._decode(moved.current)
            raise _StartOver(
                Phase.JOIN, "state_moved_on", f"version {version} stopped being joinable"
            ) from None
        except AlreadyExists:
            # An earlier claim of ours applied though its answer was lost: find its place.
            position = self._position_of(key, self.paths.join_claims(version))
        claimed = protocol.claimed_rank(position, self.config.min_nodes, self.config.max_nodes)
        self._count_claims(version, position)
        self._observer.state_seen(version, Status.JOINABLE.value, self._participants(state))
        return claimed

    def _position_of(self, key: str, queue: str) -> int:
        """The place of a claim among its queue's, from a listing: claims are never rewritten,
        so their revisions are their creation order."""
        directory, _, _ = queue.rpartition("/")
        entries = self._kv.list(directory).entries
        claims = [entry for entry in entries if entry.key.startswith(queue)]
        mine = next(entry.revision for entry in claims if entry.key == key)
        return sum(1 for entry in claims if entry.revision <= mine)

    def _freeze(self, version: int, snapshot: Snapshot, phase: Phase, world_size: int) -> Snapshot:
        """Freeze a claimed version with its first `world_size` claims as participants."""
        entry, state = snapshot
        for attempt in range(CAS_BACKOFF.max_attempts):
            if state.is_version(Status.FROZEN, version):
                return entry, state
            if not state.is_version(Status.JOINABLE, version):
                raise _StartOver(phase, "state_moved_on", f"version {version} changed")
            frozen = protocol.freeze(state, now=self._runtime.time(), world_size=world_size)
            try:
                entry = self._kv.compare_and_swap(
                    self.paths.active_version, frozen.encode(), entry, ttl=self.config.ttls.frozen
                )
            except CompareFailed as lost:
                self._observer.retry(phase, "compare_failed", attempt + 1)
                entry, state = self._state_after(lost, phase)
                continue
            self._see(frozen, made=True)
            return entry, frozen
        raise _StartOver(phase, "cas_exhausted", "too many lost compare-and-swaps")

    def _await_freeze(
        self, version: int, snapshot: Snapshot, claimed: protocol.ClaimedRank, deadline: Deadline
    ) -> Snapshot:
        """Watch the joinable version until it freezes.

        Under claims the joinable state has no TTL tying it to the last-call holder's life, so
        every node that joined after the holder backs it up: if the version is still joinable
        a joinable TTL after the last call should have ended, the holder is gone, and the node
        tears the version down, which is what the TTL's expiry does in torch's layout.
        """

        def frozen(state: RendezvousState) -> bool:
            return state.is_version(Status.FROZEN, version)

        def joinable(state: RendezvousState) -> bool:
            return state.is_version(Status.JOINABLE, version)

        # Only nodes that joined after the holder back it up; the others just wait.
        abandoned = None
        if claimed.rank >= self.config.min_nodes:
            abandoned = Deadline(
                self.config.last_call_timeout + self.config.ttls.joinable, self._runtime.monotonic
            )
        entry, state = self._await(
            snapshot,
            Phase.FROZEN_WAIT,
            done=frozen,
            still=joinable,
            deadline=deadline,
            until=abandoned,
        )
        if frozen(state):
            return entry, state
        log.info("last call of version %d outlived its window; tearing it down", version)
        self._tear_down(version, entry, Status.JOINABLE)
        raise _StartOver(
            Phase.FROZEN_WAIT, "last_call_abandoned", f"nobody froze version {version}"
        )

    def _claim_confirmation(self, version: int, rank: int, snapshot: Snapshot) -> Snapshot:
        """Confirm by claim: the keep-alive key itself, created while the frozen state is
        unchanged. The claim that completes the set makes the version final."""
        entry, state = snapshot
        key = self.paths.keep_alive(version, rank)
        queue = self.paths.keep_alives(version)
        try:
            position = self._kv.claim(
                key, self._identity, guard=entry, queue=queue, ttl=self.config.ttls.keep_alive
            ).position
        except CompareFailed:
            raise _StartOver(
                Phase.CONFIRM, "state_moved_on", f"version {version} stopped being frozen"
            ) from None
        except AlreadyExists:
            # Our earlier claim applied though its answer was lost (ranks are never shared).
            position = self._position_of(key, queue)
        self._hold_rank(version, rank)
        if position < state.world_size:
            return snapshot
        keep_alives = [self.paths.keep_alive(version, r) for r in range(state.world_size)]
        final = protocol.complete(state, keep_alives, now=self._runtime.time())
        try:
            entry = self._kv.compare_and_swap(self.paths.active_version, final.encode(), entry)
        except CompareFailed:
            raise _StartOver(
                Phase.CONFIRM, "state_moved_on", f"version {version} stopped being frozen"
            ) from None
        self._see(final, made=True)
        return entry, final

    def _hold_last_call(self, version: int, snapshot: Snapshot, deadline: Deadline) -> Snapshot:
        """Keep the version joinable for last_call_timeout more seconds, then freeze it.

        The state's TTL is kept fresh meanwhile: if this node dies, the state expires and
        everybody starts over instead of waiting for a freeze that never comes.
        """
        window = Deadline(self.config.last_call_timeout, self._runtime.monotonic)
        if self._layout.joins_by_claims:
            return self._hold_last_call_of_claims(version, snapshot, window, deadline)
        ttl = self.config.ttls.joinable
        refreshed = Deadline(ttl / 3, self._runtime.monotonic)
        entry, state = snapshot
        for attempt in range(CAS_BACKOFF.max_attempts):
            if state.is_version(Status.FROZEN, version):
                return entry, state
            if not state.is_version(Status.JOINABLE, version):
                raise _StartOver(
                    Phase.LAST_CALL, "state_moved_on", f"version {version} changed during last call"
                )
            if deadline.expired():
                raise _StartOver(Phase.LAST_CALL, "deadline", "deadline passed during last call")
            try:
                if window.expired():
                    frozen = protocol.freeze(state, now=self._runtime.time())
                    entry = self._kv.compare_and_swap(
                        self.paths.active_version,
                        frozen.encode(),
                        entry,
                        ttl=self.config.ttls.frozen,
                    )
                    self._see(frozen, made=True)
                    return entry, frozen
                if refreshed.expired():
                    entry = self._kv.compare_and_swap(
                        self.paths.active_version, entry.value, entry, ttl=ttl
                    )
                    refreshed = Deadline(ttl / 3, self._runtime.monotonic)
            except CompareFailed:
                self._observer.retry(Phase.LAST_CALL, "compare_failed", attempt + 1)
                entry, state = self._read_state(Phase.LAST_CALL)
                continue
            wait = deadline.bound(min(window.remaining(), refreshed.remaining()))
            entry, state = self._next_state((entry, state), Phase.LAST_CALL, wait)
        raise _StartOver(Phase.LAST_CALL, "cas_exhausted", "too many lost compare-and-swaps")

    def _hold_last_call_of_claims(
        self, version: int, snapshot: Snapshot, window: Deadline, deadline: Deadline
    ) -> Snapshot:
        """The last call under claims: nothing to keep fresh (the joinable state has no TTL,
        see `_await_freeze`); at the end, count the claims and freeze with as many."""
        entry, state = self._await(
            snapshot,
            Phase.LAST_CALL,
            done=lambda s: s.is_version(Status.FROZEN, version),
            still=lambda s: s.is_version(Status.JOINABLE, version),
            deadline=deadline,
            until=window,
        )
        if state.is_version(Status.FROZEN, version):
            return entry, state  # the claim that filled the version froze it
        claims = len(self._kv.list(self.paths.join_claims(version)).entries)
        self._count_claims(version, claims)
        world_size = min(claims, self.config.max_nodes)
        return self._freeze(version, (entry, state), Phase.LAST_CALL, world_size)

    def _confirm(self, version: int, rank: int, deadline: Deadline) -> Snapshot:
        key = self.paths.keep_alive(version, rank)
        self._kv.put(key, self._identity, ttl=self.config.ttls.keep_alive)
        self._hold_rank(version, rank)
        entry, state = self._read_state(Phase.CONFIRM)
        for attempt in range(CAS_BACKOFF.max_attempts):
            if key in (state.keep_alives or ()) and state.version == version:
                # An earlier compare-and-swap of ours applied though its answer was lost.
                return entry, state
            if not state.is_version(Status.FROZEN, version):
                raise _StartOver(
                    Phase.CONFIRM, "state_moved_on", f"version {version} stopped being frozen"
                )
            confirmed = protocol.confirm(state, key, now=self._runtime.time())
            try:
                entry = self._kv.compare_and_swap(
                    self.paths.active_version,
                    confirmed.state.encode(),
                    entry,
                    ttl=self._ttl(confirmed.lifetime),
                )
            except (CompareFailed, OutcomeUnknown) as error:
                self._observer.retry(Phase.CONFIRM, _reason(error), attempt + 1)
                CAS_BACKOFF.sleep(attempt, deadline, self._runtime)
                entry, state = self._read_state(Phase.CONFIRM)
                continue
            self._see(confirmed.state, made=True)
            return entry, confirmed.state
        raise _StartOver(Phase.CONFIRM, "cas_exhausted", "too many lost compare-and-swaps")

    def _wait_next_version(self, snapshot: Snapshot, deadline: Deadline) -> None:
        """A final version exists: count ourselves waiting, then wait for it to end.

        It ends when its members start a new rendezvous, or when one of them stops renewing
        its keep-alive key: then this node deletes the version so that a new one can open.
        """
        _, final = snapshot
        version = final.version
        assert version is not None
        self._enter_version(version, final)
        with self._phase(Phase.WAIT_NEXT_VERSION, version=version) as scope:
            entry, state = self._announce_waiting(version, snapshot, deadline)
            scope.annotate(participants=state.world_size, nodes_waiting=state.num_workers_waiting)
            while state.is_version(Status.FINAL, version):
                try:
                    listing = self._kv.list(self.paths.version_dir(version))
                    live, seen_at = listing.keys, listing.revision
                except KeyNotFound as gone:
                    live, seen_at = frozenset(), gone.revision or entry.read_revision
                missing = protocol.missing_keep_alives(state, live)
                if missing:
                    scope.event("keep_alive_missing", keys=",".join(missing))
                    log.info("version %d lost %s; tearing it down", version, ", ".join(missing))
                    self._tear_down(version, entry, Status.FINAL)
                    return
                if deadline.expired():
                    raise RendezvousTimeoutError(
                        f"Rendezvous of run {self.config.run_id!r}: waited {self.config.timeout:g}s"
                        f" for final version {version} to end; its members are alive and did "
                        "not start a new rendezvous."
                    )
                change = self._kv.watch(
                    self.paths.rdzv,
                    after_revision=max(entry.read_revision, seen_at),
                    timeout=deadline.remaining(),
                    recursive=True,
                )
                if change is not None and change.key == self.paths.active_version:
                    if change.deleted:
                        return
                    entry = change.entry() or entry
                    state = self._decode(entry)
                elif change is None or change.key.startswith(self.paths.version_dir(version)):
                    try:
                        entry, state = self._read_state(Phase.WAIT_NEXT_VERSION)
                    except _StartOver:
                        return
                else:
                    # Another change under /rdzv (e.g. a store key): state and members unchanged.
                    entry = Entry(entry.key, entry.value, entry.revision, change.revision)

    def _tear_down(self, version: int, entry: Entry, status: Status) -> None:
        """Delete the state as last seen, so that a new version can open; if it moved on
        meanwhile, the next attempt sees how."""
        try:
            self._kv.compare_and_delete(self.paths.active_version, entry)
            self._observer.transition(version, status.value, "deleted", 0, True)
        except (CompareFailed, KeyNotFound, OutcomeUnknown):
            pass

    def _announce_waiting(self, version: int, snapshot: Snapshot, deadline: Deadline) -> Snapshot:
        entry, state = snapshot
        for attempt in range(CAS_BACKOFF.max_attempts):
            if not state.is_version(Status.FINAL, version):
                return entry, state
            waiting = protocol.announce_waiting(state)
            try:
                entry = self._kv.compare_and_swap(
                    self.paths.active_version, waiting.encode(), entry
                )
                return entry, waiting
            except CompareFailed:
                self._observer.retry(Phase.WAIT_NEXT_VERSION, "compare_failed", attempt + 1)
                CAS_BACKOFF.sleep(attempt, deadline, self._runtime)
                entry, state = self._read_state(Phase.WAIT_NEXT_VERSION)
        raise _StartOver(
            Phase.WAIT_NEXT_VERSION, "cas_exhausted", "too many lost compare-and-swaps"
        )

    # --- closing and queries -----------------------------------------------------------------

    def set_closed(self) -> None:
        """Mark the run closed: no node will join any further version."""
        for attempt in range(CAS_BACKOFF.max_attempts):
            try:
                entry = self._kv.get(self.paths.active_version)
            except KeyNotFound:
                try:
                    self._kv.create(
                        self.paths.active_version,
                        protocol.close(None, now=self._runtime.time()).encode(),
                    )
                    return
                except AlreadyExists:
                    continue
            state = self._decode(entry)
            if state.status is Status.CLOSED:
                return
            try:
                self._kv.compare_and_swap(
                    self.paths.active_version,
                    protocol.close(state, now=self._runtime.time()).encode(),
                    entry,
                )
                self._observer.transition(
                    state.version, state.status.value, "closed", state.world_size, True
                )
                log.info("closed rendezvous of run %s", self.config.run_id)
                return
            except CompareFailed:
                CAS_BACKOFF.sleep(attempt, runtime=self._runtime)
        raise EtcdUnavailableError("could not close the rendezvous: state kept changing")

    def members_training_besides(self, membership: Membership | None) -> list[str]:
        """Keep-alive keys of the active final version's other members that still live.

        Raises the transport's errors: a caller that cannot read must not guess."""
        state = self.current_state()
        if state is None or state.status is not Status.FINAL or state.version is None:
            return []
        try:
            live = self._kv.list(self.paths.version_dir(state.version)).keys
        except KeyNotFound:
            live = frozenset()
        own = None
        if membership is not None and membership.version == state.version:
            own = self.paths.keep_alive(membership.version, membership.rank)
        return protocol.members_left_training(state, own, live)

    def current_state(self) -> RendezvousState | None:
        try:
            return self._decode(self._kv.get(self.paths.active_version))
        except KeyNotFound:
            return None

    # --- waiting on the state key ------------------------------------------------------------

    def _await(
        self,
        snapshot: Snapshot,
        phase: Phase,
        *,
        done: Callable[[RendezvousState], bool],
        still: Callable[[RendezvousState], bool],
        deadline: Deadline,
        until: Deadline | None = None,
    ) -> Snapshot:
        """Watch the state until `done`; start over as soon as it is neither done nor `still`.

        With `until`, also return the state as last read (still `still`) once `until` passes.
        """
        entry, state = snapshot
        while not done(state):
            if not still(state):
                raise _StartOver(phase, "state_moved_on", f"state became {_describe(state)}")
            if deadline.expired():
                where = _describe(self._with_participants(state))
                raise _StartOver(phase, "deadline", f"deadline passed in {phase.value} at {where}")
            wait = deadline.remaining()
            if until is not None:
                if until.expired():
                    break
                wait = min(wait, until.remaining())
            entry, state = self._next_state((entry, state), phase, wait)
        return entry, state

    def _next_state(self, snapshot: Snapshot, phase: Phase, timeout: float) -> Snapshot:
        """The state after the next change, or the current one when `timeout` passes first."""
        entry, _ = snapshot
        change = self._kv.watch(self.paths.active_version, entry.read_revision, timeout)
        if change is None:
            return self._read_state(phase) if timeout > 0 else snapshot
        new_entry = change.entry()
        if new_entry is None:
            raise _StartOver(phase, "state_gone", "state expired or was deleted")
        return new_entry, self._decode(new_entry)

    def _with_participants(self, state: RendezvousState) -> RendezvousState:
        """`state` listing who joined, for messages: under claims, one more read."""
        try:
            listed = self._layout.with_participants(self._kv, state)
        except (KvError, EtcdUnavailableError):
            return state
        if listed is not state and state.version is not None:
            self._count_claims(state.version, listed.world_size)
        return listed

    def _count_claims(self, version: int, claims: int) -> None:
        counted = self._claims_counted
        if counted is None or counted[0] != version or counted[1] < claims:
            # Claims are never deleted while their version lasts: a count only grows.
            self._claims_counted = (version, claims)

    def _participants(self, state: RendezvousState) -> int:
        """Participants of `state` as far as this node knows: the document's, or under claims,
        where a joinable document lists nobody, the claims it counted last (those that came
        since are unknown to it until it counts again)."""
        counted = self._claims_counted
        claims = counted[1] if counted is not None and counted[0] == state.version else None
        return self._layout.participants(state, claims)

    def _state_after(self, refusal: AlreadyExists | CompareFailed, phase: Phase) -> Snapshot:
        """The state a refused write found: from the refusal when it tells (v3), else read."""
        if refusal.current is None:
            return self._read_state(phase)
        return refusal.current, self._decode(refusal.current)

    def _read_state(self, phase: Phase) -> Snapshot:
        try:
            entry = self._kv.get(self.paths.active_version)
        except KeyNotFound:
            raise _StartOver(phase, "state_gone", "no active version") from None
        return entry, self._decode(entry)

    def _decode(self, entry: Entry) -> RendezvousState:
        state = RendezvousState.decode(entry.value, entry.key)
        self._see(state)
        return state

    def _see(self, state: RendezvousState, made: bool = False) -> None:
        participants = self._participants(state)
        self._observer.state_seen(state.version, state.status.value, participants)
        now = (state.version, state.status.value)
        before = self._last_seen
        if before != now:
            self._last_seen = now
            self._observer.transition(
                state.version, before[1] if before else None, now[1], participants, made
            )

    # --- phases, as the observer sees them ----------------------------------------------------

    @contextmanager
    def _phase(self, phase: Phase, **attributes: object) -> Iterator[PhaseScope]:
        """The observer's phase, told how it ends: the protocol knows its own exceptions, so
        no observer has to guess the outcome from one."""
        with self._observer.phase(phase, **attributes) as scope:
            try:
                yield scope
            except BaseException as error:
                scope.end(_outcome(phase, error))
                raise

    # --- the context all nodes of a version share --------------------------------------------

    def _enter_version(self, version: int, state: RendezvousState) -> None:
        if self._observer.shares_version_context:
            self._observer.enter_version(version, protocol.trace_context(state))

    def _describe_last_seen(self) -> str:
        if self._last_seen is None:
            return "none seen"
        version, status = self._last_seen
        return f"version {version} {status}" if version is not None else status

    # --- keys and TTLs -----------------------------------------------------------------------

    def _increment_version_counter(self) -> int:
        key = self.paths.version_counter
        counter: Entry | None = None
        for _ in range(CAS_BACKOFF.max_attempts):
            if counter is None:
                try:
                    counter = self._kv.get(key)
                except KeyNotFound:
                    # The run's first version, or its directory expired (a run idle for longer
                    # than its TTL): rebuild the directories, and the first version is 1.
                    self.prepare()
                    try:
                        self._kv.create(key, "1")
                        return 1
                    except AlreadyExists as taken:
                        counter = taken.current
                        continue
            try:
                version = int(counter.value) + 1
            except ValueError:
                raise CorruptStateError(counter.key, "not an integer", counter.value) from None
            if version < 1:
                raise CorruptStateError(counter.key, "negative", counter.value)
            try:
                self._kv.compare_and_swap(key, str(version), counter)
                return version
            except CompareFailed as lost:
                counter = lost.current
        raise _StartOver(Phase.SETUP, "cas_exhausted", "version counter kept changing")

    def _ttl(self, lifetime: Lifetime) -> float | None:
        ttls = self.config.ttls
        return {
            Lifetime.SETUP: ttls.setup,
            Lifetime.JOINABLE: ttls.joinable,
            Lifetime.FROZEN: ttls.frozen,
            Lifetime.PERMANENT: None,
        }[lifetime]

    def _hold_rank(self, version: int, rank: int) -> None:
        key = self.paths.keep_alive(version, rank)
        with self._lock:
            self._rank_keep_alive = KeepAlive(
                self._kv,
                key,
                self.config.ttls.keep_alive,
                "rank",
                self._observer,
                restore=lambda: self._restore_keep_alive(version, rank),
                runtime=self._runtime,
            ).start()

    def _restore_keep_alive(self, version: int, rank: int) -> bool:
        """Re-create this member's keep-alive key, found gone, while its version still counts
        it: it expired because etcd did not answer or was paused, not because this node left.
        Runs on the refresher's thread, so it reads without reporting what it saw."""
        key = self.paths.keep_alive(version, rank)
        try:
            entry = self._kv.get(self.paths.active_version)
            state: RendezvousState | None = RendezvousState.decode(entry.value, entry.key)
        except KeyNotFound:
            state = None
        except CorruptStateError:
            return False  # the next rendezvous reports it; nothing here to keep alive
        if not protocol.may_restore_keep_alive(state, version, rank, key):
            return False
        try:
            self._kv.create(key, self._identity, ttl=self.config.ttls.keep_alive)
        except AlreadyExists:
            pass  # an earlier attempt whose answer was lost created it
        return True

    def _release_rank(self) -> None:
        """Leave the version this node was part of.

        Deleting the keep-alive key, rather than letting it expire, lets the waiting nodes
        start the next version at once instead of a TTL later.
        """
        with self._lock:
            keep_alive, self._rank_keep_alive = self._rank_keep_alive, None
        if keep_alive is None:
            return
        keep_alive.stop()
        try:
            self._kv.compare_and_delete(keep_alive.key, self._kv.get(keep_alive.key))
        except (KeyNotFound, CompareFailed, OutcomeUnknown, EtcdUnavailableError):
            pass  # it expires within its TTL anyway


def _node_identity(local_addr: str | None, keep_alive_ttl: float) -> str:
    """The value of a keep-alive key: who holds the rank, and the TTL it renews (for its age)."""
    return NodeIdentity(socket.gethostname(), local_addr, os.getpid(), keep_alive_ttl).encode()


def _describe(state: RendezvousState) -> str:
    if state.version is None:
        return state.status.value
    return f"version {state.version} {state.status.value} with {state.world_size} participants"


def _outcome(phase: Phase, error: BaseException) -> Outcome:
    """How an exception ends `phase`: a sub-phase either starts over or fails; a whole
    rendezvous times out, finds the run closed, or fails."""
    if phase is not Phase.RENDEZVOUS:
        return Outcome.RETRY if isinstance(error, _StartOver) else Outcome.ERROR
    if isinstance(error, RendezvousTimeoutError):
        return Outcome.TIMEOUT
    if isinstance(error, RendezvousClosedError):
        return Outcome.CLOSED
    return Outcome.ERROR


def _reason(error: Exception) -> str:
    return "compare_failed" if isinstance(error, CompareFailed) else "outcome_unknown"
