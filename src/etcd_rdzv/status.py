"""`etcd-rdzv status`: what one run's rendezvous looks like in etcd right now, and why.

Read-only: it only gets, lists and watches keys under `<prefix>/run_<id>/rdzv`, never writes.

Exit codes:
    0  the state was shown (whatever it is; `--watch` ended by its timeout or Ctrl-C)
    2  bad arguments or configuration (malformed endpoint, TLS files), or a corrupt state key
    3  no keys at all for this run under the prefix (unknown run id, or wrong --prefix)
    4  etcd unreachable within --timeout, or it refused the request

The diagnosis is a pure function of what was read (`diagnose`), so it is tested without etcd.
etcd's v2 API keeps no timestamps: how long the run has been in its state comes from the stamp
an etcd-rdzv node writes when it changes the status (`protocol.entered_at`); a state last
changed by a torch node has none, and then only `--watch` can tell. A rank's keep-alive age is
its TTL (written by the node into the key) minus the TTL the key has left.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from etcd_rdzv import protocol
from etcd_rdzv.config import (
    DEFAULT_PREFIX,
    KEY_LAYOUT_OF_API,
    Credentials,
    KeyLayoutName,
    RendezvousConfig,
    SettingFlags,
    load_tls_files,
    normalize_prefix,
    parse_endpoints,
    parse_etcd_api,
)
from etcd_rdzv.errors import (
    ConfigurationError,
    CorruptStateError,
    EtcdRejectedError,
    EtcdUnavailableError,
)
from etcd_rdzv.forecast import Outlook, RunReading, forecast
from etcd_rdzv.kv.base import Entry, KeyNotFound, KeyValue
from etcd_rdzv.layouts import (
    Culprit,
    Departure,
    KeyLayout,
    NodeIdentity,
    RankView,
    RunPaths,
    VersionEnd,
    departures,
    describe_rank,
    layout_for,
    layout_of_client,
    rank_of,
    ranked_by_place,
    version_end,
    waiting_nodes,
)
from etcd_rdzv.protocol import RendezvousState, Status, declared_nodes, missing_keep_alives
from etcd_rdzv.rank_policy import Assignment, Conflict, shown

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_UNKNOWN_RUN = 3
EXIT_ETCD = 4

DEFAULT_REQUEST_TIMEOUT = 5.0
# A watch is re-issued this often, and the run read again: a paused etcd answers no watch,
# and only a read tells that it stopped answering. An idle run costs a read each time.
_WATCH_CHUNK_SECONDS = 3.0
# On a terminal, --watch redraws the ages and countdowns this often (a read each time).
_REDRAW_SECONDS = 1.0
_CLEAR_SCREEN = "\x1b[H\x1b[2J"
# How many versions before the active one the history shows.
HISTORY_VERSIONS = 3


# --- what was read ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    run_id: str
    prefix: str
    run_path: str
    # Owns what the keys mean: who joined and confirmed (see `etcd_rdzv.layouts`).
    layout: KeyLayout
    state: RendezvousState | None
    version_counter: int | None
    ranks: tuple[RankView, ...]
    # A watch after this revision misses nothing that happened since the reads.
    revision: int
    state_expires_in: float | None = None  # seconds the state key has left (None: no TTL)
    history: tuple[VersionHistory, ...] = ()  # the versions before, newest first
    read_at: float = 0.0  # unix seconds
    waiting: tuple[NodeIdentity, ...] = ()  # nodes waiting for the final version to end


@dataclass(frozen=True)
class VersionHistory:
    """What the keys of an ended version still tell: who left it, who tore it down and why."""

    version: int
    ending: VersionEnd | None
    departures: tuple[Departure, ...]
    # The nodes of the version after it (host, pid), where known: who came back.
    successors: frozenset[tuple[str | None, int | None]] | None = None

    def _stayed_behind(self, ranks: Sequence[Culprit]) -> str | None:
        """What became of the members that had neither left nor expired when the version was
        torn down, and did not leave later either: a node killed a moment before looks so.
        Only a node the keys name, and a next version whose members are all known, give a
        verdict."""
        left = {departure.rank for departure in self.departures}
        behind = [c for c in ranks if c.rank not in left]
        known = self.successors
        gone = [c for c in behind if known is not None and c.node is not None
                and (c.node.host, c.node.pid) not in known]  # fmt: skip
        unsure = [c for c in behind if known is None or c.node is None]
        parts = []
        if gone:
            names = _and([describe_rank(c.rank, c.node) for c in gone])
            parts.append(
                f"{names} neither left nor came back in version {self.version + 1}: "
                f"{'its node' if len(gone) == 1 else 'their nodes'} died or stopped"
            )
        if unsure:
            names = _and([describe_rank(c.rank, c.node) for c in unsure])
            parts.append(f"{names} had not left when it was torn down")
        return "; ".join(parts) or None

    def describe(self) -> str:
        """One line: why the version ended (first), then who left it on purpose."""
        parts = []
        ending = self.ending
        if ending is not None:
            culprits = _and(
                [describe_rank(c.rank, c.node, place=ending.by_place) for c in ending.culprits]
            )
            when = _clock(ending.by.at)
            by = ending.by.describe()
            parts.append(
                {
                    "keep_alive_missing": f"torn down{when} by {by}: the keep-alive of "
                    f"{culprits} expired",
                    "members_left": f"torn down{when} by {by} when {culprits} left to "
                    "rendezvous again",
                    "last_call_abandoned": f"torn down{when} by {by}: {culprits} held the last "
                    "call and never froze it",
                    "last_call_expired": f"expired{when}: {culprits} held the last call and "
                    f"stopped renewing it (seen by {by})",
                    "frozen_expired": f"expired{when} while frozen: {culprits} never confirmed "
                    f"(seen by {by})",
                }.get(ending.reason, f"ended{when} ({ending.reason}, by {by})")
            )
            behind = self._stayed_behind(ending.stayed)
            if behind:
                parts.append(behind)
        # Departures for one reason within a second read as one event.
        grouped: dict[tuple[str, int], list[Departure]] = {}
        told = (
            {c.rank for c in ending.culprits}
            if ending and ending.reason == "members_left"
            else set()
        )
        for departure in sorted(self.departures, key=lambda d: d.node.at or 0.0):
            if departure.rank in told:
                continue  # its leaving is what the ending says
            grouped.setdefault((departure.reason, int(departure.node.at or 0)), []).append(
                departure
            )
        for (reason, _), departed in grouped.items():
            names = _and([describe_rank(d.rank, d.node) for d in sorted(departed, key=_rank)])
            verb = "left" if reason != "stopped" else "stopped"
            why = " to rendezvous again" if reason == "rendezvous_again" else ""
            parts.append(f"{names} {verb}{_clock(departed[0].node.at)}{why}")
        if not parts:
            parts.append("ended without a record (it expired, or torch's nodes ended it)")
        return f"version {self.version}: " + "; ".join(parts)


# --- the diagnosis (pure) --------------------------------------------------------------------


def diagnose(
    layout: KeyLayout,
    state: RendezvousState | None,
    live_keep_alive_keys: Iterable[str],
    identities: Mapping[int, NodeIdentity],
    min_nodes: int | None = None,
    *,
    max_nodes: int | None = None,
    version_counter: int | None = None,
    departed: Mapping[int, Departure] | None = None,
) -> str:
    """One line in plain words: what the run is doing and what it waits for.

    `live_keep_alive_keys` are the `v_N/rank_R` keys that exist now; `identities` are the
    node identities read from them, by rank. `layout` says which ranks confirmed: the state
    lists them in torch's layout, their keep-alive keys are the confirmations under claims.
    """
    live = set(live_keep_alive_keys)
    if state is None:
        if version_counter:
            return (
                f"no rendezvous state: version {version_counter} expired or was torn down; "
                "the next node to join opens a new version"
            )
        return "no rendezvous state: nobody has joined yet"
    if state.status is Status.SETUP:
        return "setup: a node is opening a new version; joiners wait for it"
    if state.status is Status.CLOSED:
        return "closed: no node can join"
    n = state.world_size
    if state.status is Status.JOINABLE:
        bounds = _bounds(min_nodes, max_nodes)
        head = f"joinable with {_count(n, 'participant')} ({bounds})"
        if min_nodes is None:
            return f"{head}: waiting for more nodes, or for the last call to end"
        if n < min_nodes:
            return f"{head}: waiting for {_count(min_nodes - n, 'more node')}"
        return f"{head}: min reached, last call open for more nodes before it freezes"
    confirmed = layout.confirmed_ranks(state, live) or frozenset()
    if state.status is Status.FROZEN:
        unconfirmed = [rank for rank in state.participants if rank not in confirmed]
        if not unconfirmed:
            return f"frozen: all {n} ranks confirmed; the last one is making it final"
        seen = [identities[rank].describe() for rank in unconfirmed if rank in identities]
        where = f"; last seen on {_and(seen)}" if seen else "; no keep-alive key from them yet"
        verb = "has" if len(unconfirmed) == 1 else "have"
        return (
            f"frozen: {_ranks(unconfirmed)} {verb} not confirmed "
            f"({len(confirmed)} of {n} confirmed{where})"
        )
    # FINAL
    waiting = state.num_workers_waiting or 0
    missing = [r for r in (rank_of(k) for k in missing_keep_alives(state, live)) if r is not None]
    left = [rank for rank in missing if rank in (departed or {})]
    missing = [rank for rank in missing if rank not in left]
    if left and not missing:
        verb = "has" if len(left) == 1 else "have"
        return (
            f"final: {_ranks(left)} {verb} left to rendezvous again: the version ends as the "
            "other members follow"
        )
    if missing:
        if len(missing) == 1:
            whose = f"{_ranks(missing)}'s keep-alive is"
        else:
            whose = f"the keep-alives of {_ranks(missing)} are"
        tail = f"; {_count(waiting, 'node')} waiting" if waiting else ""
        return f"final: {whose} missing: the version will be torn down{tail}"
    if waiting:
        return (
            f"final with {_count(waiting, 'node')} waiting: members will re-rendezvous "
            f"({_count(n, 'member')} now)"
        )
    return f"final with {_count(n, 'participant')}: complete, every keep-alive is live"


def _bounds(min_nodes: int | None, max_nodes: int | None) -> str:
    low = f"min {min_nodes}" if min_nodes is not None else "min unknown"
    return f"{low}, max {max_nodes}" if max_nodes is not None else low


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _and(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _ranks(ranks: Sequence[int]) -> str:
    numbers = [str(rank) for rank in sorted(ranks)]
    return f"rank {numbers[0]}" if len(numbers) == 1 else f"ranks {_and(numbers)}"


# --- reading ---------------------------------------------------------------------------------


class UnknownRun(Exception):
    def __init__(self, message: str, revision: int | None) -> None:
        super().__init__(message)
        self.revision = revision


def read_snapshot(
    kv: KeyValue, run_id: str, prefix: str, key_layout: KeyLayoutName | None = None
) -> Snapshot:
    """Read the run's keys, as `key_layout` (default: the layout of the API `kv` speaks)
    gives them meaning. Raises UnknownRun, CorruptStateError, EtcdUnavailableError."""
    run_path = RendezvousConfig(run_id, parse_endpoints("localhost"), 1, 1, prefix=prefix).run_path
    rdzv = f"{run_path}/rdzv"
    revisions: list[int] = []
    state: RendezvousState | None = None
    state_key = f"{rdzv}/active_version"
    paths = RunPaths(run_path)
    layout = layout_of_client(kv, paths) if key_layout is None else layout_for(key_layout, paths)
    state_expires_in: float | None = None
    try:
        entry = kv.get(state_key)
        revisions.append(entry.read_revision)
        state = layout.with_participants(kv, RendezvousState.decode(entry.value, state_key))
        if layout.state_expires(state, declared_nodes(state)):
            state_expires_in = kv.time_left(entry)
    except KeyNotFound as absent:
        _note(revisions, absent.revision)
    version_counter: int | None = None
    try:
        counter = kv.get(f"{rdzv}/version_counter")
        revisions.append(counter.read_revision)
        version_counter = int(counter.value) if counter.value.strip().isdigit() else None
    except KeyNotFound as absent:
        _note(revisions, absent.revision)
    if state is None and version_counter is None:
        try:
            listing = kv.list(rdzv)
            revision_seen: int | None = listing.revision
            found = bool(listing.entries)
        except KeyNotFound as absent:
            revision_seen, found = absent.revision, False
        if not found:
            # v2 has no such directory; v3, having no directories, has no key below it.
            unknown = f"no rendezvous state for run {run_id!r} under {prefix}"
            raise UnknownRun(unknown, revision_seen)
        _note(revisions, revision_seen)
    ranks: tuple[RankView, ...] = ()
    waiting: tuple[NodeIdentity, ...] = ()
    if state is not None and state.version is not None:
        ranks, waiting, listed = _read_ranks(kv, layout, state)
        _note(revisions, listed)
    revision = min(revisions) if revisions else 0
    return Snapshot(
        run_id,
        prefix,
        run_path,
        layout,
        state,
        version_counter,
        ranks,
        revision,
        state_expires_in,
        _read_history(kv, paths, state, version_counter, ranks),
        time.time(),
        waiting if state is not None and state.status is Status.FINAL else (),
    )


def _read_history(
    kv: KeyValue,
    paths: RunPaths,
    state: RendezvousState | None,
    counter: int | None,
    ranks: Sequence[RankView] = (),
) -> tuple[VersionHistory, ...]:
    """The last versions before the active one (one listing each), newest first; the active
    one's `ranks` tell who of the version before came back."""
    successors = frozenset((r.identity.host, r.identity.pid) for r in ranks if r.identity)
    # Only a final version's members are all known: before, more may still join.
    complete = (
        state is not None
        and state.status is Status.FINAL
        and all(r.identity is not None for r in ranks)
    )
    if state is not None and state.version is not None:
        newest = state.version - 1
    elif counter is not None:
        newest = counter  # no active version: the counter's ended too
    else:
        return ()
    history = []
    for version in range(newest, max(0, newest - HISTORY_VERSIONS), -1):
        try:
            entries = kv.list(paths.version_dir(version)).entries
        except KeyNotFound:
            entries = ()
        left = departures(entries)
        ending = version_end(entries, paths, version)
        history.append(
            VersionHistory(
                version,
                ending,
                tuple(left[r] for r in sorted(left)),
                successors if version == newest and complete else None,
            )
        )
    return tuple(history)


