"""The rendezvous state document and the pure rules of its transitions. No I/O.

The document is the JSON value of `<run>/rdzv/active_version`, exactly as torch's `etcd`
backend writes it, so that both backends can take part in one rendezvous:

    {"status": "setup"}
    {"status": "joinable", "version": "7", "participants": [0, 1]}
    {"status": "frozen", "version": "7", "participants": [0, 1, 2], "keep_alives": [KEY, ...]}
    {"status": "final", ..., "keep_alives": [...], "num_workers_waiting": 0}
    {"status": "closed", ...}

`version` is a decimal string and `participants` are the ranks handed out in join order.
Under claims (etcd v3, never read by torch) a frozen or final document counts its
participants instead of listing them and their keep-alive keys (`COUNTED_FIELD`): a list sent
to every watching node would cost O(N^2) bytes per version.
Each rule takes a state and returns the next one (with what the caller must do with the
key's TTL); the caller performs it with one compare-and-swap.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from etcd_rdzv import rank_policy
from etcd_rdzv.errors import CorruptStateError


class Status(str, enum.Enum):
    SETUP = "setup"
    JOINABLE = "joinable"
    FROZEN = "frozen"
    FINAL = "final"
    CLOSED = "closed"


class Lifetime(enum.Enum):
    """What a write does to the TTL of the state key."""

    SETUP = "setup"
    JOINABLE = "joinable"  # ephemeral once min_nodes joined: dies with the last-call holder
    FROZEN = "frozen"  # ephemeral until everyone confirmed
    PERMANENT = "permanent"


# Ours, claims layout only: {"participants": N, "keep_alive_prefix": P} stands for the ranks
# 0..N-1 and, when the prefix is given, their keep-alive keys P0..P(N-1).
COUNTED_FIELD = "etcd_rdzv_counted"
# A count past any real job is a corrupt document, not a million-rank tuple to build.
_MOST_COUNTED = 1 << 20
_KNOWN_FIELDS = frozenset(
    {"status", "version", "participants", "keep_alives", "num_workers_waiting", COUNTED_FIELD}
)


@dataclass(frozen=True)
class RendezvousState:
    status: Status
    version: int | None = None
    participants: tuple[int, ...] = ()
    keep_alives: tuple[str, ...] | None = None
    num_workers_waiting: int | None = None
    # Fields another writer added: carried through every rewrite, never dropped.
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return len(self.participants)

    def is_version(self, status: Status, version: int | None) -> bool:
        return self.status is status and self.version == version

    def encode(self, *, counted: bool = False) -> str:
        """torch's document; `counted` (claims layout only) counts the participants instead
        of listing them and their keep-alive keys, when they are the ranks 0..n-1 and keys
        that differ only by rank."""
        document: dict[str, Any] = {"status": self.status.value}
        if self.version is not None:
            document["version"] = str(self.version)
        listed = self.keep_alives
        summary = _counted(self) if counted else None
        if summary is not None:
            document[COUNTED_FIELD] = summary
            if "keep_alive_prefix" in summary:
                listed = None
        elif self.status is not Status.SETUP:
            document["participants"] = list(self.participants)
        if listed is not None:
            document["keep_alives"] = list(listed)
        if self.num_workers_waiting is not None:
            document["num_workers_waiting"] = self.num_workers_waiting
        document.update({k: v for k, v in self.extra.items() if k not in document})
        return json.dumps(document, separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str | None, key: str) -> RendezvousState:
        """Parse the document at `key`; anything malformed raises `CorruptStateError`."""
        try:
            document = json.loads(raw or "")
        except (ValueError, RecursionError):
            # RecursionError: nested deeper than any state document; json gives up on it.
            raise CorruptStateError(key, "not JSON", raw) from None
        if not isinstance(document, dict):
            raise CorruptStateError(key, "not a JSON object", raw)
        try:
            status = Status(document.get("status"))
        except ValueError:
            raise CorruptStateError(
                key, f"unknown status {document.get('status')!r}", raw
            ) from None
        participants = tuple(_int_list(document.get("participants", []), key, raw))
        keep_alives = _optional_str_list(document, "keep_alives", key, raw)
        if COUNTED_FIELD in document:
            participants, keep_alives = _uncounted(document[COUNTED_FIELD], keep_alives, key, raw)
        state = cls(
            status=status,
            version=_optional_int(document, "version", key, raw),
            participants=participants,
            keep_alives=keep_alives,
            num_workers_waiting=_optional_int(document, "num_workers_waiting", key, raw),
            extra={k: v for k, v in document.items() if k not in _KNOWN_FIELDS},
        )
        if status not in (Status.SETUP, Status.CLOSED) and state.version is None:
            raise CorruptStateError(key, f"status {status.value!r} without a version", raw)
        if sorted(state.participants) != list(range(state.world_size)):
            raise CorruptStateError(key, "participants are not the ranks 0..n-1", raw)
        return state


# --- when the state entered its status ------------------------------------------------------

# Ours, not torch's: {"status": S, "at": UNIX_SECONDS} written when one of our nodes changes the
# status. torch's backend carries unknown fields through its rewrites, so a stamp can outlive
# the status it was written for; it counts only while its status is the document's.
SINCE_FIELD = "etcd_rdzv_since"


def _entered(state: RendezvousState, now: float | None) -> RendezvousState:
    if now is None:
        return state
    stamp = {"status": state.status.value, "at": round(now, 3)}
    return replace(state, extra={**state.extra, SINCE_FIELD: stamp})


def entered_at(state: RendezvousState) -> float | None:
    """Unix time at which the state entered its status, when a node of ours recorded it."""
    stamp = _current_stamp(state)
    return None if stamp is None else _seconds(stamp.get("at"))


def entered_by(state: RendezvousState) -> Mapping[str, Any] | None:
    """The identity (`layouts.NodeIdentity` fields) of the node of ours that moved the state
    into its status, when it signed its stamp (`signed`)."""
    stamp = _current_stamp(state)
    by = None if stamp is None else stamp.get("by")
    return by if isinstance(by, dict) else None


def signed(state: RendezvousState, by: Mapping[str, Any]) -> RendezvousState:
    """`state` with its writer named in the stamp of the status it just entered: who opened,
    froze, finalized or closed a version. The driver signs what it writes; a rewrite within
    a status (a join in torch's layout) keeps the signature of the node that entered it."""
    stamp = state.extra.get(SINCE_FIELD)
    if not isinstance(stamp, dict) or stamp.get("status") != state.status.value:
        return state
    if "by" in stamp:
        return state
    return replace(state, extra={**state.extra, SINCE_FIELD: {**stamp, "by": dict(by)}})


def _current_stamp(state: RendezvousState) -> Mapping[str, Any] | None:
    stamp = state.extra.get(SINCE_FIELD)
    if not isinstance(stamp, dict) or stamp.get("status") != state.status.value:
        return None
    return stamp


def _seconds(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


# --- the rules (each takes `now`, to record when a status begins) -----------------------------


def setup(*, now: float | None = None) -> RendezvousState:
    """The placeholder a node writes while it prepares a new version."""
    return _entered(RendezvousState(Status.SETUP), now)


# Ours, not torch's: the W3C traceparent of the version's trace (when its opener traces), which
# every node's phase spans join. torch carries it through its rewrites like any unknown field.
TRACE_FIELD = "etcd_rdzv_trace"


# Ours, not torch's: the opener's [min_nodes, max_nodes]. Under claims nothing else shows a
# node that its --nnodes differs from the run's (see `claimed_rank`).
NODES_FIELD = "etcd_rdzv_nodes"


# Ours, not torch's: the opener's time limits, so that a reader (`etcd-rdzv status`) can say
# when the last call ends, when a node times out and when a key expires, without flags.
TIMING_FIELD = "etcd_rdzv_timing"


@dataclass(frozen=True)
class Timing:
    """The time limits, in seconds, a version's nodes run with (their opener's)."""

    last_call_timeout: float
    timeout: float
    joinable_ttl: float
    frozen_ttl: float
    keep_alive_ttl: float

    def encode(self) -> dict[str, float]:
        return {name: value for name, value in vars(self).items()}


# Ours, claims layout only: the rank policy the version was opened with (`rank_policy`), when
# it is not torch's join order. Every node of a version must have the same.
RANK_POLICY_FIELD = "etcd_rdzv_rank_policy"

# Ours, claims layout only: the ranks the freezing node decided under that policy
# (`rank_policy.Assignment`, or the `Conflict` every node of the version raises).
RANKS_FIELD = "etcd_rdzv_ranks"


def open_version(
    version: int,
    *,
    now: float | None = None,
    trace_context: str | None = None,
    nodes: tuple[int, int] | None = None,
    timing: Timing | None = None,
    rank_policy: str | None = None,
) -> RendezvousState:
    """A joinable document; `rank_policy` is the spec of a policy other than join order."""
    extra: dict[str, Any] = {}
    if trace_context is not None:
        extra[TRACE_FIELD] = trace_context
    if nodes is not None:
        extra[NODES_FIELD] = list(nodes)
    if rank_policy is not None:
        extra[RANK_POLICY_FIELD] = rank_policy
    if timing is not None:
        extra[TIMING_FIELD] = timing.encode()
    return _entered(RendezvousState(Status.JOINABLE, version=version, extra=extra), now)


def declared_timing(state: RendezvousState) -> Timing | None:
    """The time limits the version was opened with, when its opener recorded them."""
    document = state.extra.get(TIMING_FIELD)
    if not isinstance(document, dict):
        return None
    values = {name: _seconds(document.get(name)) for name in Timing.__dataclass_fields__}
    if any(value is None for value in values.values()):
        return None
    return Timing(**{name: value for name, value in values.items() if value is not None})


def declared_nodes(state: RendezvousState) -> tuple[int, int] | None:
    """The (min_nodes, max_nodes) the version was opened with, when its opener recorded them."""
    nodes = state.extra.get(NODES_FIELD)
    if (
        isinstance(nodes, list)
        and len(nodes) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) for n in nodes)
    ):
        return nodes[0], nodes[1]
    return None


