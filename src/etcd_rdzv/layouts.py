"""Where a run's keys live and what they mean: one owner for every reader.

Two key layouts share torch's paths and document shapes and differ in how a node joins and
confirms (see `protocol`, "claims"):

- **torch's** (`TorchLayout`, every etcd API; the only one over v2, so that torch's `etcd`
  backend can share the rendezvous): a node joins and confirms by a compare-and-swap of the
  state document, which lists the participants and the confirmed keep-alive keys;
- **claims** (`ClaimsLayout`, etcd v3): a node joins by creating `v_N/joined/<node>` and
  confirms by creating its keep-alive key, each in a transaction guarded by the state. The
  joinable document lists nobody, and the frozen one lists no confirmation until final.

So the same keys mean different things per layout, and each layout owns both sides of them:
how a node writes them to take part (`take_part`, performed by the driver it is given), and
what they say when read (`participants`, `confirmed_ranks`, `rank_views`). The agent,
`etcd-rdzv status` and the test harness all ask the layout instead of reading the document's
lists themselves: reading them directly named healthy confirmed nodes of a v3 run as
unconfirmed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

from etcd_rdzv import decisions, protocol, rank_policy
from etcd_rdzv.config import KEY_LAYOUT_OF_API, KeyLayoutName
from etcd_rdzv.kv import Entry, KeyNotFound, KeyValue
from etcd_rdzv.protocol import RendezvousState, Status, declared_nodes
from etcd_rdzv.retry import Deadline
from etcd_rdzv.telemetry import Phase

if TYPE_CHECKING:
    from etcd_rdzv.rendezvous import EtcdRendezvous

# The state document as read, and what it says.
Snapshot = tuple[Entry, RendezvousState]

_RANK_KEY = re.compile(r"/rank_(\d+)$")
_DEPARTURE_KEY = re.compile(r"/left_rank_(\d+)$")
_WAITING_KEY = re.compile(r"/v_\d+/waiting_[^/]+$")


@dataclass(frozen=True)
class RunPaths:
    """torch's paths of one run (both layouts keep them)."""

    run: str

    @property
    def rdzv(self) -> str:
        return f"{self.run}/rdzv"

    @property
    def active_version(self) -> str:
        return f"{self.run}/rdzv/active_version"

    @property
    def version_counter(self) -> str:
        return f"{self.run}/rdzv/version_counter"

    def version_dir(self, version: int) -> str:
        return f"{self.run}/rdzv/v_{version}"

    def keep_alive(self, version: int, rank: int) -> str:
        return f"{self.run}/rdzv/v_{version}/rank_{rank}"

    def store(self, version: int) -> str:
        return f"{self.run}/rdzv/v_{version}/kv"

    def join_claims(self, version: int) -> str:
        """Ours, not torch's: the prefix of the join claims of a version (claims layout)."""
        return f"{self.run}/rdzv/v_{version}/joined/"

    def keep_alives(self, version: int) -> str:
        """The prefix every keep-alive key of a version starts with."""
        return f"{self.run}/rdzv/v_{version}/rank_"

    def departure(self, version: int, rank: int) -> str:
        """Ours: written by a member that leaves its version on purpose, before it deletes its
        keep-alive key, so that readers can tell a node that left from one that was lost."""
        return f"{self.run}/rdzv/v_{version}/left_rank_{rank}"

    def waiting(self, version: int, claimant: str) -> str:
        """Ours: a node waiting for final `version` to end, who it is (the state only counts
        them, in `num_workers_waiting`)."""
        return f"{self.run}/rdzv/v_{version}/waiting_{claimant}"

    def ending(self, version: int) -> str:
        """Ours: written by the node that tears a version down: why, and who made it fail."""
        return f"{self.run}/rdzv/v_{version}/ended"

    @property
    def rank_memory(self) -> str:
        """Ours: the ranks of the last final version by node id (`rank_policy.RankMemory`),
        for a rank policy other than join order. Beside `rdzv/`, not in it: nodes waiting for
        a version to end watch `rdzv/`, and this changes when one goes final."""
        return f"{self.run}/rank_memory"