def _read_ranks(
    kv: KeyValue, layout: KeyLayout, state: RendezvousState
) -> tuple[tuple[RankView, ...], tuple[NodeIdentity, ...], int | None]:
    """The version's ranks, and the nodes waiting for it to end, from one listing."""
    assert state.version is not None
    try:
        listing = kv.list(layout.paths.version_dir(state.version))
        entries: tuple[Entry, ...] = tuple(listing.entries)
        revision: int | None = listing.revision
    except KeyNotFound as absent:
        entries, revision = (), absent.revision
    views = layout.rank_views(state, entries, kv.time_left, layout.joined(kv, state))
    return views, waiting_nodes(entries), revision


def _note(revisions: list[int], revision: int | None) -> None:
    if revision is not None:
        revisions.append(revision)


# --- rendering -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    snapshot: Snapshot
    diagnosis: str
    min_nodes: int | None
    max_nodes: int | None
    state_since: datetime | None
    outlooks: tuple[Outlook, ...] = ()
    now: float = 0.0  # unix seconds the report describes

    def node_rows(self) -> list[NodeRow]:
        state = self.snapshot.state
        return (
            [] if state is None else [_node_row(state, view, self) for view in self.snapshot.ranks]
        )

    def missing_nodes(self) -> int:
        """Nodes the run still needs to reach min_nodes, none of which has arrived."""
        state = self.snapshot.state
        if state is None or state.status is not Status.JOINABLE or self.min_nodes is None:
            return 0
        return max(0, self.min_nodes - state.world_size)

    def to_json(self) -> dict[str, Any]:
        snap, state = self.snapshot, self.snapshot.state
        by = protocol.entered_by(state) if state else None
        return {
            "run_id": snap.run_id,
            "prefix": snap.prefix,
            "run_path": snap.run_path,
            "layout": snap.layout.name,
            "status": state.status.value if state else None,
            "version": state.version if state else None,
            "version_counter": snap.version_counter,
            "participants": list(state.participants) if state else [],
            "confirmed": sorted(r.rank for r in snap.ranks if r.confirmed),
            "nodes_waiting": (state.num_workers_waiting or 0) if state else 0,
            "nodes_missing": self.missing_nodes(),
            "waiting": [
                {"host": n.host, "addr": n.addr, "pid": n.pid, "since": n.at} for n in snap.waiting
            ],
            "min_nodes": self.min_nodes,
            "max_nodes": self.max_nodes,
            "state_since": self.state_since.isoformat() if self.state_since else None,
            "state_by": NodeIdentity.from_fields(by).describe() if by else None,
            "state_expires_in_seconds": snap.state_expires_in,
            "rank_policy": protocol.declared_rank_policy(state) if state else None,
            "previous_version": _previous_version(state),
            # While joinable under a rank policy, the "rank" of each entry is a join's place.
            "ranks_are_places": state is not None and ranked_by_place(state),
            "ranks": [
                {
                    "rank": r.rank,
                    "phase": row.phase,
                    "since": row.since,
                    "keep_alive_key": r.keep_alive_key,
                    "keep_alive": r.keep_alive,
                    "confirmed": r.confirmed,
                    "host": r.identity.host if r.identity else None,
                    "addr": r.identity.addr if r.identity else None,
                    "pid": r.identity.pid if r.identity else None,
                    "node_id": r.identity.node_id if r.identity else None,
                    "previous_rank": r.previous_rank,
                    "joined_at": r.joined_at,
                    "confirmed_at": r.confirmed_at,
                    "left": r.left.reason if r.left else None,
                    "keep_alive_age_seconds": r.keep_alive_age,
                    "keep_alive_expires_in_seconds": r.expires_in,
                }
                for r, row in zip(snap.ranks, self.node_rows(), strict=True)
            ],
            "next": [{"what": o.what, "at": o.at, "unless": o.unless} for o in self.outlooks],
            "history": [
                {
                    "version": h.version,
                    "ended": h.ending.reason if h.ending else None,
                    "culprits": [c.rank for c in h.ending.culprits] if h.ending else [],
                    "left": [d.rank for d in h.departures],
                    "text": h.describe(),
                }
                for h in snap.history
            ],
            "diagnosis": self.diagnosis,
            "revision": snap.revision,
        }

    def to_text(self) -> str:
        snap, state = self.snapshot, self.snapshot.state
        lines = [f"run {snap.run_id} at {snap.run_path}"]
        if state is None:
            lines.append(f"active version: none   version counter: {_dash(snap.version_counter)}")
        else:
            lines.append(
                f"active version: {_dash(state.version)}   state: {state.status.value}   "
                f"version counter: {_dash(snap.version_counter)}"
            )
            by = protocol.entered_by(state)
            author = f" by {NodeIdentity.from_fields(by).describe()}" if by else ""
            since = (
                f"{self.state_since.astimezone():%H:%M:%S} "
                f"({_age(self.state_since, self.now)} ago){author}"
                if self.state_since
                else "unknown (set by etcd-rdzv nodes only; --watch shows changes)"
            )
            if snap.state_expires_in is not None:
                since += f"; expires in {snap.state_expires_in:.0f} s unless rewritten"
            lines.append(f"state since: {since}")
            confirmed = sum(1 for r in snap.ranks if r.confirmed)
            confirmed_text = (
                f"{confirmed}/{state.world_size}" if state.keep_alives is not None else "-"
            )
            lines.append(
                f"participants: {state.world_size}   confirmed: {confirmed_text}   "
                f"nodes waiting: {state.num_workers_waiting or 0}   "
                f"{_bounds(self.min_nodes, self.max_nodes)}"
            )
            policy_line = _rank_policy_text(state)
            if policy_line:
                lines.append(policy_line)
        # Under a rank policy: who each node is, and the rank it held before.
        policy = state is not None and protocol.declared_rank_policy(state) != "join_order"
        places = state is not None and ranked_by_place(state)
        header = ("place" if places else "rank", "host", "pid", "phase", "since", "keep-alive")
        rows: list[tuple[str, ...]] = [(*header, "node id", "previous rank") if policy else header]
        for view, node in zip(snap.ranks, self.node_rows(), strict=True):
            ident = view.identity
            row: tuple[str, ...] = (
                str(view.rank),
                (ident.host or ident.addr or "-") if ident else "?",
                _dash(ident.pid) if ident else "-",
                node.phase,
                _clock(node.since, self.now).removeprefix(" at ") or "-",
                _keep_alive_text(view, state.status if state else None),
            )
            if policy:
                held = view.previous_rank
                previous = "-" if places else "none" if held is None else str(held)
                row = (*row, _dash(ident.node_id) if ident else "?", previous)
            rows.append(row)
        blank = ("-", "-") if policy else ()
        for waiter in snap.waiting:
            rows.append(
                (
                    "-",
                    waiter.host or waiter.addr or "?",
                    _dash(waiter.pid),
                    "waiting for the next version",
                    _clock(waiter.at, self.now).removeprefix(" at ") or "-",
                    "-",
                    *blank,
                )
            )
        missing = self.missing_nodes()
        if missing:
            rows.append(
                ("-", "?", "-", f"not arrived ({_count(missing, 'node')})", "-", "-", *blank)
            )
        if len(rows) > 1:
            widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
            for row in rows:
                lines.append(
                    "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                )
        lines.append(f"diagnosis: {self.diagnosis}")
        for outlook in self.outlooks:
            lines.append(f"next: {_outlook_text(outlook, self.now)}")
        if snap.history:
            lines.append("history:")
            lines.extend(f"  {h.describe()}" for h in snap.history)
        return "\n".join(lines)


@dataclass(frozen=True)
class NodeRow:
    phase: str
    since: float | None  # unix seconds the node entered that phase, when its keys tell


def _node_row(state: RendezvousState, view: RankView, shown: Report) -> NodeRow:
    """Where one rank's node is in the protocol, read from its keys."""
    if view.left is not None:
        return NodeRow(f"left ({view.left.reason.replace('_', ' ')})", view.left.node.at)
    status = state.status
    if status is Status.JOINABLE:
        holder = None if shown.min_nodes is None else shown.min_nodes - 1
        at_min = shown.min_nodes is not None and state.world_size >= shown.min_nodes
        phase = "last call" if view.rank == holder and at_min else "joined"
        return NodeRow(phase, view.joined_at)
    if status is Status.FROZEN:
        if view.confirmed:
            return NodeRow("confirmed", view.confirmed_at)
        return NodeRow("not confirmed", view.joined_at)
    if status is Status.FINAL:
        if not view.keep_alive:
            return NodeRow("lost (keep-alive gone)", None)
        return NodeRow("member, not renewing" if view.overdue else "member", view.confirmed_at)
    return NodeRow(status.value, None)


def _outlook_text(outlook: Outlook, now: float) -> str:
    """`at 10:12:36 (in 11 s): rank 1 (vm, pid 18671) freezes it with 2, unless ...`."""
    text = outlook.what
    if outlook.at is not None:
        text = _clock(outlook.at, now, future=True).removeprefix(" ") + ": " + text
    if outlook.unless:
        text += f", unless {outlook.unless}"
    return text


def _clock(at: float | None, now: float | None = None, *, future: bool = False) -> str:
    """` at 10:01:02 (in 9 s)`, or ` at 10:01:02 (3 s ago)`; empty without a time."""
    if at is None:
        return ""
    when = datetime.fromtimestamp(at, timezone.utc).astimezone()
    if now is None:
        return f" at {when:%H:%M:%S}"
    seconds = at - now
    if future and seconds >= 0:
        return f" at {when:%H:%M:%S} (in {_duration(seconds)})"
    return f" at {when:%H:%M:%S} ({_duration(-seconds)} ago)"


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def _previous_version(state: RendezvousState | None) -> int | None:
    decided = None if state is None else protocol.decided_ranks(state)
    return decided.previous_version if isinstance(decided, Assignment) else None


def _rank_policy_text(state: RendezvousState) -> str | None:
    """`rank policy: stable (previous ranks: version 7)`, for a policy other than join order."""
    spec = protocol.declared_rank_policy(state)
    if spec == "join_order":
        return None
    text = f"rank policy: {shown(spec)}"
    decided = protocol.decided_ranks(state)
    if isinstance(decided, Conflict):
        return f"{text}; it could not rank this version, every node of it fails: {decided.message}"
    if ranked_by_place(state):
        return f"{text}; ranks are decided when the version freezes (until then: places)"
    if isinstance(decided, Assignment):
        before = decided.previous_version
        return f"{text}; previous ranks from version {before}" if before else text
    return text


def report(
    snapshot: Snapshot,
    min_nodes: int | None,
    max_nodes: int | None,
    state_since: datetime | None = None,
    now: float | None = None,
) -> Report:
    now = snapshot.read_at if now is None else now
    live = [r.keep_alive_key for r in snapshot.ranks if r.keep_alive]
    identities = {r.rank: r.identity for r in snapshot.ranks if r.identity is not None}
    # The node that opened the version recorded its --nnodes; flags win (torch's backend
    # records none).
    state = snapshot.state
    declared = protocol.declared_nodes(state) if state else None
    if declared is not None:
        min_nodes = declared[0] if min_nodes is None else min_nodes
        max_nodes = declared[1] if max_nodes is None else max_nodes
    text = diagnose(
        snapshot.layout,
        state,
        live,
        identities,
        min_nodes,
        max_nodes=max_nodes,
        version_counter=snapshot.version_counter,
        departed={r.rank: r.left for r in snapshot.ranks if r.left is not None},
    )
    if state_since is None and state is not None:
        # Recorded in the state by the etcd-rdzv node that made the transition.
        entered = protocol.entered_at(state)
        if entered is not None:
            state_since = datetime.fromtimestamp(entered, timezone.utc)
    outlooks: tuple[Outlook, ...] = ()
    if state is not None:
        nodes = None if min_nodes is None or max_nodes is None else (min_nodes, max_nodes)
        reading = RunReading(
            state,
            snapshot.ranks,
            now,
            nodes,
            protocol.declared_timing(state),
            snapshot.layout.joins_by_claims,
            snapshot.state_expires_in,
        )
        outlooks = forecast(reading)
    return Report(snapshot, text, min_nodes, max_nodes, state_since, outlooks, now)


def _age(since: datetime, now: float) -> str:
    seconds = max(0.0, now - since.timestamp())
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _keep_alive_text(rank: RankView, status: Status | None) -> str:
    # Ranks publish keep-alives when they confirm, after the join window.
    if not rank.keep_alive:
        if rank.confirmed is None:
            return "-"
        return "none yet" if status is Status.FROZEN else "missing"
    text = "live"
    if rank.keep_alive_age is not None:
        text += f", renewed {rank.keep_alive_age:.0f}s ago"
    if rank.expires_in is not None:
        text += f", expires in {rank.expires_in:.0f}s"
    return text


# --- the command -----------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "status",
        help="show a run's rendezvous state in etcd, with a diagnosis",
        description="Show one run's rendezvous state in etcd (read-only) and what it waits for.",
        epilog="Exit codes: 0 shown; 2 bad arguments or corrupt state key; "
        "3 no keys for this run; 4 etcd unreachable or refused.",
    )
    parser.add_argument("--endpoint", required=True, help="HOST:PORT[,HOST:PORT...]")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"default {DEFAULT_PREFIX}")
    parser.add_argument("--min-nodes", type=int, help="the run's min nodes, to judge joinable")
    parser.add_argument("--max-nodes", type=int)
    parser.add_argument("--json", action="store_true", help="one JSON object per rendering")
    parser.add_argument(
        "--watch", action="store_true", help="re-render on every change until Ctrl-C"
    )
    parser.add_argument(
        "--watch-timeout", type=float, metavar="SECONDS", help="stop watching after SECONDS"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_REQUEST_TIMEOUT,
        metavar="SECONDS",
        help=f"per-request time limit (default {DEFAULT_REQUEST_TIMEOUT:g})",
    )
    parser.add_argument("--protocol", choices=("http", "https"), default="http")
    parser.add_argument(
        "--etcd-api",
        choices=("v3", "v2"),
        default=os.environ.get("ETCD_RDZV_ETCD_API", "v3"),
        help="the API the run's agents use (default v3, or $ETCD_RDZV_ETCD_API)",
    )
    parser.add_argument("--username", help="etcd user; its password from ETCD_RDZV_PASSWORD")
    parser.add_argument("--password-file", help="a file holding the etcd user's password")
    # Refused, never read: a password on the command line shows in `ps`, shell history and
    # CI logs. It exists so that `--password SECRET` gets that answer, not a guess.
    parser.add_argument("--password", action=_RefusePassword, help=argparse.SUPPRESS)
    parser.add_argument("--cacert")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.set_defaults(func=run)