def declared_rank_policy(state: RendezvousState) -> str:
    """The spec of the rank policy the version was opened with (join order unless said)."""
    policy = state.extra.get(RANK_POLICY_FIELD)
    return policy if isinstance(policy, str) else "join_order"


def decided_ranks(state: RendezvousState) -> rank_policy.Assignment | rank_policy.Conflict | None:
    """The ranks the freezing node decided, when a policy other than join order did."""
    return rank_policy.decode(state.extra.get(RANKS_FIELD), state.world_size)


def trace_context(state: RendezvousState) -> str | None:
    """The version's shared trace context; None when its opener did not trace (or was torch)."""
    context = state.extra.get(TRACE_FIELD)
    return context if isinstance(context, str) else None


@dataclass(frozen=True)
class Joined:
    state: RendezvousState
    rank: int
    lifetime: Lifetime
    # The node whose join reached min_nodes waits out the last call, unless that join froze it.
    holds_last_call: bool


def join(
    state: RendezvousState, min_nodes: int, max_nodes: int, *, now: float | None = None
) -> Joined:
    """Take the next rank of a joinable state; freeze it when it becomes full."""
    if state.status is not Status.JOINABLE:
        raise ValueError(f"cannot join a {state.status.value} rendezvous")
    if state.world_size >= max_nodes:
        raise ValueError("a joinable rendezvous is never full")
    rank = state.world_size
    participants = (*state.participants, rank)
    if len(participants) == max_nodes:
        frozen = replace(state, status=Status.FROZEN, participants=participants, keep_alives=())
        return Joined(_entered(frozen, now), rank, Lifetime.FROZEN, holds_last_call=False)
    # From min_nodes on the state is ephemeral: if the last-call holder dies, it expires.
    lifetime = Lifetime.JOINABLE if len(participants) >= min_nodes else Lifetime.PERMANENT
    joined = replace(state, participants=participants)
    holds_last_call = rank == min_nodes - 1
    if holds_last_call and now is not None:
        joined = replace(joined, extra={**joined.extra, LAST_CALL_FIELD: round(now, 3)})
    return Joined(joined, rank, lifetime, holds_last_call=holds_last_call)