def rank_of(key: str) -> int | None:
    """The rank a keep-alive key (`.../v_N/rank_R`) holds, None for any other key."""
    match = _RANK_KEY.search(key)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class NodeIdentity:
    """What an etcd-rdzv node writes into its claims and keep-alive key; torch's nodes write
    none (their keep-alive keys hold no JSON)."""

    host: str | None
    addr: str | None
    pid: int | None
    ttl: float | None = None  # the TTL the node renews its key to
    at: float | None = None  # unix time the node wrote the key: when it joined or confirmed
    # Who the node is across restarts of its agent (`rank_policy`); and its rank under
    # rank_policy=from_env, which the freezing node reads from its join claim.
    node_id: str | None = None
    env_rank: int | None = None

    def encode(self) -> str:
        return json.dumps(self.fields(), separators=(",", ":"))

    def fields(self) -> dict[str, object]:
        document: dict[str, object] = {
            "host": self.host,
            "addr": self.addr,
            "pid": self.pid,
            "ttl": self.ttl,
        }
        if self.at is not None:
            document["at"] = self.at
        if self.node_id is not None:
            document["id"] = self.node_id
        if self.env_rank is not None:
            document["env_rank"] = self.env_rank
        return document

    @classmethod
    def parse(cls, raw: str) -> NodeIdentity | None:
        document = _json_object(raw)
        return None if document is None else cls.from_fields(document)

    @classmethod
    def from_fields(cls, document: Mapping[str, object]) -> NodeIdentity:
        pid = document.get("pid")
        env = document.get("env_rank")
        return cls(
            host=_optional_str(document.get("host")),
            addr=_optional_str(document.get("addr")),
            pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
            ttl=_optional_seconds(document.get("ttl")),
            at=_optional_seconds(document.get("at")),
            node_id=_optional_str(document.get("id")),
            env_rank=env if isinstance(env, int) and not isinstance(env, bool) else None,
        )

    def describe(self) -> str:
        where = self.host or self.addr or "an unknown host"
        return f"{where} (pid {self.pid})" if self.pid is not None else where

    def named(self) -> str:
        """`node-a (vm-a, pid 12)`: its node id first, where it has one (rank policies)."""
        if self.node_id is None or self.node_id == self.host:
            return self.describe()
        where = self.host or self.addr or "an unknown host"
        pid = f", pid {self.pid}" if self.pid is not None else ""
        return f"{self.node_id} ({where}{pid})"

    def candidate(self) -> rank_policy.Candidate:
        """This node as a rank policy sees its join claim."""
        return rank_policy.Candidate(self.node_id, self.env_rank, self.named())


@dataclass(frozen=True)
class Departure:
    """A member that left its version on purpose (`RunPaths.departure`)."""

    rank: int
    node: NodeIdentity  # its `at` is when it left
    reason: str  # "rendezvous_again" (its agent restarts its workers) or "stopped"

    def encode(self) -> str:
        return json.dumps({**self.node.fields(), "reason": self.reason}, separators=(",", ":"))

    @classmethod
    def parse(cls, rank: int, raw: str) -> Departure | None:
        document = _json_object(raw)
        if document is None:
            return None
        return cls(rank, NodeIdentity.from_fields(document), str(document.get("reason", "")))


@dataclass(frozen=True)
class Culprit:
    rank: int
    node: NodeIdentity | None  # who held it, where the keys told


def describe_rank(rank: int, node: NodeIdentity | None, *, place: bool = False) -> str:
    """`rank 1 (vm-b, pid 18405)`, as far as the keys name its node: how every reader
    names a rank. `place`: the number is a join claim's place, not a rank (a joinable
    version under a rank policy other than join order ranks nobody yet)."""
    word = "place" if place else "rank"
    if node is None:
        return f"{word} {rank}"
    where = node.host or node.addr or "an unknown host"
    return (
        f"{word} {rank} ({where}, pid {node.pid})"
        if node.pid is not None
        else f"{word} {rank} ({where})"
    )


