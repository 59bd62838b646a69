"""Rank policies: which group rank each participant of a version gets. Pure: no I/O.

torch's `etcd` backend hands out ranks in join order (`join_order`, our default too), so a
re-rendezvous can move every rank, rank 0 included. The other policies keep ranks where
operators expect them:

- `stable`: a node of the previous final version gets its rank again; ranks that nodes which
  left freed go to newcomers, lowest first; ranks stay exactly 0..n-1 (`assign` says how a
  shrinking world moves as few nodes as possible);
- `host_order`: ranks sorted by node id (deterministic, like torch's dynamic handler);
- `from_env=VAR`: the rank a platform set in each node's environment (`GROUP_RANK`, a pod
  index, `SLURM_NODEID`), checked: no duplicates, no gaps, none out of range;
- and with any of them, `rank0_node=ID`: that node is rank 0 whenever it takes part.

Over claims (etcd v3) a node's *place* is the order of its join claim. Under `join_order`
the place is the rank and nothing else is written. Under any other policy the node that
freezes the version decides every rank (`assign`) from the claims (`Candidate`: each
claim's node id) and the run's rank memory (`RankMemory`: the ranks of the last final
version, by node id), and writes the result into the frozen document (`Assignment`, or a
`Conflict` that every node of the version raises). Over v2 (torch's layout, shared with
torch's nodes, which rank by join order) only `join_order` exists.

A node is "the same node" by its node id: `--rdzv-conf node_id=` (a pod name, say), else
`default_node_id`: the host name, the local address when given, and the GPUs the agent was
given (`CUDA_VISIBLE_DEVICES`), which all survive a restart of the agent on its host.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from etcd_rdzv.errors import ConfigurationError

PolicyKind = Literal["join_order", "stable", "host_order", "from_env"]
POLICY_KINDS: tuple[PolicyKind, ...] = ("join_order", "stable", "host_order", "from_env")
# How many node ids the rank memory keeps beyond the last final version's: nodes that may
# come back (a node returning after missing a version gets its old rank if it is free).
_EARLIER_KEPT = 256


@dataclass(frozen=True)
class RankPolicy:
    kind: PolicyKind = "join_order"
    env_var: str | None = None  # from_env only
    rank0_node: str | None = None

    def __post_init__(self) -> None:
        if (self.kind == "from_env") != (self.env_var is not None):
            raise ConfigurationError("rank_policy=from_env needs a variable: from_env=VAR.")
        if self.kind == "from_env" and self.rank0_node is not None:
            raise ConfigurationError(
                "rank0_node= cannot be combined with rank_policy=from_env: the environment "
                "already decides rank 0; set it there."
            )

    @classmethod
    def parse(cls, text: object, rank0_node: object = None) -> RankPolicy:
        """From `--rdzv-conf rank_policy=...` (`from_env=VAR` or `from_env:VAR`) and
        `rank0_node=...`; a clear error for anything else."""
        raw = "join_order" if text is None or str(text).strip() == "" else str(text).strip()
        kind, separator, env_var = raw.replace(":", "=", 1).partition("=")
        node = None if rank0_node is None or str(rank0_node).strip() == "" else str(rank0_node)
        if kind == "from_env":
            if not separator or not env_var.strip():
                raise ConfigurationError(
                    "rank_policy=from_env needs the variable that holds each node's rank: "
                    "rank_policy=from_env=GROUP_RANK (or from_env:GROUP_RANK)."
                )
            return cls("from_env", env_var.strip(), node)
        if kind not in POLICY_KINDS or separator:
            raise ConfigurationError(
                f"rank_policy={raw!r}: use join_order (the default: ranks in join order, as "
                "torch's backends), stable, host_order or from_env=VAR."
            )
        return cls(kind, None, node)

    @property
    def decided_at_freeze(self) -> bool:
        """Whether the freezing node decides ranks (else a rank is the claim's place)."""
        return self.kind != "join_order" or self.rank0_node is not None

    @property
    def spec(self) -> str:
        """The policy as the run records it: every node of a run must have the same."""
        base = f"from_env={self.env_var}" if self.kind == "from_env" else self.kind
        return base if self.rank0_node is None else f"{base};rank0_node={self.rank0_node}"

    def describe(self) -> str:
        return f"rank_policy={shown(self.spec)}"


def shown(spec: str) -> str:
    """A policy's spec as people read it: `stable with rank0_node=a` for `stable;rank0_node=a`."""
    return spec.replace(";", " with ")


JOIN_ORDER = RankPolicy()


def default_node_id(host: str, local_addr: str | None, environ: Mapping[str, str]) -> str:
    """What identifies a node across restarts of its agent, when the platform names none:
    `host[/local_addr][/gpus=CUDA_VISIBLE_DEVICES]`. Agents that share a host and all of
    these look like one node: give each its own `--rdzv-conf node_id=`."""
    parts = [host]
    if local_addr:
        parts.append(local_addr)
    devices = environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if devices:
        parts.append(f"gpus={devices}")
    return "/".join(parts)


def env_rank(policy: RankPolicy, environ: Mapping[str, str]) -> int | None:
    """This node's rank under `from_env`, read once at start: a clear error when the
    variable is unset or not a rank."""
    if policy.kind != "from_env" or policy.env_var is None:
        return None
    value = environ.get(policy.env_var)
    if value is None:
        raise ConfigurationError(
            f"rank_policy=from_env={policy.env_var}: {policy.env_var} is not set in this "
            "node's environment."
        )
    try:
        rank = int(value.strip())
    except ValueError:
        rank = -1
    if rank < 0:
        raise ConfigurationError(
            f"rank_policy=from_env={policy.env_var}: {policy.env_var}={value!r} is not a rank "
            "(an integer from 0)."
        )
    return rank


# --- what the freezing node decides from ------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One join claim of the version, as the freezing node reads it (claim order = place)."""

    node_id: str | None
    env_rank: int | None = None
    name: str = "a node"  # for messages: who it is and where


@dataclass(frozen=True)
class RankMemory:
    """The ranks of the run's last final version by node id, and older ones of nodes that
    were not in it (`earlier`: node id -> (rank, version)), for nodes that come back."""

    version: int | None = None
    ranks: Mapping[str, int] = field(default_factory=dict)
    earlier: Mapping[str, tuple[int, int]] = field(default_factory=dict)

    def encode(self) -> str:
        document = {
            "version": self.version,
            "ranks": dict(self.ranks),
            "earlier": {node: list(held) for node, held in self.earlier.items()},
        }
        return json.dumps(document, separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str | None) -> RankMemory:
        """Lenient: the memory only steers ranks toward stability, so anything unreadable
        reads as an empty memory (every node a newcomer), never as an error."""
        try:
            document = json.loads(raw or "")
        except (ValueError, RecursionError):
            return cls()
        if not isinstance(document, dict):
            return cls()
        version = document.get("version")
        ranks = document.get("ranks")
        earlier = document.get("earlier")
        return cls(
            version=version if _is_rank(version) else None,
            ranks={k: v for k, v in ranks.items() if _is_rank(v)}
            if isinstance(ranks, dict)
            else {},
            earlier={
                k: (v[0], v[1])
                for k, v in (earlier.items() if isinstance(earlier, dict) else ())
                if isinstance(v, list) and len(v) == 2 and _is_rank(v[0]) and _is_rank(v[1])
            },
        )

    def after(self, version: int, ids_by_rank: Sequence[str | None]) -> RankMemory:
        """The memory once final `version` ranked `ids_by_rank`; an older version never
        replaces a newer one's memory."""
        if self.version is not None and version <= self.version:
            return self
        ranks = {node: rank for rank, node in enumerate(ids_by_rank) if node is not None}
        earlier = dict(self.earlier)
        if self.version is not None:
            earlier.update({node: (rank, self.version) for node, rank in self.ranks.items()})
        kept = sorted(
            ((node, held) for node, held in earlier.items() if node not in ranks),
            key=lambda item: -item[1][1],
        )[:_EARLIER_KEPT]
        return RankMemory(version, ranks, dict(kept))


# --- what the freezing node writes -------------------------------------------------------------


@dataclass(frozen=True)
class Assignment:
    """Ranks decided at the freeze: `ranks[place]` is the rank of the place-th claim (from
    0), and `previous[rank]` that node's rank in final version `previous_version`."""

    policy: str
    ranks: tuple[int, ...]
    previous: tuple[int | None, ...]
    previous_version: int | None

    def fields(self) -> dict[str, object]:
        """The document's field, in as few bytes as say it all: every node watches it, twice
        per version. Ranks in join order are not listed, nor previous ranks equal to the rank
        (a node that kept its rank, the common case under `stable`), nor any previous rank
        when there was no previous version."""
        document: dict[str, object] = {"policy": self.policy}
        if self.ranks != tuple(range(len(self.ranks))):
            document["by_claim"] = list(self.ranks)
        if self.previous_version is not None:
            document["previous_version"] = self.previous_version
            document["moved"] = {
                str(rank): before for rank, before in enumerate(self.previous) if before != rank
            }
        return document

    def rank_of_place(self, place: int) -> int | None:
        return self.ranks[place] if 0 <= place < len(self.ranks) else None

    def place_of_rank(self) -> dict[int, int]:
        return {rank: place for place, rank in enumerate(self.ranks)}


@dataclass(frozen=True)
class Conflict:
    """The policy could not rank the version: every node of it fails with this message."""

    policy: str
    message: str

    def fields(self) -> dict[str, object]:
        return {"policy": self.policy, "error": self.message}


def decode(document: object, world_size: int) -> Assignment | Conflict | None:
    """What a frozen or final document of `world_size` participants says about ranks (None:
    nothing, or nothing that reads as ranks 0..n-1: then join order)."""
    if not isinstance(document, dict):
        return None
    policy = str(document.get("policy", ""))
    if "error" in document:
        return Conflict(policy, str(document["error"]))
    ranks = document.get("by_claim", list(range(world_size)))
    if not isinstance(ranks, list) or not all(_is_rank(r) for r in ranks):
        return None
    if sorted(ranks) != list(range(world_size)):
        return None
    before = document.get("previous_version")
    moved = document.get("moved")
    previous: list[int | None] = [None] * world_size
    if _is_rank(before) and isinstance(moved, dict):
        for rank in range(world_size):
            value = moved.get(str(rank), rank)
            previous[rank] = value if _is_rank(value) else None
    return Assignment(policy, tuple(ranks), tuple(previous), before if _is_rank(before) else None)


def assign(
    policy: RankPolicy, candidates: Sequence[Candidate], memory: RankMemory
) -> Assignment | Conflict:
    """Every participant's rank, by place, under `policy`.

    `stable`, in four passes over ranks 0..n-1:
    1. a node of the previous final version keeps its rank if it is below n;
    2. a node returning from an earlier final version gets its rank back if it is free;
    3. nodes of the previous version whose rank is n or more (the world shrank) take the
       lowest free ranks, in the order of their old ranks: they are the only nodes that move,
       and no assignment of 0..n-1 could move fewer;
    4. newcomers take the rest, lowest first, in join order.
    A node id claimed twice in one version counts once: its later claims are newcomers.
    """
    first = _first_claims(candidates)
    if policy.kind == "from_env":
        ranked = _from_env(policy, candidates)
        if isinstance(ranked, Conflict):
            return ranked
        ranks = ranked
    elif policy.kind == "stable":
        ranks = _stable(candidates, first, memory)
    elif policy.kind == "host_order":
        order = sorted(range(len(candidates)), key=lambda p: (candidates[p].node_id or "", p))
        ranks = [0] * len(candidates)
        for rank, place in enumerate(order):
            ranks[place] = rank
    else:
        ranks = list(range(len(candidates)))
    if policy.rank0_node is not None:
        ranks = _rank0_first(ranks, candidates, policy.rank0_node)
    previous: list[int | None] = [None] * len(ranks)
    for place, rank in enumerate(ranks):
        node = candidates[place].node_id
        if place in first and node is not None:
            previous[rank] = memory.ranks.get(node)
    return Assignment(policy.spec, tuple(ranks), tuple(previous), memory.version)


def _first_claims(candidates: Sequence[Candidate]) -> set[int]:
    """The places whose node id no earlier claim of the version had."""
    seen: set[str] = set()
    first = set()
    for place, candidate in enumerate(candidates):
        if candidate.node_id is not None and candidate.node_id not in seen:
            seen.add(candidate.node_id)
            first.add(place)
    return first


def _stable(candidates: Sequence[Candidate], first: set[int], memory: RankMemory) -> list[int]:
    size = len(candidates)
    ranks: list[int | None] = [None] * size
    taken: set[int] = set()

    def give(place: int, rank: int) -> None:
        ranks[place] = rank
        taken.add(rank)

    known = [p for p in sorted(first) if candidates[p].node_id in memory.ranks]
    for place in known:
        previous = memory.ranks[candidates[place].node_id or ""]
        if previous < size and previous not in taken:
            give(place, previous)
    returning = sorted(
        (p for p in first if ranks[p] is None and candidates[p].node_id in memory.earlier),
        key=lambda p: (-memory.earlier[candidates[p].node_id or ""][1], p),
    )
    for place in returning:
        earlier = memory.earlier[candidates[place].node_id or ""][0]
        if earlier < size and earlier not in taken:
            give(place, earlier)
    free = iter(sorted(set(range(size)) - taken))
    movers = sorted(
        (p for p in known if ranks[p] is None),
        key=lambda p: (memory.ranks[candidates[p].node_id or ""], p),
    )
    for place in movers:
        ranks[place] = next(free)
    for place in range(size):
        if ranks[place] is None:
            ranks[place] = next(free)
    return [rank for rank in ranks if rank is not None]


def _rank0_first(ranks: list[int], candidates: Sequence[Candidate], node: str) -> list[int]:
    """`node`'s first claim takes rank 0; the node that had it takes `node`'s rank."""
    place = next((p for p, c in enumerate(candidates) if c.node_id == node), None)
    if place is None or ranks[place] == 0:
        return ranks
    swapped = list(ranks)
    holder = swapped.index(0)
    swapped[holder], swapped[place] = swapped[place], 0
    return swapped


def _from_env(policy: RankPolicy, candidates: Sequence[Candidate]) -> list[int] | Conflict:
    var = policy.env_var
    size = len(candidates)
    problems = []
    unset = [c.name for c in candidates if c.env_rank is None]
    if unset:
        problems.append(f"{_names(unset)} gave no {var} (a node without this policy?)")
    counts = Counter(c.env_rank for c in candidates if c.env_rank is not None)
    for rank, count in sorted(counts.items()):
        if count > 1:
            holders = [c.name for c in candidates if c.env_rank == rank]
            problems.append(f"{var}={rank} on {count} nodes: {_names(holders)}")
    outside = [c for c in candidates if c.env_rank is not None and c.env_rank >= size]
    for candidate in outside:
        problems.append(
            f"{var}={candidate.env_rank} on {candidate.name} is not below the world size "
            f"{size} (ranks 0..{size - 1})"
        )
    missing = sorted(set(range(size)) - set(counts))
    if missing and problems:
        problems.append(f"nobody has {var}={', '.join(map(str, missing))}")
    if problems:
        return Conflict(
            policy.spec,
            f"{policy.describe()} cannot rank these {size} nodes: {'; '.join(problems)}. "
            f"Each node needs its own {var}, from 0 to the number of nodes minus one.",
        )
    return [c.env_rank for c in candidates if c.env_rank is not None]


def _names(names: Sequence[str]) -> str:
    return ", ".join(names)


def _is_rank(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
