"""What a node does next, decided from what it read: pure functions, no I/O, no clock.

`protocol` says what the state documents are and how one becomes the next (join, freeze,
confirm, complete). This module says *when*: given the state a node just read (and its
config, its rank, the time it was told), each function returns the next step of one phase:

- a new state to write (`Write`: its document and how long it lives),
- `Done` (the phase is over; for a write loop, no write is needed),
- `Wait` (watch the state until it changes, or until a time),
- `StartOver` (the state moved on under the phase: a fixed `reason`, fit for a metric label,
  and a `detail` for people),
- `Misfit` (this node's configuration cannot take part: a `ConfigurationError` to raise).

The driver (`rendezvous.EtcdRendezvous`, and the key layouts it delegates joining to) reads,
asks one of these, and performs the step; the simulator and tests/unit/test_decisions.py
check them without etcd.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from etcd_rdzv import protocol, rank_policy
from etcd_rdzv.protocol import Lifetime, RendezvousState, Status


@dataclass(frozen=True)
class Write:
    state: RendezvousState
    lifetime: Lifetime


@dataclass(frozen=True)
class Refresh:
    """Write the document back as read (byte for byte: torch's nodes may have written it), to
    renew its TTL for `lifetime`."""

    lifetime: Lifetime


@dataclass(frozen=True)
class Done:
    pass


@dataclass(frozen=True)
class Wait:
    until: float | None = None  # monotonic seconds; None: until the state changes


@dataclass(frozen=True)
class StartOver:
    reason: str
    detail: str


@dataclass(frozen=True)
class Misfit:
    message: str  # what does not fit, and what to do about it


_SAME_NODES = ": every node of a run must use the same --nnodes MIN:MAX."


DONE = Done()
WAIT = Wait()


def describe(state: RendezvousState) -> str:
    if state.version is None:
        return state.status.value
    return f"version {state.version} {state.status.value} with {state.world_size} participants"


# --- setup -------------------------------------------------------------------------------------


class Route(Enum):
    """Where a node goes with the state it found (or opened) at setup."""

    AWAIT_TRANSITION = "await_transition"  # setup or frozen: another node's transition
    CLOSED = "closed"
    AWAIT_NEXT_VERSION = "await_next_version"  # final: wait until it ends
    TAKE_PART = "take_part"  # joinable


def route(state: RendezvousState) -> Route:
    if state.status in (Status.SETUP, Status.FROZEN):
        return Route.AWAIT_TRANSITION
    if state.status is Status.CLOSED:
        return Route.CLOSED
    if state.status is Status.FINAL:
        return Route.AWAIT_NEXT_VERSION
    return Route.TAKE_PART


def next_version(counter: int | None) -> int:
    """The number of the version a node opens, from the counter it read (None: absent)."""
    return 1 if counter is None else counter + 1


# --- waiting for the state -----------------------------------------------------------------


def await_state(
    state: RendezvousState, version: int | None, done: Status | None, still: Status
) -> Done | Wait | StartOver:
    """Wait while `state` is `version` in status `still`; done once it is in `done`."""
    if done is not None and state.is_version(done, version):
        return DONE
    if state.is_version(still, version):
        return WAIT
    return StartOver("state_moved_on", f"state became {describe(state)}")


# --- joining and confirming by compare-and-swap (torch's layout) ------------------------------


def join_by_swap(
    state: RendezvousState, version: int, nodes: tuple[int, int], now: float
) -> protocol.Joined | StartOver | Misfit:
    """Take the next rank of `version` if it is still joinable."""
    min_nodes, max_nodes = nodes
    if not state.is_version(Status.JOINABLE, version):
        return StartOver("state_moved_on", f"version {version} stopped being joinable")
    if state.world_size >= max_nodes:
        return Misfit(
            f"version {version} is joinable with {state.world_size} participants, as many as "
            f"this node's max_nodes {max_nodes} or more{_SAME_NODES}"
        )
    return protocol.join(state, min_nodes, max_nodes, now=now)


@dataclass(frozen=True)
class LastCallClock:
    """The times the holder of a last call works by (monotonic seconds)."""

    now: float
    window_ends: float  # freeze then
    refresh_due: float  # refresh the state's TTL then (torch's layout)


LastCallStep = Done | Write | Refresh | Wait | StartOver


def hold_last_call_by_swap(
    state: RendezvousState, version: int, clock: LastCallClock, wall: float, deadline_passed: bool
) -> LastCallStep:
    """Keep `version` joinable until the window ends, its TTL fresh (if this node dies, the
    state expires and everybody starts over instead of waiting for a freeze that never
    comes); then freeze it."""
    if state.is_version(Status.FROZEN, version):
        return DONE  # the join that filled it froze it
    if not state.is_version(Status.JOINABLE, version):
        return StartOver("state_moved_on", f"version {version} changed during last call")
    if deadline_passed:
        return StartOver("deadline", "deadline passed during last call")
    if clock.now >= clock.window_ends:
        return Write(protocol.freeze(state, now=wall), Lifetime.FROZEN)
    if clock.now >= clock.refresh_due:
        return Refresh(Lifetime.JOINABLE)
    return Wait(min(clock.window_ends, clock.refresh_due))


def confirm_by_swap(
    state: RendezvousState, version: int, keep_alive_key: str, wall: float
) -> Done | Write | StartOver:
    """Add this node's keep-alive key to the frozen `version`; the last one makes it final."""
    if state.version == version and keep_alive_key in (state.keep_alives or ()):
        return DONE  # an earlier write of ours applied though its answer was lost
    if not state.is_version(Status.FROZEN, version):
        return StartOver("state_moved_on", f"version {version} stopped being frozen")
    confirmed = protocol.confirm(state, keep_alive_key, now=wall)
    return Write(confirmed.state, confirmed.lifetime)


# --- joining and confirming by claims (etcd v3) -----------------------------------------------


def may_claim(
    state: RendezvousState,
    version: int,
    nodes: tuple[int, int],
    policy: rank_policy.RankPolicy = rank_policy.JOIN_ORDER,
    env_rank: int | None = None,
) -> Done | StartOver | Misfit:
    """Whether this node may claim a place in `version`: joinable, and opened for its size
    and its rank policy. A rank from the environment that no version
    can have fails this node alone, before its claim could fail everyone's version."""
    if not state.is_version(Status.JOINABLE, version):
        return StartOver("state_moved_on", f"version {version} is not joinable")
    declared = protocol.declared_nodes(state)
    if declared is not None and declared != nodes:
        return Misfit(
            f"version {version} was opened with --nnodes {declared[0]}:{declared[1]} and this "
            f"node has min_nodes {nodes[0]}, max_nodes {nodes[1]}{_SAME_NODES}"
        )
    run_policy = protocol.declared_rank_policy(state)
    if run_policy != policy.spec:
        return Misfit(
            f"version {version} was opened with rank_policy={rank_policy.shown(run_policy)} and "
            f"this node has {policy.describe()}: every node of a run must use the same "
            "rank_policy (and rank0_node)."
        )
    if env_rank is not None and env_rank >= nodes[1]:
        return Misfit(
            f"this node's rank from {policy.env_var}, {env_rank}, is not below max_nodes "
            f"{nodes[1]}: each node needs its own rank, from 0 to the number of nodes minus one."
        )
    return DONE


def freeze_claims(
    state: RendezvousState,
    version: int,
    world_size: int,
    wall: float,
    ranks: rank_policy.Assignment | rank_policy.Conflict | None = None,
) -> Done | Write | StartOver:
    """Freeze `version` with its first `world_size` claims as participants, ranked by
    `ranks` when a policy other than join order decided them."""
    if state.is_version(Status.FROZEN, version):
        return DONE
    if not state.is_version(Status.JOINABLE, version):
        return StartOver("state_moved_on", f"version {version} changed")
    frozen = protocol.freeze(state, now=wall, world_size=world_size, ranks=ranks)
    return Write(frozen, Lifetime.FROZEN)


def last_call_counted(claims: int, max_nodes: int) -> int:
    """The world size the last-call holder freezes with: every claim so far, up to max."""
    return min(claims, max_nodes)


def abandoned_after(
    rank: int, min_nodes: int, last_call: float, joinable_ttl: float
) -> float | None:
    """Seconds after its claim that a node waiting for a freeze tears the version down.

    Under claims the joinable state has no TTL tying it to the last-call holder's life, so
    every node that joined after the holder backs it up: a joinable TTL after the last call
    should have ended, the holder is gone, which is what the TTL's expiry says in torch's
    layout. Nodes that joined before the holder just wait (None).
    """
    return last_call + joinable_ttl if rank >= min_nodes else None


def in_frozen_version(place: int, state: RendezvousState) -> Done | StartOver:
    """Whether a claim (at `place`, from 0) made it into the frozen version (a claim landing
    after the holder counted the claims did not: its node waits for the next version)."""
    if place < state.world_size:
        return DONE
    return StartOver("version_full", f"version {state.version} froze first")


def rank_in_frozen(place: int, state: RendezvousState) -> int | Misfit:
    """The rank of the claim at `place` in frozen `state`: its place under join order, else
    what the freezing node decided (a `Conflict` it recorded fails every node alike)."""
    decided = protocol.decided_ranks(state)
    if decided is None:
        return place
    if isinstance(decided, rank_policy.Conflict):
        return Misfit(f"version {state.version}: {decided.message}")
    rank = decided.rank_of_place(place)
    if rank is None:
        return Misfit(
            f"version {state.version} ranks {len(decided.ranks)} claims, not the one at place "
            f"{place}: its document is inconsistent"
        )
    return rank


def complete_claims(
    state: RendezvousState,
    version: int,
    confirmations: int,
    keep_alive_keys: list[str],
    wall: float,
) -> Done | Write | StartOver:
    """After a node's confirmation claim (the `confirmations`-th): the claim that completes
    the set writes final."""
    if not state.is_version(Status.FROZEN, version):
        return StartOver("state_moved_on", f"version {version} stopped being frozen")
    if confirmations < state.world_size:
        return DONE
    return Write(protocol.complete(state, keep_alive_keys, now=wall), Lifetime.PERMANENT)


# --- a final version: waiting for it to end ---------------------------------------------------


def announce_waiting(state: RendezvousState, version: int) -> Done | Write:
    """Count this node among those waiting for final `version` to end (if it still lasts)."""
    if not state.is_version(Status.FINAL, version):
        return DONE
    return Write(protocol.announce_waiting(state), Lifetime.PERMANENT)


def close(state: RendezvousState | None, wall: float) -> Done | Write:
    if state is not None and state.status is Status.CLOSED:
        return DONE
    return Write(protocol.close(state, now=wall), Lifetime.PERMANENT)