def ranked_by_place(state: RendezvousState) -> bool:
    """Whether `state`'s numbers are join claims' places rather than ranks: a joinable
    version whose rank policy decides ranks only at the freeze."""
    return (
        state.status is Status.JOINABLE
        and protocol.declared_rank_policy(state) != rank_policy.JOIN_ORDER.spec
    )


@dataclass(frozen=True)
class VersionEnd:
    """Why a version was torn down, by whom and when (`RunPaths.ending`)."""

    reason: str  # the `reason` of the observer's `version_torn_down` event
    culprits: tuple[Culprit, ...]
    by: NodeIdentity  # the node that tore it down; its `at` is when
    # Members whose keep-alive keys still lived when it was torn down: they neither left nor
    # expired yet (a node killed a moment ago looks like this until its key expires).
    stayed: tuple[Culprit, ...] = ()
    # The culprits' numbers are join claims' places, not ranks (`ranked_by_place`).
    by_place: bool = False

    def encode(self) -> str:
        document: dict[str, object] = {
            "reason": self.reason,
            "culprits": _encode_ranks(self.culprits),
            "by": self.by.fields(),
            "stayed": _encode_ranks(self.stayed),
        }
        if self.by_place:
            document["by_place"] = True
        return json.dumps(document, separators=(",", ":"))

    @classmethod
    def parse(cls, raw: str) -> VersionEnd | None:
        document = _json_object(raw)
        if document is None:
            return None
        by = document.get("by")
        return cls(
            reason=str(document.get("reason", "")),
            culprits=_parse_ranks(document.get("culprits")),
            by=NodeIdentity.from_fields(by if isinstance(by, dict) else {}),
            stayed=_parse_ranks(document.get("stayed")),
            by_place=document.get("by_place") is True,
        )


def _encode_ranks(ranks: Iterable[Culprit]) -> list[dict[str, object]]:
    return [{"rank": c.rank, "node": c.node.fields() if c.node else None} for c in ranks]


def _parse_ranks(value: object) -> tuple[Culprit, ...]:
    return tuple(
        Culprit(c["rank"], _identity_or_none(c.get("node")))
        for c in (value if isinstance(value, list) else [])
        if isinstance(c, dict) and isinstance(c.get("rank"), int)
    )


def departures(entries: Iterable[Entry]) -> dict[int, Departure]:
    """The departures recorded among a version's keys, by rank."""
    found = {}
    for entry in entries:
        match = _DEPARTURE_KEY.search(entry.key)
        if match and (departure := Departure.parse(int(match.group(1)), entry.value)):
            found[departure.rank] = departure
    return found


def waiting_nodes(entries: Iterable[Entry]) -> tuple[NodeIdentity, ...]:
    """The nodes that said they wait for a version to end (`RunPaths.waiting`), earliest first."""
    found = [
        node
        for entry in entries
        if _WAITING_KEY.search(entry.key) and (node := NodeIdentity.parse(entry.value))
    ]
    return tuple(sorted(found, key=lambda node: node.at or 0.0))


def version_end(entries: Iterable[Entry], paths: RunPaths, version: int) -> VersionEnd | None:
    """The ending recorded among a version's keys, if it was torn down by a node of ours."""
    key = paths.ending(version)
    return next((VersionEnd.parse(e.value) for e in entries if e.key == key), None)


@dataclass(frozen=True)
class RankView:
    """One rank of a version: its keep-alive key, and whether the layout counts it confirmed."""

    rank: int
    keep_alive_key: str
    keep_alive: bool
    confirmed: bool | None  # None: nobody confirms in this state (joinable, setup, closed)
    identity: NodeIdentity | None
    expires_in: float | None = None  # seconds the keep-alive key has left
    joined_at: float | None = None  # unix time of its join claim (claims layout)
    confirmed_at: float | None = None  # unix time it wrote its keep-alive key
    left: Departure | None = None  # it left the version on purpose
    # Its rank in the final version before, where the run's rank policy recorded it.
    previous_rank: int | None = None
    # `rank` is a join claim's place: the version's rank policy ranks nobody until it freezes.
    place: bool = False

    @property
    def overdue(self) -> bool:
        """Its keep-alive was not renewed for two renewal periods and a second: its node
        stopped renewing (dead, stopped, or cut off from etcd) unless etcd itself was slow."""
        age = self.keep_alive_age
        if age is None or self.identity is None or self.identity.ttl is None:
            return False
        return age > 2 * self.identity.ttl / 3 + 1.0

    @property
    def keep_alive_age(self) -> float | None:
        """Seconds since the key was last renewed: its TTL minus what it has left."""
        if self.expires_in is None or self.identity is None or self.identity.ttl is None:
            return None
        return max(0.0, self.identity.ttl - self.expires_in)