# Ours, not torch's: when the join that reached min_nodes began the last call (torch's
# layout; under claims that join's claim records it). A torch node's join records nothing.
LAST_CALL_FIELD = "etcd_rdzv_last_call_since"


def last_call_since(state: RendezvousState) -> float | None:
    """Unix time the last call of a joinable state began, when the node of ours holding it
    recorded it in the document (torch's layout)."""
    if state.status is not Status.JOINABLE:
        return None
    return _seconds(state.extra.get(LAST_CALL_FIELD))


def freeze(
    state: RendezvousState,
    *,
    now: float | None = None,
    world_size: int | None = None,
    ranks: rank_policy.Assignment | rank_policy.Conflict | None = None,
) -> RendezvousState:
    """Close the join window. Under claims (below) the state does not list who joined: the
    freezing node counted `world_size` join claims, and decided their `ranks` when the
    version's rank policy is not join order."""
    participants = state.participants if world_size is None else tuple(range(world_size))
    frozen = replace(state, status=Status.FROZEN, participants=participants, keep_alives=())
    if ranks is not None:
        frozen = replace(frozen, extra={**frozen.extra, RANKS_FIELD: ranks.fields()})
    return _entered(frozen, now)


@dataclass(frozen=True)
class Confirmed:
    state: RendezvousState
    lifetime: Lifetime

    @property
    def completed(self) -> bool:
        return self.state.status is Status.FINAL


