"""The one compare-and-swap loop: decide from the key's value, write if it is unchanged, and
on losing the race decide again from what won.

Every read-modify-write of etcd-rdzv goes through `swap`: the rendezvous state (join,
last call, freeze, confirm, complete, announce waiting, close), the version counter and the
c10d store's `add` and `compare_set`. The caller's `decide` sees the key's current entry
(None when absent) and returns `Put` (write this), `Delete` (delete it) or `Keep` (no write:
return this result).
A lost race is reported (`on_lost`) and decided again: at once from the refusal's entry when
it carries one (v3), else after a `CAS_BACKOFF` pause from a fresh read (v2): reading before
the pause would decide on a state the other racers are still changing, and lose again. The
loop ends after the backoff's attempts with `SwapExhausted`, or when `deadline` passes.

An answer lost in transit (`OutcomeUnknown`) is raised by default: writing again could apply
a second time (take two ranks). A caller whose decision recognizes its own applied write
(a confirmation already listed) passes `retry_unknown=True`, and the loop re-reads instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from etcd_rdzv.kv import AlreadyExists, CompareFailed, Entry, KeyNotFound, KeyValue, KvError
from etcd_rdzv.kv.base import OutcomeUnknown
from etcd_rdzv.retry import CAS_BACKOFF, Backoff, Deadline
from etcd_rdzv.runtime import SYSTEM, Runtime

T = TypeVar("T")


@dataclass(frozen=True)
class Put(Generic[T]):
    """Write `value` (with `ttl`; None: no TTL), then return `result`."""

    value: str
    result: T
    ttl: float | None = None


@dataclass(frozen=True)
class Keep(Generic[T]):
    """No write: return `result`."""

    result: T


@dataclass(frozen=True)
class Delete(Generic[T]):
    """Delete the key as read, then return `result`."""

    result: T


class SwapExhausted(KvError):
    """Every attempt lost its race: the key kept changing."""

    def __init__(self, key: str, attempts: int) -> None:
        super().__init__(f"{key} changed under {attempts} compare-and-swaps in a row")
        self.key = key


_UNREAD = object()


def swap(
    kv: KeyValue,
    key: str,
    decide: Callable[[Entry | None], Put[T] | Keep[T] | Delete[T]],
    *,
    current: Entry | object | None = _UNREAD,
    deadline: Deadline | None = None,
    on_lost: Callable[[int, str], None] = lambda attempt, reason: None,
    retry_unknown: bool = False,
    backoff: Backoff = CAS_BACKOFF,
    runtime: Runtime = SYSTEM,
) -> tuple[T, Entry | None]:
    """Decide and write until a write applies or a decision keeps; returns the decision's
    result and the key's entry after it (None: absent and kept absent).

    `current` is the entry the caller already read (None: known absent); without it, read.
    `on_lost(attempt, reason)` hears each lost race (`compare_failed`, `outcome_unknown`).
    """
    entry: Entry | None = _read(kv, key) if current is _UNREAD else current  # type: ignore[assignment]
    attempt = 0
    while attempt < backoff.max_attempts:
        attempt += 1
        decision = decide(entry)
        if isinstance(decision, Keep) or (isinstance(decision, Delete) and entry is None):
            return decision.result, entry
        try:
            if isinstance(decision, Delete):
                assert entry is not None
                kv.compare_and_delete(key, entry)
                return decision.result, None
            if entry is None:
                written = kv.create(key, decision.value, ttl=decision.ttl)
            else:
                written = kv.compare_and_swap(key, decision.value, entry, ttl=decision.ttl)
            return decision.result, written
        except (CompareFailed, AlreadyExists) as refusal:
            on_lost(attempt, "compare_failed")
            told = refusal.current
        except KeyNotFound:
            on_lost(attempt, "compare_failed")  # deleted meanwhile: decide on its absence
            told, entry = None, None
            if deadline is not None and deadline.expired():
                break
            continue
        except OutcomeUnknown:
            if not retry_unknown:
                raise
            on_lost(attempt, "outcome_unknown")
            told = None
        if deadline is not None and deadline.expired():
            break
        if told is not None:
            # The refusal says what won (v3): decide on it at once, it is the latest write.
            entry = told
            continue
        # Not told: back off while the winners' writes land, then read what they left.
        backoff.sleep(attempt - 1, deadline, runtime)
        entry = _read(kv, key)
    raise SwapExhausted(key, attempt)


def _read(kv: KeyValue, key: str) -> Entry | None:
    try:
        return kv.get(key)
    except KeyNotFound:
        return None