class KeyLayout:
    """How nodes take part in a version, and what its keys then say, in one layout."""

    name: ClassVar[str]
    # Nodes join and confirm by claims (transactions), not by rewriting the state document.
    joins_by_claims: ClassVar[bool]

    def __init__(self, paths: RunPaths) -> None:
        self.paths = paths

    def take_part(
        self, node: EtcdRendezvous, version: int, snapshot: Snapshot, deadline: Deadline
    ) -> tuple[int, Snapshot]:
        """Join joinable `version` and confirm: this node's rank, and the state after its
        confirmation (the driver then waits for the version to go final)."""
        raise NotImplementedError

    def participants(self, state: RendezvousState, join_claims: int | None) -> int:
        """How many nodes took part in `state`'s version, given the number of its join claims
        when they were counted (None: not counted)."""
        return state.world_size

    def encode_state(self, state: RendezvousState) -> str:
        """The state document as this layout writes it (any layout's reads every form)."""
        return state.encode(counted=self.joins_by_claims)

    def lists_participants(self, state: RendezvousState) -> bool:
        """Whether the document alone says who joined (else count the join claims)."""
        return True

    def state_expires(self, state: RendezvousState, nodes: tuple[int, int] | None) -> bool:
        """Whether the state key's TTL is its own: it expires if the nodes that should move
        it on are gone (else its TTL, over v3, is the run's). A setup placeholder and a frozen
        state always; in torch's layout a joinable one from min_nodes on (its last-call
        holder renews it), or when the node does not know min_nodes."""
        if state.status in (Status.SETUP, Status.FROZEN):
            return True
        if state.status is not Status.JOINABLE or self.joins_by_claims:
            return False
        return nodes is None or state.world_size >= nodes[0]

    def confirmed_ranks(
        self, state: RendezvousState, live_keep_alives: Iterable[str]
    ) -> frozenset[int] | None:
        """The ranks of `state`'s version that confirmed; None where nobody confirms yet."""
        if state.keep_alives is None:
            return None
        return frozenset(r for r in map(rank_of, state.keep_alives) if r is not None)

    def with_participants(self, kv: KeyValue, state: RendezvousState) -> RendezvousState:
        """`state` listing its participants: one listing of the join claims when the document
        does not list them, none otherwise."""
        if self.lists_participants(state) or state.version is None:
            return state
        claims = len(kv.list(self.paths.join_claims(state.version)).entries)
        return replace(state, participants=tuple(range(self.participants(state, claims))))

    def joined(self, kv: KeyValue, state: RendezvousState) -> tuple[NodeIdentity | None, ...]:
        """Who took each rank of `state`'s version, by rank, as far as the keys tell before a
        node confirms: in torch's layout nothing (a join writes only the shared document)."""
        return ()

    def join_claims(self, kv: KeyValue, version: int) -> tuple[NodeIdentity | None, ...]:
        """Who claimed a place in `version`, in claim order (the place is the index)."""
        try:
            claims = kv.list(self.paths.join_claims(version)).entries
        except KeyNotFound:
            return ()
        in_order = sorted(claims, key=lambda entry: entry.revision)
        return tuple(NodeIdentity.parse(entry.value) for entry in in_order)

    def decide_ranks(
        self,
        kv: KeyValue,
        policy: rank_policy.RankPolicy,
        claims: Sequence[NodeIdentity | None],
    ) -> rank_policy.Assignment | rank_policy.Conflict:
        """The ranks of a version's participants, its first join `claims` (`join_claims`),
        under `policy`, with the run's rank memory (what the freezing node writes into the
        frozen state). Only claims have places to rank: over torch's layout the config allows
        join order alone."""
        unnamed = NodeIdentity(None, None, None)
        candidates = [(claim or unnamed).candidate() for claim in claims]
        return rank_policy.assign(policy, candidates, self.rank_memory(kv))

    def rank_memory(self, kv: KeyValue) -> rank_policy.RankMemory:
        """The run's rank memory (`rank_policy.RankMemory`); empty when there is none yet."""
        try:
            return rank_policy.RankMemory.decode(kv.get(self.paths.rank_memory).value)
        except KeyNotFound:
            return rank_policy.RankMemory()

    def ids_by_rank(self, kv: KeyValue, state: RendezvousState) -> list[str | None]:
        """The node id of each rank of frozen or final `state`, from its join claims."""
        return [node.node_id if node else None for node in self.joined(kv, state)]

    def rank_views(
        self,
        state: RendezvousState,
        keep_alives: Iterable[Entry],
        time_left: Callable[[Entry], float | None] = lambda entry: None,
        joined: Sequence[NodeIdentity | None] = (),
    ) -> tuple[RankView, ...]:
        """Each rank of `state`'s version (and each keep-alive key of a rank it does not
        list), from the version's live keep-alive keys; a rank without one is named by who
        `joined` it, when the layout tells."""
        assert state.version is not None
        entries = tuple(keep_alives)
        by_rank: Mapping[int, Entry] = {
            rank: entry for entry in entries if (rank := rank_of(entry.key)) is not None
        }
        left = departures(entries)
        confirmed = self.confirmed_ranks(state, (entry.key for entry in by_rank.values()))
        decided = protocol.decided_ranks(state)
        previous = decided.previous if isinstance(decided, rank_policy.Assignment) else ()
        places = ranked_by_place(state)
        views = []
        for rank in sorted({*state.participants, *by_rank}):
            claim = joined[rank] if rank < len(joined) else None
            key = NodeIdentity.parse(by_rank[rank].value) if rank in by_rank else None
            is_confirmed = None if confirmed is None else rank in confirmed
            views.append(
                RankView(
                    rank=rank,
                    keep_alive_key=self.paths.keep_alive(state.version, rank),
                    keep_alive=rank in by_rank,
                    confirmed=is_confirmed,
                    identity=key or claim or (left[rank].node if rank in left else None),
                    expires_in=time_left(by_rank[rank]) if rank in by_rank else None,
                    joined_at=claim.at if claim is not None else None,
                    confirmed_at=key.at if key is not None and is_confirmed else None,
                    left=left.get(rank),
                    previous_rank=previous[rank] if rank < len(previous) else None,
                    place=places,
                )
            )
        return tuple(views)


