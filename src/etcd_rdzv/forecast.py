"""What happens next to a run's rendezvous, and when: pure, from one reading of its keys.

`etcd-rdzv status` reads the run (the key layout says what the keys mean), then asks this
module what the nodes will do, by the same rules they follow (`decisions`, `protocol`):
when the last call ends and with how many, when a node times out, when a frozen state or a
keep-alive key expires and who is then left out. Each prediction is an `Outlook`: what
happens, at what unix time (None: as soon as a node acts), and what would prevent it.

The times come from what the nodes of ours write anyway: the opener's time limits in the
state (`protocol.declared_timing`), the time of each join claim and keep-alive key
(`NodeIdentity.at`), when the last call began (`protocol.last_call_since`, torch's layout)
and what TTL a key has left. Where one is missing (a torch node wrote the state), the
outlook says what happens without a time rather than guess one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from etcd_rdzv import decisions, protocol
from etcd_rdzv.layouts import RankView, describe_rank, ranked_by_place
from etcd_rdzv.protocol import RendezvousState, Status, Timing

# A last call is overdue once its end is this far behind: its holder froze nothing in time.
_LAST_CALL_GRACE_SECONDS = 1.0


@dataclass(frozen=True)
class Outlook:
    what: str
    at: float | None = None  # unix seconds; None: as soon as a node acts on it
    unless: str | None = None


@dataclass(frozen=True)
class RunReading:
    """What a reader knows of a run at `now` (unix seconds)."""

    state: RendezvousState
    ranks: Sequence[RankView]
    now: float
    nodes: tuple[int, int] | None  # (min, max)
    timing: Timing | None
    joins_by_claims: bool
    state_expires_in: float | None = None  # seconds the state key has left; None: no TTL

    def rank(self, rank: int) -> RankView | None:
        return next((view for view in self.ranks if view.rank == rank), None)

    @property
    def places(self) -> bool:
        """Whether the numbers are join claims' places: nobody has a rank yet."""
        return ranked_by_place(self.state)


def forecast(reading: RunReading) -> tuple[Outlook, ...]:
    status = reading.state.status
    if status is Status.SETUP:
        return _setup(reading)
    if status is Status.JOINABLE:
        return _joinable(reading)
    if status is Status.FROZEN:
        return _frozen(reading)
    if status is Status.FINAL:
        return _final(reading)
    return ()  # closed: nothing happens any more


def who(view: RankView | None, rank: int, *, place: bool = False) -> str:
    """`rank 1 (vm-b, pid 18405)`, as far as the keys name its node; `place 1 (...)` where
    the number is a join claim's place (a joinable version under a rank policy)."""
    return describe_rank(
        rank, None if view is None else view.identity, place=place or bool(view and view.place)
    )


def _setup(reading: RunReading) -> tuple[Outlook, ...]:
    if reading.state_expires_in is None:
        return ()
    return (
        Outlook(
            "the placeholder expires and the next node to look opens the version",
            at=reading.now + reading.state_expires_in,
            unless="the node that wrote it opens the version first (it normally does at once)",
        ),
    )


def _joinable(reading: RunReading) -> tuple[Outlook, ...]:
    if reading.nodes is None:
        return ()
    min_nodes, max_nodes = reading.nodes
    joined = reading.state.world_size
    if joined < min_nodes:
        return (_first_timeout(reading, min_nodes - joined),)
    holder = min_nodes - 1
    since = _last_call_began(reading, holder)
    timing = reading.timing
    if since is None or timing is None:
        holding = who(reading.rank(holder), holder, place=reading.places)
        return (Outlook(f"{holding} freezes it when its last call ends"),)
    ends = since + timing.last_call_timeout
    counted = decisions.last_call_counted(joined, max_nodes)
    if reading.now <= ends + _LAST_CALL_GRACE_SECONDS:
        more = max_nodes - joined
        unless = (
            "1 more node joins first (then it freezes at once with it)"
            if more == 1
            else f"more nodes join first (each one counts; with {max_nodes} it freezes at once)"
        )
        return (
            Outlook(
                f"{who(reading.rank(holder), holder, place=reading.places)} freezes it with "
                f"{counted}",
                at=ends,
                unless=unless,
            ),
        )
    return _last_call_overdue(reading, holder, ends)


def _last_call_began(reading: RunReading, holder: int) -> float | None:
    if reading.joins_by_claims:
        view = reading.rank(holder)
        return view.joined_at if view is not None else None
    return protocol.last_call_since(reading.state)


