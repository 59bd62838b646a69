"""Where a run's keys live and what they mean: one owner for every reader.

Two key layouts share torch's paths and document shapes and differ in how a node joins and
confirms (see `protocol`, "claims"):

- **torch's** (`TorchLayout`, every etcd API; the only one over v2, so that torch's `etcd`
  backend can share the rendezvous): a node joins and confirms by a compare-and-swap of the
  state document, which lists the participants and the confirmed keep-alive keys;
- **claims** (`ClaimsLayout`, etcd v3): a node joins by creating `v_N/joined/<node>` and
  confirms by creating its keep-alive key, each in a transaction guarded by the state. The
  joinable document lists nobody, and the frozen one lists no confirmation until final.

So the same keys mean different things per layout. The agent, `etcd-rdzv status` and the test
harness all ask the layout (`participants`, `confirmed_ranks`, `rank_views`) instead of reading
the document's lists themselves: reading them directly named healthy confirmed nodes of a v3
run as unconfirmed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import ClassVar

from etcd_rdzv.kv import Entry, KeyValue
from etcd_rdzv.protocol import RendezvousState, Status, declared_nodes

_RANK_KEY = re.compile(r"/rank_(\d+)$")


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

    def encode(self) -> str:
        document = {"host": self.host, "addr": self.addr, "pid": self.pid, "ttl": self.ttl}
        return json.dumps(document, separators=(",", ":"))

    @classmethod
    def parse(cls, raw: str) -> NodeIdentity | None:
        try:
            document = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(document, dict):
            return None
        pid, ttl = document.get("pid"), document.get("ttl")
        return cls(
            host=_optional_str(document.get("host")),
            addr=_optional_str(document.get("addr")),
            pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
            ttl=float(ttl) if isinstance(ttl, int | float) and not isinstance(ttl, bool) else None,
        )

    def describe(self) -> str:
        where = self.host or self.addr or "an unknown host"
        return f"{where} (pid {self.pid})" if self.pid is not None else where


@dataclass(frozen=True)
class RankView:
    """One rank of a version: its keep-alive key, and whether the layout counts it confirmed."""

    rank: int
    keep_alive_key: str
    keep_alive: bool
    confirmed: bool | None  # None: nobody confirms in this state (joinable, setup, closed)
    identity: NodeIdentity | None
    expires_in: float | None = None  # seconds the keep-alive key has left

    @property
    def keep_alive_age(self) -> float | None:
        """Seconds since the key was last renewed: its TTL minus what it has left."""
        if self.expires_in is None or self.identity is None or self.identity.ttl is None:
            return None
        return max(0.0, self.identity.ttl - self.expires_in)


class KeyLayout:
    """What a version's keys say, in one layout. Pure but for `with_participants`."""

    name: ClassVar[str]
    # Nodes join and confirm by claims (transactions), not by rewriting the state document.
    joins_by_claims: ClassVar[bool]

    def __init__(self, paths: RunPaths) -> None:
        self.paths = paths

    def participants(self, state: RendezvousState, join_claims: int | None) -> int:
        """How many nodes took part in `state`'s version, given the number of its join claims
        when they were counted (None: not counted)."""
        return state.world_size

    def lists_participants(self, state: RendezvousState) -> bool:
        """Whether the document alone says who joined (else count the join claims)."""
        return True

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

    def rank_views(
        self,
        state: RendezvousState,
        keep_alives: Iterable[Entry],
        time_left: Callable[[Entry], float | None] = lambda entry: None,
    ) -> tuple[RankView, ...]:
        """Each rank of `state`'s version (and each keep-alive key of a rank it does not
        list), from the version's live keep-alive keys."""
        assert state.version is not None
        by_rank: Mapping[int, Entry] = {
            rank: entry for entry in keep_alives if (rank := rank_of(entry.key)) is not None
        }
        confirmed = self.confirmed_ranks(state, (entry.key for entry in by_rank.values()))
        return tuple(
            RankView(
                rank=rank,
                keep_alive_key=self.paths.keep_alive(state.version, rank),
                keep_alive=rank in by_rank,
                confirmed=None if confirmed is None else rank in confirmed,
                identity=NodeIdentity.parse(by_rank[rank].value) if rank in by_rank else None,
                expires_in=time_left(by_rank[rank]) if rank in by_rank else None,
            )
            for rank in sorted({*state.participants, *by_rank})
        )


class TorchLayout(KeyLayout):
    """torch's: the state document lists participants, then confirmed keep-alive keys."""

    name = "torch"
    joins_by_claims = False


class ClaimsLayout(KeyLayout):
    """Claims (etcd v3): joins are keys of their own, and a confirmation is the keep-alive key
    itself, created under the frozen state; the document lists both only once final."""

    name = "claims"
    joins_by_claims = True

    def participants(self, state: RendezvousState, join_claims: int | None) -> int:
        if self.lists_participants(state) or join_claims is None:
            return state.world_size
        declared = declared_nodes(state)
        # Claims past max_nodes came too late: their nodes wait for the next version.
        return min(join_claims, declared[1]) if declared is not None else join_claims

    def lists_participants(self, state: RendezvousState) -> bool:
        return state.status is not Status.JOINABLE or bool(state.participants)

    def confirmed_ranks(
        self, state: RendezvousState, live_keep_alives: Iterable[str]
    ) -> frozenset[int] | None:
        if state.status is Status.FROZEN:
            # Each key was created in a transaction that required this very frozen state.
            ranks = (rank_of(key) for key in live_keep_alives)
            return frozenset(r for r in ranks if r is not None and r < state.world_size)
        return super().confirmed_ranks(state, live_keep_alives)


def layout_for(kv: KeyValue, paths: RunPaths) -> KeyLayout:
    """The layout a run uses over `kv`: claims wherever the API has transactions (v3); over
    v2, torch's, the one torch's own backend speaks."""
    return ClaimsLayout(paths) if kv.supports_claims else TorchLayout(paths)


def _optional_str(value: object) -> str | None:
    return value if isinstance(value, str) else None