class TorchLayout(KeyLayout):
    """torch's: the state document lists participants, then confirmed keep-alive keys."""

    name = "torch"
    joins_by_claims = False

    def take_part(
        self, node: EtcdRendezvous, version: int, snapshot: Snapshot, deadline: Deadline
    ) -> tuple[int, Snapshot]:
        with node.phase(Phase.JOIN, version=version) as scope:
            joined, snapshot = node.swap_state(
                snapshot,
                Phase.JOIN,
                lambda s: decisions.join_by_swap(s, version, node.nodes, node.runtime.time()),
                deadline,
                scope=scope,
            )
            assert isinstance(joined, protocol.Joined)
            scope.annotate(rank=joined.rank, participants=joined.state.world_size)
        rank = joined.rank
        if joined.holds_last_call:
            with node.phase(Phase.LAST_CALL, version=version, rank=rank):
                snapshot = self._hold_last_call(node, version, snapshot, deadline)
        with node.phase(Phase.FROZEN_WAIT, version=version, rank=rank) as scope:
            snapshot = _await_frozen(node, Phase.FROZEN_WAIT, version, snapshot, deadline)
            scope.annotate(participants=snapshot[1].world_size)
        with node.phase(Phase.CONFIRM, version=version, rank=rank):
            key = self.paths.keep_alive(version, rank)
            node.publish_keep_alive(key)
            node.hold_rank(version, rank)
            _, snapshot = node.swap_state(
                node.read_state(Phase.CONFIRM),
                Phase.CONFIRM,
                lambda s: decisions.confirm_by_swap(s, version, key, node.runtime.time()),
                deadline,
                # Confirming twice is recognized (the key is listed): a lost answer is re-read.
                retry_unknown=True,
            )
        return rank, snapshot

    def _hold_last_call(
        self, node: EtcdRendezvous, version: int, snapshot: Snapshot, deadline: Deadline
    ) -> Snapshot:
        """Keep the version joinable for last_call_timeout more seconds, then freeze it; its
        TTL is renewed meanwhile, so that it expires if this node dies."""
        clock = node.runtime.monotonic
        refresh_every = node.config.ttls.joinable / 3
        window_ends = clock() + node.config.last_call_timeout
        node.hold_last_call(version)
        refresh_due = clock() + refresh_every
        while True:
            times = decisions.LastCallClock(clock(), window_ends, refresh_due)

            def hold(
                state: RendezvousState, times: decisions.LastCallClock = times
            ) -> (
                decisions.Done
                | decisions.Write
                | decisions.Refresh
                | decisions.Wait
                | decisions.StartOver
            ):
                wall = node.runtime.time()
                return decisions.hold_last_call_by_swap(
                    state, version, times, wall, deadline.expired()
                )

            decision, snapshot = node.swap_state(snapshot, Phase.LAST_CALL, hold, deadline)
            if isinstance(decision, decisions.Done | decisions.Write):
                return snapshot  # frozen: by the join that filled it, or by us
            if isinstance(decision, decisions.Refresh):
                refresh_due = clock() + refresh_every
                continue
            assert isinstance(decision, decisions.Wait) and decision.until is not None
            wait = deadline.bound(max(0.0, decision.until - clock()))
            snapshot = node.next_state(snapshot, Phase.LAST_CALL, wait)