def _last_call_overdue(reading: RunReading, holder: int, ends: float) -> tuple[Outlook, ...]:
    """The holder froze nothing in time: it died or is stalled."""
    late = reading.now - ends
    holding = who(reading.rank(holder), holder, place=reading.places)
    blame = f"{holding} held the last call and is {late:.0f} s late"
    unless = f"{'place' if reading.places else 'rank'} {holder} freezes it first"
    if not reading.joins_by_claims:
        if reading.state_expires_in is None:
            return (Outlook(f"{blame}; nothing frees the run until it freezes"),)
        return (
            Outlook(
                f"the joinable state expires and every node starts over ({blame})",
                at=reading.now + reading.state_expires_in,
                unless=unless,
            ),
        )
    timing = reading.timing
    assert timing is not None and reading.nodes is not None
    backups = []
    for view in reading.ranks:
        after = decisions.abandoned_after(
            view.rank, reading.nodes[0], timing.last_call_timeout, timing.joinable_ttl
        )
        if after is not None and view.joined_at is not None:
            backups.append((view.joined_at + after, view))
    if not backups:
        # Nobody joined after the holder, so nobody backs it up: each node times out.
        return (Outlook(f"{blame}; no node joined after it to tear the version down"),)
    at, first = min(backups, key=lambda pair: pair[0])
    return (
        Outlook(
            f"{who(first, first.rank, place=reading.places)} tears the version down and every "
            f"node starts over ({blame})",
            at=at,
            unless=unless,
        ),
    )


def _first_timeout(reading: RunReading, short: int) -> Outlook:
    """Below min_nodes: the first node to join gives up first."""
    first = reading.rank(0)
    began = first.joined_at if first is not None and first.joined_at is not None else None
    began = began if began is not None else protocol.entered_at(reading.state)
    unless = f"{_count(short, 'more node')} {'joins' if short == 1 else 'join'}"
    if began is None or reading.timing is None:
        return Outlook("the nodes that joined time out", unless=unless)
    return Outlook(
        f"{who(first, 0, place=reading.places)} times out (timeout {reading.timing.timeout:g} s) "
        "and its agent fails",
        at=began + reading.timing.timeout,
        unless=unless,
    )


def _frozen(reading: RunReading) -> tuple[Outlook, ...]:
    unconfirmed = [view for view in reading.ranks if view.confirmed is False]
    if not unconfirmed:
        return (Outlook("goes final: every rank confirmed, the last one is writing it"),)
    names = _and([who(view, view.rank) for view in unconfirmed])
    at = None if reading.state_expires_in is None else reading.now + reading.state_expires_in
    return (
        Outlook(
            f"the frozen state expires and every node starts over without {names}",
            at=at,
            unless=f"{'it confirms' if len(unconfirmed) == 1 else 'they confirm'} first",
        ),
    )


def _final(reading: RunReading) -> tuple[Outlook, ...]:
    outlooks = []
    left = [view for view in reading.ranks if not view.keep_alive and view.left is not None]
    lost = [view for view in reading.ranks if not view.keep_alive and view.left is None]
    if lost:
        names = _and([who(view, view.rank) for view in lost])
        outlooks.append(
            Outlook(
                f"its members rendezvous again without {names} once their workers fail "
                "without it (torchrun then restarts them), and the first of them to start "
                "tears this version down"
            )
        )
    elif left:
        names = _and([who(view, view.rank) for view in left])
        outlooks.append(
            Outlook(
                f"{names} left to rendezvous again: the other members follow as soon as "
                "their agents next check, and a new version opens"
            )
        )
    for view in reading.ranks:
        if view.keep_alive and view.overdue and view.expires_in is not None:
            assert view.identity is not None and view.identity.ttl is not None
            outlooks.append(
                Outlook(
                    f"{who(view, view.rank)}'s keep-alive expires: its members rendezvous "
                    "again without it once their workers fail without it",
                    at=reading.now + view.expires_in,
                    unless=f"its node renews it (last renewed {view.keep_alive_age:.0f} s ago; "
                    f"it renews every {view.identity.ttl / 3:.1f} s)",
                )
            )
    waiting = reading.state.num_workers_waiting or 0
    if waiting and not (left or lost):
        outlooks.append(
            Outlook(
                f"the members rendezvous again to admit {_count(waiting, 'waiting node')}, as "
                "soon as their agents next check"
            )
        )
    return tuple(outlooks)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _and(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]
