"""The rendezvous: torch's etcd protocol, driven from pure decisions.

    next_rendezvous
      setup            create the next version, or observe the current one
      join             take a rank in a joinable version
      last call        the node that reached min_nodes holds the window open, then freezes it
      frozen wait      wait until the participant set is frozen
      confirm          publish a keep-alive key and count it in the version
      final wait       wait until every participant confirmed: the version is final
    wait next version  a final version exists: announce ourselves waiting, and wait until it
                       ends (its members re-rendezvous, or one of them dies)

`EtcdRendezvous` is the driver: it reads, asks `decisions` what to do with what it read, and
performs that (a write through the one compare-and-swap helper, `swap`; a watch; starting
over), reporting each phase to the observer. How a node joins and confirms is the key
layout's (`layouts`: torch's compare-and-swap of the shared state, or claims over etcd v3);
the driver asks the run's layout and never branches on it.

Each wait is an etcd watch on the state key, never a sleep. A phase that finds the state
moved on raises `_StartOver`; `next_rendezvous` starts again from setup until its deadline.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TypeVar

from etcd_rdzv import decisions, protocol, rank_policy
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
from etcd_rdzv.layouts import (
    Culprit,
    Departure,
    NodeIdentity,
    RunPaths,
    Snapshot,
    VersionEnd,
    departures,
    layout_for,
    rank_of,
    ranked_by_place,
)
from etcd_rdzv.leases import KeepAlive
from etcd_rdzv.protocol import Lifetime, RendezvousState, Status
from etcd_rdzv.rank_policy import RankMemory
from etcd_rdzv.retry import TRANSIENT_BACKOFF, Deadline
from etcd_rdzv.runtime import SYSTEM, Runtime
from etcd_rdzv.swap import Keep, Put, SwapExhausted, swap
from etcd_rdzv.telemetry import NOOP_OBSERVER, Observer, Outcome, Phase, PhaseScope

D = TypeVar("D")


@dataclass(frozen=True)
class Membership:
    version: int
    rank: int
    world_size: int
    # This node's rank in the final version before, as far as known: from the run's rank
    # memory under a rank policy other than join order, else from this process's last
    # membership (None after its agent restarted, or for a newcomer).
    previous_rank: int | None = None


class _StartOver(Exception):
    """The state moved on under a phase: start again from setup (not an error).

    `reason` is a short fixed code, fit for a metric label; `detail` says it for people.
    """

    def __init__(self, phase: Phase, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.phase = phase
        self.reason = reason
        self.detail = detail


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
        self.runtime = runtime
        self.config = config
        self.nodes = (config.min_nodes, config.max_nodes)
        self._on_rank_zero = on_rank_zero
        self.paths = RunPaths(config.run_path)
        self._kv = kv
        self.layout = layout_for(config.key_layout, self.paths)
        if self.layout.joins_by_claims and not kv.supports_claims:
            raise ConfigurationError(
                f"The {config.key_layout} key layout needs etcd v3's transactions, and "
                f"{kv.describe()} offers none: use etcd_api=v3, or etcd_api=v2 for torch's layout."
            )
        self._observer = observer
        self._run_keep_alive: KeepAlive | None = None
        self._rank_keep_alive: KeepAlive | None = None
        self._held: tuple[int, int] | None = None  # (version, rank) of _rank_keep_alive
        self._last_seen: tuple[int | None, str] | None = None
        self._last_membership: Membership | None = None
        # The version whose keep-alive key this node deleted when it left it, last.
        self._left_version: int | None = None
        # Under claims a joinable document lists nobody: the claims this node counted last.
        self._claims_counted: tuple[int, int] | None = None  # (version, claims)
        self._lock = threading.Lock()
        # Names this node's join claims; unique per process and per rendezvous object.
        self.claimant = claimant or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # Who this node is, in its keys (claims, keep-alives) and in the states it writes.
        host = socket.gethostname()
        self.identity = NodeIdentity(
            host,
            config.local_addr,
            os.getpid(),
            config.ttls.keep_alive,
            node_id=config.node_id or host,
            env_rank=config.env_rank,
        )

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
                runtime=self.runtime,
            ).start()
        self._kv.ensure_directory(self.paths.rdzv)

    def stop(self) -> None:
        """Stop every refresher; the run's keys then expire on their own."""
        self._release_rank("stopped")
        if self._run_keep_alive is not None:
            self._run_keep_alive.stop()
            self._run_keep_alive = None

    # --- the barrier -------------------------------------------------------------------------

    def next_rendezvous(self) -> Membership:
        """Block until this node is a confirmed participant of a final version."""
        deadline = self.deadline(self.config.timeout)
        with self.phase(Phase.RENDEZVOUS) as scope:
            attempt = 0
            last_problem = "no state seen yet"
            while not deadline.expired():
                self._release_rank("rendezvous_again")
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
                    TRANSIENT_BACKOFF.sleep(min(attempt, 8), deadline, self.runtime)
                    continue
                scope.annotate(
                    version=membership.version,
                    rank=membership.rank,
                    world_size=membership.world_size,
                    rank_policy=self.config.rank_policy.kind,
                    previous_rank=membership.previous_rank,
                )
                self._last_membership = membership
                return membership
            raise RendezvousTimeoutError(
                f"Rendezvous of run {self.config.run_id!r} did not complete within "
                f"{self.config.timeout:g}s (min {self.config.min_nodes}, max "
                f"{self.config.max_nodes} nodes); last: {last_problem}; state: "
                f"{self._describe_last_seen()}."
            )

    def _attempt(self, deadline: Deadline, attempt: int) -> Membership:
        with self.phase(Phase.SETUP, attempt=attempt + 1) as scope:
            snapshot = self._create_or_observe(deadline)
            state = snapshot[1]
            scope.annotate(version=state.version, state=state.status.value)
            route = decisions.route(state)
            if route is decisions.Route.AWAIT_TRANSITION:
                # Another node's transition is under way: setup lasts until it ends.
                self.await_state(
                    snapshot,
                    Phase.SETUP,
                    state.version,
                    done=None,
                    still=state.status,
                    deadline=deadline,
                )
        if route is decisions.Route.CLOSED:
            raise RendezvousClosedError(f"Rendezvous of run {self.config.run_id!r} is closed.")
        if route is decisions.Route.AWAIT_NEXT_VERSION:
            self._wait_next_version(snapshot, deadline)
            raise _StartOver(Phase.WAIT_NEXT_VERSION, "version_ended", "the final version ended")
        version = state.version
        assert version is not None
        self._enter_version(version, state)
        rank, snapshot = self.layout.take_part(self, version, snapshot, deadline)
        return self._await_final(version, rank, snapshot, deadline)

    def _await_final(
        self, version: int, rank: int, snapshot: Snapshot, deadline: Deadline
    ) -> Membership:
        """Final wait, in either layout; rank 0 publishes what the others need meanwhile."""
        with self.phase(Phase.FINAL_WAIT, version=version, rank=rank):
            if rank == 0 and self._on_rank_zero is not None:
                self._on_rank_zero(version)
            _, state = self.await_state(
                snapshot,
                Phase.FINAL_WAIT,
                version,
                done=Status.FINAL,
                still=Status.FROZEN,
                deadline=deadline,
            )
        return Membership(version, rank, state.world_size, self._previous_rank(state, rank))

    def _previous_rank(self, final: RendezvousState, rank: int) -> int | None:
        decided = protocol.decided_ranks(final)
        if isinstance(decided, rank_policy.Assignment):
            return decided.previous[rank] if rank < len(decided.previous) else None
        last = self._last_membership
        return None if last is None else last.rank

    # --- setup -------------------------------------------------------------------------------

    def _create_or_observe(self, deadline: Deadline) -> Snapshot:
        """Setup: open the next version if there is none, else report the current state.

        Read first: all but one node find a state, and a read is one request where a refused
        create is two over v3 (its placeholder's lease, then the transaction).
        """
        try:
            return self.read_state(Phase.SETUP)
        except _StartOver:
            pass  # no active version: open one
        placeholder_state = protocol.setup(now=self.runtime.time())
        try:
            placeholder = self._kv.create(
                self.paths.active_version, placeholder_state.encode(), ttl=self.config.ttls.setup
            )
        except AlreadyExists as taken:
            return self._state_after(taken, Phase.SETUP)
        self.see(placeholder_state, made=True)
        version = self._increment_version_counter(deadline)
        self._kv.ensure_directory(self.paths.version_dir(version))
        # The version's trace travels in its state: no node reads a key of its own for it.
        trace_context = self._observer.open_version(version)
        config = self.config
        opened = protocol.open_version(
            version,
            now=self.runtime.time(),
            trace_context=trace_context,
            nodes=self.nodes,
            timing=protocol.Timing(
                last_call_timeout=config.last_call_timeout,
                timeout=config.timeout,
                joinable_ttl=config.ttls.joinable,
                frozen_ttl=config.ttls.frozen,
                keep_alive_ttl=config.ttls.keep_alive,
            ),
            # Join order, the default (and torch's), is not written: its documents stay torch's.
            rank_policy=config.rank_policy.spec if config.rank_policy.decided_at_freeze else None,
        )

        def replace_placeholder(state: RendezvousState) -> decisions.Write | decisions.StartOver:
            if state is not placeholder_state:  # decided from another entry than ours
                # The placeholder expired or the run was closed meanwhile.
                return decisions.StartOver("setup_replaced", "setup placeholder replaced")
            return decisions.Write(opened, Lifetime.PERMANENT)

        _, snapshot = self.swap_state(
            (placeholder, placeholder_state), Phase.SETUP, replace_placeholder, deadline
        )
        return snapshot

    def _increment_version_counter(self, deadline: Deadline) -> int:
        key = self.paths.version_counter
        try:
            counter: Entry | None = self._kv.get(key)
        except KeyNotFound:
            # The run's first version, or its directory expired (a run idle for longer than
            # its TTL): rebuild the directories, and the first version is 1.
            self.prepare()
            counter = None

        def increment(entry: Entry | None) -> Put[int]:
            version = decisions.next_version(None if entry is None else _counter(entry))
            return Put(str(version), version)

        try:
            version, _ = swap(
                self._kv, key, increment, current=counter, deadline=deadline, runtime=self.runtime
            )
        except SwapExhausted:
            raise _StartOver(
                Phase.SETUP, "cas_exhausted", "version counter kept changing"
            ) from None
        return version

    # --- a final version: wait for it to end -------------------------------------------------

    def _wait_next_version(self, snapshot: Snapshot, deadline: Deadline) -> None:
        """A final version exists: count ourselves waiting, then wait for it to end.

        It ends when its members start a new rendezvous, or when one of them stops renewing
        its keep-alive key: then this node deletes the version so that a new one can open.
        A member that has just left it (to rendezvous again) deletes it at once.
        """
        _, final = snapshot
        version = final.version
        assert version is not None
        self._enter_version(version, final)
        with self.phase(Phase.WAIT_NEXT_VERSION, version=version) as scope:
            if self._left_version == version:
                # This node left the version (its key is deleted): the version cannot go on,
                # so it ends it at once. Not counting itself waiting first, nor listing the
                # version's keys before: when a whole job rendezvous again (a worker failed,
                # every agent restarts), every member would fight over that compare-and-swap
                # of the one state key (thousands of lost races at 64 nodes) and send the
                # listing N times. Only the node whose delete applied reads why.
                if self._delete_state(version, snapshot[0], Status.FINAL):
                    self._record_final_ending(version, snapshot, self._list_version(version)[0])
                return
            announced, (entry, state) = self.swap_state(
                snapshot,
                Phase.WAIT_NEXT_VERSION,
                lambda s: decisions.announce_waiting(s, version),
                deadline,
            )
            if isinstance(announced, decisions.Write):
                self._say_waiting(version)
            scope.annotate(participants=state.world_size, nodes_waiting=state.num_workers_waiting)
            while state.is_version(Status.FINAL, version):
                keys, live, seen_at = self._list_version(version)
                seen_at = seen_at or entry.read_revision
                missing = protocol.missing_keep_alives(state, live)
                if missing:
                    scope.event("keep_alive_missing", keys=",".join(missing))
                    if self._delete_state(version, entry, Status.FINAL):
                        self._record_final_ending(version, (entry, state), keys)
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
                        entry, state = self.read_state(Phase.WAIT_NEXT_VERSION)
                    except _StartOver:
                        return
                else:
                    # Another change under /rdzv (e.g. a store key): state and members unchanged.
                    entry = Entry(entry.key, entry.value, entry.revision, change.revision)

    # --- closing and queries -----------------------------------------------------------------

    def set_closed(self) -> None:
        """Mark the run closed: no node will join any further version."""

        def close(
            entry: Entry | None,
        ) -> Put[RendezvousState | None] | Keep[RendezvousState | None]:
            state = None if entry is None else self._decode(entry)
            decision = decisions.close(state, self.runtime.time())
            if isinstance(decision, decisions.Done):
                return Keep(None)
            return Put(self.layout.encode_state(self._signed(decision.state)), state)

        try:
            before, entry = swap(self._kv, self.paths.active_version, close, runtime=self.runtime)
        except SwapExhausted:
            raise EtcdUnavailableError(
                "could not close the rendezvous: state kept changing"
            ) from None
        if before is not None and entry is not None:
            self._observer.transition(
                before.version, before.status.value, "closed", before.world_size, True
            )

    def members_training_besides(self, membership: Membership | None) -> list[str]:
        """Keep-alive keys of the active final version's other members that still live.

        Raises the transport's errors: a caller that cannot read must not guess."""
        state = self.current_state()
        if state is None or state.status is not Status.FINAL or state.version is None:
            return []
        live = self._list_version(state.version)[1]
        own = None
        if membership is not None and membership.version == state.version:
            own = self.paths.keep_alive(membership.version, membership.rank)
        return protocol.members_left_training(state, own, live)

    def current_state(self) -> RendezvousState | None:
        try:
            return self._decode(self._kv.get(self.paths.active_version))
        except KeyNotFound:
            return None

    # --- what the key layouts take part with --------------------------------------------------
    # A layout decides how a node joins and confirms; these perform its steps.

    @contextmanager
    def phase(self, phase: Phase, **attributes: object) -> Iterator[PhaseScope]:
        """The observer's phase, told how it ends: the protocol knows its own exceptions, so
        no observer has to guess the outcome from one."""
        with self._observer.phase(phase, **attributes) as scope:
            try:
                yield scope
            except BaseException as error:
                scope.end(_outcome(phase, error))
                raise

    def deadline(self, seconds: float) -> Deadline:
        return Deadline(seconds, self.runtime.monotonic)

    def check(self, phase: Phase, decision: D | decisions.StartOver | decisions.Misfit) -> D:
        """`decision`, unless it ends the phase: then raise what it says."""
        if isinstance(decision, decisions.StartOver):
            raise _StartOver(phase, decision.reason, decision.detail)
        if isinstance(decision, decisions.Misfit):
            raise ConfigurationError(f"Run {self.config.run_id!r}: {decision.message}")
        return decision

    def start_over(self, phase: Phase, reason: str, detail: str) -> _StartOver:
        return _StartOver(phase, reason, detail)

    def await_state(
        self,
        snapshot: Snapshot,
        phase: Phase,
        version: int | None,
        *,
        done: Status | None,
        still: Status,
        deadline: Deadline,
        until: Deadline | None = None,
    ) -> Snapshot:
        """Watch the state until it is `version` in `done`; start over as soon as it is
        neither that nor `version` in `still`. With `until`, also return the state as last
        read (still `still`) once `until` passes."""
        entry, state = snapshot
        while True:
            decision = self.check(phase, decisions.await_state(state, version, done, still))
            if isinstance(decision, decisions.Done):
                return entry, state
            if deadline.expired():
                where = decisions.describe(self._with_participants(state))
                raise _StartOver(phase, "deadline", f"deadline passed in {phase.value} at {where}")
            wait = deadline.remaining()
            if until is not None:
                if until.expired():
                    return entry, state
                wait = min(wait, until.remaining())
            try:
                entry, state = self.next_state((entry, state), phase, wait)
            except _StartOver as moved:
                if moved.reason == "state_gone":
                    # For the run's readers only: off the path of the next attempt.
                    record = functools.partial(self._record_expiry, state)
                    self.runtime.start(record, "etcd-rdzv-record-expiry")
                raise

    def next_state(self, snapshot: Snapshot, phase: Phase, timeout: float) -> Snapshot:
        """The state after the next change, or the current one when `timeout` passes first."""
        entry, _ = snapshot
        change = self._kv.watch(self.paths.active_version, entry.read_revision, timeout)
        if change is None:
            return self.read_state(phase) if timeout > 0 else snapshot
        new_entry = change.entry()
        if new_entry is None:
            raise _StartOver(phase, "state_gone", "state expired or was deleted")
        return new_entry, self._decode(new_entry)

    def swap_state(
        self,
        snapshot: Snapshot,
        phase: Phase,
        decide: Callable[[RendezvousState], D],
        deadline: Deadline,
        *,
        scope: PhaseScope | None = None,
        retry_unknown: bool = False,
    ) -> tuple[D, Snapshot]:
        """Write the state as `decide` says (a `decisions.Write`, `Refresh` or
        `protocol.Joined`), deciding again from each state that won a race; return the
        decision, and the state after it. Any other decision writes nothing; one that ends
        the phase raises (`check`)."""
        first_entry, first_state = snapshot
        decided: list[RendezvousState] = []

        def put_or_keep(entry: Entry | None) -> Put[D] | Keep[D]:
            if entry is None:
                raise _StartOver(phase, "state_gone", "no active version")
            state = first_state if entry is first_entry else self._decode(entry)
            decided[:] = [state]
            decision = self.check(phase, decide(state))
            if isinstance(decision, decisions.Write | protocol.Joined):
                ttl = self._ttl(decision.lifetime)
                return Put(self.layout.encode_state(self._signed(decision.state)), decision, ttl)
            if isinstance(decision, decisions.Refresh):
                return Put(entry.value, decision, self._ttl(decision.lifetime))
            return Keep(decision)

        def lost(attempt: int, reason: str) -> None:
            if scope is not None:
                scope.event(reason, attempt=attempt)
            self._observer.retry(phase, reason, attempt)

        try:
            decision, entry = swap(
                self._kv,
                self.paths.active_version,
                put_or_keep,
                current=first_entry,
                deadline=deadline,
                on_lost=lost,
                retry_unknown=retry_unknown,
                runtime=self.runtime,
            )
        except SwapExhausted:
            raise _StartOver(phase, "cas_exhausted", "too many lost compare-and-swaps") from None
        assert entry is not None  # a decision on an absent state starts over
        state = decided[0]
        if isinstance(decision, decisions.Write | protocol.Joined):
            state = decision.state
            self.see(state, made=True)
        return decision, (entry, state)

    def claim(self, phase: Phase, key: str, guard: Entry, queue: str, moved: str) -> int:
        """Claim `key` among `queue`'s while `guard` is unchanged (claims layout); its place.
        A guard that changed starts the phase over (`moved` says how)."""
        ttl = self.config.ttls.keep_alive if phase is Phase.CONFIRM else None
        try:
            value = self._stamped().encode()
            return self._kv.claim(key, value, guard=guard, queue=queue, ttl=ttl).position
        except CompareFailed as refusal:
            # Frozen (or gone) under us; the refusal carries the state that replaced it.
            self._observer.retry(phase, "compare_failed", 1)
            if refusal.current is not None:
                self._decode(refusal.current)
            raise _StartOver(phase, "state_moved_on", moved) from None
        except AlreadyExists:
            # An earlier claim of ours applied though its answer was lost: find its place.
            return self._position_of(key, queue)

    def count_join_claims(self, version: int) -> int:
        claims = len(self._kv.list(self.paths.join_claims(version)).entries)
        self.count_claims(version, claims)
        return claims

    def count_claims(self, version: int, claims: int) -> None:
        counted = self._claims_counted
        if counted is None or counted[0] != version or counted[1] < claims:
            # Claims are never deleted while their version lasts: a count only grows.
            self._claims_counted = (version, claims)

    def join_claims(self, version: int) -> tuple[NodeIdentity | None, ...]:
        """`version`'s join claims in claim order, counted (one listing)."""
        claims = self.layout.join_claims(self._kv, version)
        self.count_claims(version, len(claims))
        return claims

    def decide_ranks(
        self, version: int, world_size: int, claims: Sequence[NodeIdentity | None] | None
    ) -> rank_policy.Assignment | rank_policy.Conflict | None:
        """The ranks this node freezes `version` with: None under join order (a rank is a
        claim's place), else decided by the run's rank policy from the `claims` (listed
        here when not given) and the run's rank memory (a read)."""
        policy = self.config.rank_policy
        if not policy.decided_at_freeze:
            return None
        listed = self.join_claims(version) if claims is None else claims
        return self.layout.decide_ranks(self._kv, policy, listed[:world_size])

    def remember_ranks(self, version: int, final: RendezvousState) -> None:
        """Record final `version`'s ranks by node id in the run's rank memory, for the next
        freeze (`rank_policy.RankMemory`). Best effort: a memory that missed a version only
        makes the next ranks less stable, never wrong, so nothing waits on this."""
        try:
            ids = self.layout.ids_by_rank(self._kv, final)

            def remember(entry: Entry | None) -> Put[None] | Keep[None]:
                memory = RankMemory.decode(None if entry is None else entry.value)
                after = memory.after(version, ids)
                return Keep(None) if after is memory else Put(after.encode(), None)

            swap(self._kv, self.paths.rank_memory, remember, runtime=self.runtime)
        except (KvError, EtcdUnavailableError, OutcomeUnknown, SwapExhausted):
            return

    def hold_last_call(self, version: int) -> None:
        """This node holds `version`'s last call from now: say until when (wall clock)."""
        self._observer.last_call_deadline(
            version, self.runtime.time() + self.config.last_call_timeout
        )

    def publish_keep_alive(self, key: str) -> None:
        self._kv.put(key, self._stamped().encode(), ttl=self.config.ttls.keep_alive)

    def read_state(self, phase: Phase) -> Snapshot:
        try:
            entry = self._kv.get(self.paths.active_version)
        except KeyNotFound:
            raise _StartOver(phase, "state_gone", "no active version") from None
        return entry, self._decode(entry)

    def tear_down(
        self,
        version: int,
        entry: Entry,
        status: Status,
        reason: str,
        culprits: list[int],
        *,
        stayed: list[int] | None = None,
    ) -> None:
        """Delete the state as last seen, so that a new version can open, and say who made
        the version fail (`culprits`, by rank); if it moved on meanwhile, the next attempt
        sees how."""
        if self._delete_state(version, entry, status):
            self._record_ending(version, entry, reason, culprits, stayed or [])

    def _delete_state(self, version: int, entry: Entry, status: Status) -> bool:
        """Delete the state as last seen: whether this node's delete applied."""
        try:
            self._kv.compare_and_delete(self.paths.active_version, entry)
        except (CompareFailed, KeyNotFound, OutcomeUnknown):
            return False
        self._observer.transition(version, status.value, "deleted", 0, True)
        return True

    def _list_version(self, version: int) -> tuple[tuple[Entry, ...], frozenset[str], int | None]:
        """A version's keys: entries, the keys alone, and the revision read at."""
        try:
            listing = self._kv.list(self.paths.version_dir(version))
        except KeyNotFound as gone:
            return (), frozenset(), gone.revision
        return tuple(listing.entries), frozenset(listing.keys), listing.revision

    def _record_final_ending(
        self, version: int, snapshot: Snapshot, keys: tuple[Entry, ...]
    ) -> None:
        """Why final `version` (deleted by this node) ended, from its keys: members that said
        they left (to rendezvous again) made nothing fail; the others' keys expired, so their
        nodes are gone."""
        entry, state = snapshot
        live = {e.key for e in keys}
        ranks = [
            r for r in map(rank_of, protocol.missing_keep_alives(state, live)) if r is not None
        ]
        left = departures(keys)
        lost = [rank for rank in ranks if rank not in left]
        reason = "keep_alive_missing" if lost else "members_left"
        stayed = [rank for rank in state.participants if rank not in ranks]
        self._record_ending(version, entry, reason, lost or ranks, stayed)

    def _record_ending(
        self, version: int, entry: Entry, reason: str, culprits: list[int], stayed: list[int]
    ) -> None:
        """Tell the observer and the run's history (`VersionEnd`) why a version this node
        deleted ended, and who made it fail."""
        try:
            last: RendezvousState | None = RendezvousState.decode(entry.value, entry.key)
        except CorruptStateError:
            last = None
        joined = self._joined(last)
        blamed = _named(joined, culprits)
        self._say_who_failed(version, reason, blamed)
        by_place = last is not None and ranked_by_place(last)
        stayers = _named(joined, stayed)
        ending = VersionEnd(reason, blamed, self._stamped(), stayers, by_place=by_place)
        try:
            # For the readers of the run's history (`etcd-rdzv status`); nobody waits on it.
            self._kv.put(self.paths.ending(version), ending.encode())
        except (KvError, EtcdUnavailableError, OutcomeUnknown):
            pass

    def _record_expiry(self, state: RendezvousState) -> None:
        """The state expired under this node: record why, once per version (the first node to
        see it), so that the run's history says who the others waited for.

        Only a frozen state, and a joinable one in torch's layout, expire: their nodes are
        gone (a rank that never confirmed; the last-call holder). Anything else that deletes
        the state records its own reason (`tear_down`)."""
        version = state.version
        if version is None:
            return
        try:
            if state.status is Status.FROZEN:
                reason = "frozen_expired"
                live = self._kv.list(self.paths.version_dir(version)).keys
                confirmed = self.layout.confirmed_ranks(state, live) or frozenset()
                culprits = [rank for rank in state.participants if rank not in confirmed]
            elif state.status is Status.JOINABLE and not self.layout.joins_by_claims:
                reason, culprits = "last_call_expired", [self.config.min_nodes - 1]
            else:
                return
            blamed = _named(self._joined(state), culprits)
            ending = VersionEnd(reason, blamed, self._stamped())
            self._kv.create(self.paths.ending(version), ending.encode())
        except (AlreadyExists, KeyNotFound, KvError, EtcdUnavailableError, OutcomeUnknown):
            return  # recorded by another node, or not at all: nobody waits on it
        self._say_who_failed(version, reason, blamed)

    def _say_who_failed(self, version: int, reason: str, culprits: tuple[Culprit, ...]) -> None:
        names = [c.node.describe() if c.node is not None else "unknown" for c in culprits]
        self._observer.version_torn_down(version, reason, [c.rank for c in culprits], names)

    def _joined(self, state: RendezvousState | None) -> tuple[NodeIdentity | None, ...]:
        """Who took each rank of `state`'s version, as far as the run's keys still tell
        (claims do; torch's layout keeps no identity but in the keep-alive keys, gone by now)."""
        try:
            return () if state is None else self.layout.joined(self._kv, state)
        except (KvError, EtcdUnavailableError):
            return ()

    def see(self, state: RendezvousState, made: bool = False) -> None:
        participants = self._participants(state)
        self._observer.state_seen(state.version, state.status.value, participants)
        now = (state.version, state.status.value)
        before = self._last_seen
        if before != now:
            self._last_seen = now
            self._observer.transition(
                state.version, before[1] if before else None, now[1], participants, made
            )

    def hold_rank(self, version: int, rank: int) -> None:
        key = self.paths.keep_alive(version, rank)
        with self._lock:
            self._held = (version, rank)
            self._rank_keep_alive = KeepAlive(
                self._kv,
                key,
                self.config.ttls.keep_alive,
                "rank",
                self._observer,
                restore=lambda: self._restore_keep_alive(version, rank),
                runtime=self.runtime,
            ).start()

    # --- reading the state -------------------------------------------------------------------

    def _position_of(self, key: str, queue: str) -> int:
        """The place of a claim among its queue's, from a listing: claims are never rewritten,
        so their revisions are their creation order."""
        directory, _, _ = queue.rpartition("/")
        entries = self._kv.list(directory).entries
        claims = [entry for entry in entries if entry.key.startswith(queue)]
        mine = next(entry.revision for entry in claims if entry.key == key)
        return sum(1 for entry in claims if entry.revision <= mine)

    def _with_participants(self, state: RendezvousState) -> RendezvousState:
        """`state` listing who joined, for messages: under claims, one more read."""
        try:
            listed = self.layout.with_participants(self._kv, state)
        except (KvError, EtcdUnavailableError):
            return state
        if listed is not state and state.version is not None:
            self.count_claims(state.version, listed.world_size)
        return listed

    def _participants(self, state: RendezvousState) -> int:
        """Participants of `state` as far as this node knows: the document's, or under claims,
        where a joinable document lists nobody, the claims it counted last (those that came
        since are unknown to it until it counts again)."""
        counted = self._claims_counted
        claims = counted[1] if counted is not None and counted[0] == state.version else None
        return self.layout.participants(state, claims)

    def _state_after(self, refusal: AlreadyExists | CompareFailed, phase: Phase) -> Snapshot:
        """The state a refused write found: from the refusal when it tells (v3), else read."""
        if refusal.current is None:
            return self.read_state(phase)
        return refusal.current, self._decode(refusal.current)

    def _decode(self, entry: Entry) -> RendezvousState:
        state = RendezvousState.decode(entry.value, entry.key)
        self.see(state)
        return state

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

    def _ttl(self, lifetime: Lifetime) -> float | None:
        ttls = self.config.ttls
        return {
            Lifetime.SETUP: ttls.setup,
            Lifetime.JOINABLE: ttls.joinable,
            Lifetime.FROZEN: ttls.frozen,
            Lifetime.PERMANENT: None,
        }[lifetime]

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
            self._kv.create(key, self._stamped().encode(), ttl=self.config.ttls.keep_alive)
        except AlreadyExists:
            pass  # an earlier attempt whose answer was lost created it
        return True

    def _release_rank(self, reason: str) -> None:
        """Leave the version this node was part of, saying so first (`reason`).

        Deleting the keep-alive key, rather than letting it expire, lets the waiting nodes
        start the next version at once instead of a TTL later; the departure written before
        tells them, and `status`, that this node left rather than died.
        """
        with self._lock:
            keep_alive, self._rank_keep_alive, held = self._rank_keep_alive, None, self._held
        if keep_alive is None or held is None:
            return
        keep_alive.stop()
        version, rank = held
        try:
            departure = Departure(rank, self._stamped(), reason)
            self._kv.put(self.paths.departure(version, rank), departure.encode())
            self._kv.compare_and_delete(keep_alive.key, self._kv.get(keep_alive.key))
        except (KeyNotFound, CompareFailed, OutcomeUnknown, EtcdUnavailableError, KvError):
            return  # it expires within its TTL anyway
        self._left_version = version

    def _say_waiting(self, version: int) -> None:
        """Name this node among those waiting for `version` to end, for readers (`status`):
        the state only counts them. Nobody waits on it, so a failure is ignored."""
        try:
            self._kv.put(self.paths.waiting(version, self.claimant), self._stamped().encode())
        except (KvError, EtcdUnavailableError, OutcomeUnknown):
            pass

    def _signed(self, state: RendezvousState) -> RendezvousState:
        """`state` naming this node as the one that moved it into its status."""
        return protocol.signed(state, {"host": self.identity.host, "pid": self.identity.pid})

    def _stamped(self) -> NodeIdentity:
        """This node's identity, with the time it writes it."""
        return replace(self.identity, at=round(self.runtime.time(), 3))


def _named(joined: tuple[NodeIdentity | None, ...], ranks: list[int]) -> tuple[Culprit, ...]:
    """`ranks`, each with the node that held it where `joined` tells."""
    return tuple(Culprit(r, joined[r] if 0 <= r < len(joined) else None) for r in ranks)


def _counter(entry: Entry) -> int:
    """The version counter's value; a counter no protocol wrote is a corrupt state."""
    try:
        value = int(entry.value)
    except ValueError:
        raise CorruptStateError(entry.key, "not an integer", entry.value) from None
    if value < 0:
        raise CorruptStateError(entry.key, "negative", entry.value)
    return value


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