class ClaimsLayout(KeyLayout):
    """Claims (etcd v3): joins are keys of their own, and a confirmation is the keep-alive key
    itself, created under the frozen state. The frozen and final documents count them instead of
    listing them (`protocol.COUNTED_FIELD`): every node watches the state, so a list would cost
    O(N^2) bytes per version.

    No node ever loses a compare-and-swap to another, and waiting nodes wake up only when the
    version freezes and when it goes final: the state changes twice per version.
    """

    name = "claims"
    joins_by_claims = True

    def take_part(
        self, node: EtcdRendezvous, version: int, snapshot: Snapshot, deadline: Deadline
    ) -> tuple[int, Snapshot]:
        min_nodes, max_nodes = node.nodes
        policy = node.config.rank_policy
        with node.phase(Phase.JOIN, version=version) as scope:
            may = decisions.may_claim(
                snapshot[1], version, node.nodes, policy, node.config.env_rank
            )
            node.check(Phase.JOIN, may)
            queue = self.paths.join_claims(version)
            position = node.claim(
                Phase.JOIN,
                queue + node.claimant,
                snapshot[0],
                queue,
                f"version {version} stopped being joinable",
            )
            # The claim's place in the queue; under join order it is the rank, under another
            # rank policy the node that freezes the version decides the rank.
            claimed = protocol.claimed_rank(position, min_nodes, max_nodes)
            place = claimed.rank
            known = {"place": place} if policy.decided_at_freeze else {"rank": place}
            node.count_claims(version, position)
            node.see(snapshot[1])
            if claimed.too_late:
                scope.annotate(participants=max_nodes)
            else:
                scope.annotate(participants=place + 1, **known)
                if claimed.freezes:
                    snapshot = self._freeze(
                        node,
                        version,
                        snapshot,
                        phase=Phase.JOIN,
                        world_size=max_nodes,
                        deadline=deadline,
                    )
        if claimed.too_late:
            self._await_freeze(node, version, snapshot, place, deadline)
            raise node.start_over(Phase.JOIN, "version_full", f"version {version} filled up first")
        if claimed.holds_last_call:
            with node.phase(Phase.LAST_CALL, version=version, **known):
                snapshot = self._hold_last_call(node, version, snapshot, deadline)
        with node.phase(Phase.FROZEN_WAIT, version=version, **known) as scope:
            snapshot = self._await_freeze(node, version, snapshot, place, deadline)
            scope.annotate(participants=snapshot[1].world_size)
            # A claim that landed after the last-call holder counted the claims is not in it.
            node.check(Phase.FROZEN_WAIT, decisions.in_frozen_version(place, snapshot[1]))
            rank = node.check(Phase.FROZEN_WAIT, decisions.rank_in_frozen(place, snapshot[1]))
            scope.annotate(rank=rank)
        with node.phase(Phase.CONFIRM, version=version, rank=rank):
            snapshot = self._confirm(node, version, rank, snapshot, deadline)
        return rank, snapshot

    def _freeze(
        self,
        node: EtcdRendezvous,
        version: int,
        snapshot: Snapshot,
        *,
        phase: Phase,
        world_size: int,
        deadline: Deadline,
        claims: Sequence[NodeIdentity | None] | None = None,
    ) -> Snapshot:
        """Freeze the version with its first `world_size` claims as participants, ranked by
        the run's rank policy when it is not join order (from `claims`, when read already)."""
        ranks = node.decide_ranks(version, world_size, claims)
        _, snapshot = node.swap_state(
            snapshot,
            phase,
            lambda s: decisions.freeze_claims(s, version, world_size, node.runtime.time(), ranks),
            deadline,
        )
        return snapshot

    def _hold_last_call(
        self, node: EtcdRendezvous, version: int, snapshot: Snapshot, deadline: Deadline
    ) -> Snapshot:
        """The last call: nothing to keep fresh (the joinable state has no TTL, see
        `decisions.abandoned_after`); at the end, count the claims and freeze with as many."""
        window = node.deadline(node.config.last_call_timeout)
        node.hold_last_call(version)
        snapshot = _await_frozen(node, Phase.LAST_CALL, version, snapshot, deadline, until=window)
        if snapshot[1].is_version(Status.FROZEN, version):
            return snapshot  # the claim that filled the version froze it
        # Under a rank policy the claims themselves are ranked: one listing for both.
        claims = node.join_claims(version) if node.config.rank_policy.decided_at_freeze else None
        joined = len(claims) if claims is not None else node.count_join_claims(version)
        counted = decisions.last_call_counted(joined, node.nodes[1])
        return self._freeze(
            node,
            version,
            snapshot,
            phase=Phase.LAST_CALL,
            world_size=counted,
            deadline=deadline,
            claims=claims,
        )

    def _await_freeze(
        self, node: EtcdRendezvous, version: int, snapshot: Snapshot, rank: int, deadline: Deadline
    ) -> Snapshot:
        """Watch the joinable version until it freezes; a node that backs up the last-call
        holder tears the version down once the holder is overdue."""
        config = node.config
        after = decisions.abandoned_after(
            rank, config.min_nodes, config.last_call_timeout, config.ttls.joinable
        )
        abandoned = None if after is None else node.deadline(after)
        entry, state = _await_frozen(
            node, Phase.FROZEN_WAIT, version, snapshot, deadline, until=abandoned
        )
        if state.is_version(Status.FROZEN, version):
            return entry, state
        # Its holder is the claim that reached min_nodes: gone, or stalled past the window.
        holder = node.config.min_nodes - 1
        node.tear_down(version, entry, Status.JOINABLE, "last_call_abandoned", [holder])
        raise node.start_over(
            Phase.FROZEN_WAIT, "last_call_abandoned", f"nobody froze version {version}"
        )

    def _confirm(
        self, node: EtcdRendezvous, version: int, rank: int, snapshot: Snapshot, deadline: Deadline
    ) -> Snapshot:
        """Confirm by claim: the keep-alive key itself, created while the frozen state is
        unchanged. The claim that completes the set makes the version final."""
        key = self.paths.keep_alive(version, rank)
        position = node.claim(
            Phase.CONFIRM,
            key,
            snapshot[0],
            self.paths.keep_alives(version),
            f"version {version} stopped being frozen",
        )
        node.hold_rank(version, rank)
        world_size = snapshot[1].world_size
        # Only the claim that completes the set writes the keys (O(N) to build at every node).
        completes = position >= world_size
        keys = [self.paths.keep_alive(version, r) for r in range(world_size)] if completes else []
        decision, snapshot = node.swap_state(
            snapshot,
            Phase.CONFIRM,
            lambda s: decisions.complete_claims(s, version, position, keys, node.runtime.time()),
            deadline,
        )
        if isinstance(decision, decisions.Write) and node.config.rank_policy.decided_at_freeze:
            node.remember_ranks(version, snapshot[1])
        return snapshot

    def participants(self, state: RendezvousState, join_claims: int | None) -> int:
        if self.lists_participants(state) or join_claims is None:
            return state.world_size
        declared = declared_nodes(state)
        # Claims past max_nodes came too late: their nodes wait for the next version.
        return min(join_claims, declared[1]) if declared is not None else join_claims

    def lists_participants(self, state: RendezvousState) -> bool:
        return state.status is not Status.JOINABLE or bool(state.participants)

    def joined(self, kv: KeyValue, state: RendezvousState) -> tuple[NodeIdentity | None, ...]:
        """Under claims each join is a key holding its node's identity, and its place among
        the version's claims (by creation revision) is its rank under join order; under
        another rank policy the frozen document says which rank each place got."""
        if state.version is None or state.status in (Status.SETUP, Status.CLOSED):
            return ()
        claims = self.join_claims(kv, state.version)
        decided = protocol.decided_ranks(state)
        if not isinstance(decided, rank_policy.Assignment):
            return claims
        by_rank: list[NodeIdentity | None] = [None] * len(decided.ranks)
        for place, rank in enumerate(decided.ranks):
            by_rank[rank] = claims[place] if place < len(claims) else None
        return tuple(by_rank)

    def confirmed_ranks(
        self, state: RendezvousState, live_keep_alives: Iterable[str]
    ) -> frozenset[int] | None:
        if state.status is Status.FROZEN:
            # Each key was created in a transaction that required this very frozen state.
            ranks = (rank_of(key) for key in live_keep_alives)
            return frozenset(r for r in ranks if r is not None and r < state.world_size)
        return super().confirmed_ranks(state, live_keep_alives)