class _RefusePassword(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        parser.error(
            "--password would show the password on the command line (ps, shell history, CI "
            "logs); it was not used. Set ETCD_RDZV_PASSWORD, or pass --password-file PATH."
        )


def run(args: argparse.Namespace) -> int:
    try:
        kv = _connect(args)
    except ConfigurationError as error:
        return _fail(str(error), EXIT_CONFIG)
    try:
        return _show(kv, args)
    except CorruptStateError as error:
        return _fail(str(error), EXIT_CONFIG)
    except UnknownRun as error:
        return _fail(f"{error}: check --run-id and --prefix", EXIT_UNKNOWN_RUN)
    except (EtcdUnavailableError, EtcdRejectedError) as error:
        return _fail(str(error), EXIT_ETCD)
    finally:
        kv.close()


def _connect(args: argparse.Namespace) -> KeyValue:
    from etcd_rdzv.kv import connect
    from etcd_rdzv.telemetry import NOOP_OBSERVER

    RendezvousConfig(args.run_id, parse_endpoints(args.endpoint), 1, 1)  # validates the run id
    for name in ("timeout", "watch_timeout"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ConfigurationError(f"--{name.replace('_', '-')} must be positive, got {value}.")
    files = {name: getattr(args, name) for name in ("cacert", "cert", "key")}
    args.prefix = normalize_prefix(args.prefix)
    config = RendezvousConfig(
        args.run_id,
        parse_endpoints(args.endpoint),
        1,
        1,
        protocol=args.protocol,
        tls=load_tls_files({k: v for k, v in files.items() if v}, args.protocol),
        etcd_api=parse_etcd_api(args.etcd_api),
        credentials=Credentials.from_settings(
            {
                k: v
                for k, v in (("username", args.username), ("password_file", args.password_file))
                if v
            },
            os.environ,
            SettingFlags("--username NAME", "--password-file PATH", "--password-file "),
        ),
        request_timeout=args.timeout,
    )
    return connect(config, NOOP_OBSERVER)


def _show(kv: KeyValue, args: argparse.Namespace) -> int:
    layout = KEY_LAYOUT_OF_API[parse_etcd_api(args.etcd_api)]
    snapshot = read_snapshot(kv, args.run_id, args.prefix, layout)
    shown = report(snapshot, args.min_nodes, args.max_nodes)
    # On a terminal the picture is redrawn in place every second, so that ages and countdowns
    # tick; into a pipe or a file only changes are written.
    redraw = not args.json and sys.stdout.isatty()
    _print(shown, args.json, redraw=redraw)
    if not args.watch:
        return EXIT_OK
    deadline = None if args.watch_timeout is None else time.monotonic() + args.watch_timeout
    since: datetime | None = None
    outage: float | None = None  # unix time etcd stopped answering
    try:
        while True:
            left = _WATCH_CHUNK_SECONDS if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return EXIT_OK
            chunk = _REDRAW_SECONDS if redraw else _WATCH_CHUNK_SECONDS
            previous = snapshot.state
            try:
                rdzv = f"{snapshot.run_path}/rdzv"
                kv.watch(rdzv, snapshot.revision, min(left, chunk), recursive=True)
                # A change, a timeout or lost history: read again either way, show only news.
                try:
                    snapshot = read_snapshot(kv, args.run_id, args.prefix, layout)
                except UnknownRun as gone:
                    snapshot = _emptied(snapshot, gone.revision)
            except EtcdUnavailableError as error:
                if outage is None:
                    outage = time.time()
                    _notice(_outage_text(str(error)), args.json, "etcd_unavailable")
                # Refused connections fail at once: do not spin on them.
                time.sleep(max(0.0, min(_REDRAW_SECONDS, left)))
                continue
            if outage is not None:
                back = f"etcd answers again ({_duration(time.time() - outage)} without answers)"
                _notice(back, args.json, "etcd_available")
                outage = None
            if _phase(snapshot.state) != _phase(previous):
                since = datetime.now(timezone.utc)
            current = report(snapshot, args.min_nodes, args.max_nodes, since)
            if redraw or _essence(current) != _essence(shown):
                _print(current, args.json, redraw=redraw)
                shown = current
    except KeyboardInterrupt:
        return EXIT_OK


def _rank(departure: Departure) -> int:
    return departure.rank


def _outage_text(error: str) -> str:
    return (
        f"etcd stopped answering: {error} The state shown above is as last "
        "read; retrying every second."
    )


def _notice(text: str, as_json: bool, event: str) -> None:
    if as_json:
        print(json.dumps({"event": event, "at": time.time(), "message": text}), flush=True)
    else:
        print(f"{datetime.now().astimezone():%H:%M:%S} {text}\n", flush=True)


def _emptied(previous: Snapshot, revision: int | None) -> Snapshot:
    """The run's keys were all deleted while watching: show that and keep watching."""
    return Snapshot(
        previous.run_id,
        previous.prefix,
        previous.run_path,
        previous.layout,
        None,
        None,
        (),
        max(previous.revision, revision or 0),
        read_at=time.time(),
    )


def _phase(state: RendezvousState | None) -> tuple[str, int | None] | None:
    return None if state is None else (state.status.value, state.version)


def _essence(shown: Report) -> dict[str, Any]:
    """What a change is made of: not the revision, nor ages that tick by themselves."""
    document = shown.to_json()
    document.pop("revision")
    document.pop("state_expires_in_seconds")
    for rank in document["ranks"]:
        rank.pop("keep_alive_age_seconds")
        rank.pop("keep_alive_expires_in_seconds")
    # What is predicted, not the countdowns in its words ("12 s late").
    document["next"] = [re.sub(r"\d", "", outlook["what"]) for outlook in document["next"]]
    return document


def _print(shown: Report, as_json: bool, *, redraw: bool = False) -> None:
    if as_json:
        print(json.dumps(shown.to_json(), sort_keys=True), flush=True)
    elif redraw:
        print(_CLEAR_SCREEN + shown.to_text(), flush=True)
    else:
        print(shown.to_text() + "\n", flush=True)


def _fail(message: str, code: int) -> int:
    print(f"etcd-rdzv status: error: {message}", file=sys.stderr)
    return code