def confirm(state: RendezvousState, keep_alive_key: str, *, now: float | None = None) -> Confirmed:
    """Record one participant's keep-alive key; the last confirmation makes the version final."""
    keep_alives = (*(state.keep_alives or ()), keep_alive_key)
    if len(keep_alives) == state.world_size:
        return Confirmed(complete(state, keep_alives, now=now), Lifetime.PERMANENT)
    return Confirmed(replace(state, keep_alives=keep_alives), Lifetime.FROZEN)


def complete(
    state: RendezvousState, keep_alives: Iterable[str], *, now: float | None = None
) -> RendezvousState:
    """The final state: every participant confirmed with its keep-alive key."""
    final = replace(
        state, status=Status.FINAL, keep_alives=tuple(keep_alives), num_workers_waiting=0
    )
    return _entered(final, now)


# --- claims: joins and confirmations without contention (etcd v3) ---------------------------
# Over v3 a node joins by creating a key of its own, `v_N/joined/<node>`, in a transaction that
# also checks that the joinable state is unchanged and counts the join keys: its rank is its
# place among them. It confirms the same way, by creating its keep-alive key while the frozen
# state is unchanged. Nobody rewrites the shared state to join or confirm, so no node ever
# loses a compare-and-swap to another and no waiting node wakes up for each join: the state
# changes only when the version freezes and when it goes final. The documents keep torch's
# shape; only the joinable one does not list its participants. torch's backend speaks v2 only,
# so it never meets this layout.


@dataclass(frozen=True)
class ClaimedRank:
    rank: int
    # The version filled up before this claim: its node has no rank in it.
    too_late: bool
    # This claim filled the version: its node freezes it at once.
    freezes: bool
    # This claim reached min_nodes: its node waits out the last call, then freezes.
    holds_last_call: bool


def claimed_rank(position: int, min_nodes: int, max_nodes: int) -> ClaimedRank:
    """What the node whose join claim is the `position`-th (from 1) of its version does."""
    if position < 1:
        raise ValueError(f"a claim's position counts itself, got {position}")
    return ClaimedRank(
        rank=position - 1,
        too_late=position > max_nodes,
        freezes=position == max_nodes,
        holds_last_call=position == min_nodes < max_nodes,
    )


def announce_waiting(state: RendezvousState) -> RendezvousState:
    return replace(state, num_workers_waiting=(state.num_workers_waiting or 0) + 1)


def close(state: RendezvousState | None, *, now: float | None = None) -> RendezvousState:
    if state is None:
        return _entered(RendezvousState(Status.CLOSED), now)
    return _entered(replace(state, status=Status.CLOSED), now)


def nodes_waiting(state: RendezvousState | None, member_of: int | None) -> int:
    """How many nodes wait for the members of version `member_of` to rendezvous again.

    torchrun's agents poll this and restart their workers when it is positive. Besides the
    nodes counted in a final state, a node whose version is no longer the active one is
    awaited by whoever replaced it (they tear a version down as soon as one member leaves):
    it must not read 0 and carry on with a membership that is gone.
    """
    if state is None:
        return 1 if member_of is not None else 0
    if state.status is Status.CLOSED:
        return 0
    if state.status is Status.FINAL and state.version == member_of:
        return state.num_workers_waiting or 0
    if member_of is None:
        return state.num_workers_waiting or 0 if state.status is Status.FINAL else 0
    return max(1, state.world_size)