LAYOUTS: dict[KeyLayoutName, type[KeyLayout]] = {"claims": ClaimsLayout, "torch": TorchLayout}


def layout_for(name: KeyLayoutName, paths: RunPaths) -> KeyLayout:
    """The layout a run's configuration names (`RendezvousConfig.key_layout`)."""
    return LAYOUTS[name](paths)


def layout_of_client(kv: KeyValue, paths: RunPaths) -> KeyLayout:
    """For a reader without the run's configuration (`status` is given the API, tests a
    client): the layout of the API `kv` speaks (claims need v3's transactions)."""
    return layout_for(KEY_LAYOUT_OF_API["v3" if kv.supports_claims else "v2"], paths)


def _await_frozen(
    node: EtcdRendezvous,
    phase: Phase,
    version: int,
    snapshot: Snapshot,
    deadline: Deadline,
    *,
    until: Deadline | None = None,
) -> Snapshot:
    """Watch joinable `version` until it freezes (or `until` passes: then as last read)."""
    return node.await_state(
        snapshot,
        phase,
        version,
        done=Status.FROZEN,
        still=Status.JOINABLE,
        deadline=deadline,
        until=until,
    )


def _optional_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _optional_seconds(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _identity_or_none(fields: object) -> NodeIdentity | None:
    return NodeIdentity.from_fields(fields) if isinstance(fields, dict) else None


def _json_object(raw: str) -> dict[str, object] | None:
    try:
        document = json.loads(raw)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None