def missing_keep_alives(state: RendezvousState, live_keys: Iterable[str]) -> list[str]:
    """Keep-alive keys of a final version whose owners stopped refreshing them."""
    live = set(live_keys)
    return [key for key in state.keep_alives or () if key not in live]


# --- etcd outages while training -------------------------------------------------------------
# Workers train without etcd: an outage while nobody joins changes nothing about who is in the
# job. These decide what a member does once etcd answers again, and what leaving means.


def may_restore_keep_alive(
    state: RendezvousState | None, version: int, rank: int, key: str
) -> bool:
    """Whether a live member may re-create its keep-alive `key` (rank `rank` of `version`),
    found gone: it expired while etcd did not answer or was paused, not because the member
    left. Only while that version is still the active one and still counts the member; a
    version torn down or replaced meanwhile is not brought back.
    """
    if state is None or state.version != version:
        return False
    if state.status is Status.FINAL:
        return key in (state.keep_alives or ())
    if state.status is Status.FROZEN:
        return 0 <= rank < state.world_size
    return False


def members_left_training(
    state: RendezvousState | None, own_key: str | None, live_keys: Iterable[str]
) -> list[str]:
    """Keep-alive keys of the other members of the active final version that still live:
    nodes that train on if this one leaves. Closing the run under them would stop them at
    their next rendezvous, so a node that leaves while this is not empty leaves it open.
    """
    if state is None or state.status is not Status.FINAL:
        return []
    live = set(live_keys)
    return [key for key in state.keep_alives or () if key != own_key and key in live]


# --- decoding helpers ------------------------------------------------------------------------


def _optional_int(document: Mapping[str, Any], name: str, key: str, raw: str | None) -> int | None:
    value = document.get(name)
    if value is None:
        return None
    # torch writes the version as a string ("3") and counts as numbers; nothing else is ours.
    # Floats are refused, not truncated: 1.5 is not version 1, and inf is not a version at all.
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise CorruptStateError(key, f"{name} is not an integer", raw)
    try:
        number = int(value)
    except ValueError:
        raise CorruptStateError(key, f"{name} is not an integer", raw) from None
    if number < 0:
        raise CorruptStateError(key, f"{name} is negative", raw)
    return number


def _counted(state: RendezvousState) -> dict[str, Any] | None:
    """The counted form of `state`'s participants and keep-alive keys, None if it has none."""
    size = state.world_size
    if not size or state.participants != tuple(range(size)):
        return None
    summary: dict[str, Any] = {"participants": size}
    keys = state.keep_alives
    if keys and len(keys) == size:
        prefix = keys[0].removesuffix("0")
        if prefix != keys[0] and all(k == f"{prefix}{r}" for r, k in enumerate(keys)):
            summary["keep_alive_prefix"] = prefix
    return summary


def _uncounted(
    summary: object, keep_alives: tuple[str, ...] | None, key: str, raw: str | None
) -> tuple[tuple[int, ...], tuple[str, ...] | None]:
    if not isinstance(summary, dict):
        raise CorruptStateError(key, f"{COUNTED_FIELD} is not an object", raw)
    size, prefix = summary.get("participants"), summary.get("keep_alive_prefix")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= _MOST_COUNTED:
        raise CorruptStateError(key, f"{COUNTED_FIELD} counts no participants", raw)
    if prefix is None:
        return tuple(range(size)), keep_alives
    if not isinstance(prefix, str):
        raise CorruptStateError(key, f"{COUNTED_FIELD} has a keep-alive prefix that is no key", raw)
    return tuple(range(size)), tuple(f"{prefix}{rank}" for rank in range(size))


def _int_list(value: object, key: str, raw: str | None) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(item, int) and not isinstance(item, bool) for item in value
    ):
        raise CorruptStateError(key, "participants is not a list of ranks", raw)
    return value


def _optional_str_list(
    document: Mapping[str, Any], name: str, key: str, raw: str | None
) -> tuple[str, ...] | None:
    value = document.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise CorruptStateError(key, f"{name} is not a list of keys", raw)
    return tuple(value)
