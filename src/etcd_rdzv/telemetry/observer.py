"""The seam between the rendezvous and telemetry.

The protocol calls these methods at each phase, retry, transition, lease refresh and etcd
request. This base class does nothing, so the protocol reads the same with telemetry off;
real observers override what they record. An observer must never raise into the protocol
or block it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Phase(str, enum.Enum):
    RENDEZVOUS = "rendezvous"  # one whole next_rendezvous() call
    SETUP = "setup"  # create or observe the state of the current version
    JOIN = "join"
    LAST_CALL = "last_call"  # only on the node that holds it
    FROZEN_WAIT = "frozen_wait"  # waiting for the joinable set to freeze
    CONFIRM = "confirm"
    FINAL_WAIT = "final_wait"  # waiting for every participant to confirm
    WAIT_NEXT_VERSION = "wait_next_version"  # an earlier version is final: wait to join the next


class PhaseScope:
    """What code inside a phase may add to it."""

    def annotate(self, **attributes: Any) -> None:
        """Attach attributes (version, rank, participants seen, ...)."""

    def event(self, name: str, **attributes: Any) -> None:
        """Record something that happened inside the phase (a state change seen, a retry)."""


_NOOP_SCOPE = PhaseScope()


class Observer:
    @contextmanager
    def phase(self, phase: Phase, **attributes: Any) -> Iterator[PhaseScope]:
        """Wraps one phase; an exception leaving it marks the phase failed."""
        yield _NOOP_SCOPE

    def retry(self, phase: Phase | None, reason: str, attempt: int) -> None:
        """A phase starts over (a lost compare-and-swap, a state that moved on, an etcd error).

        `phase` is None where the caller does not know it (the etcd transport).
        """

    def transition(
        self, version: int | None, before: str | None, after: str, participants: int
    ) -> None:
        """The state document went from `before` to `after` (seen or made by this node)."""

    def lease_refresh(self, kind: str, ok: bool, seconds: float) -> None:
        """A keep-alive refresh of a TTL key of `kind` (`run`, `rank`)."""

    def etcd_request(self, operation: str, result: str, seconds: float) -> None:
        """One request to etcd; `result` is `ok` or the error kind."""


NOOP_OBSERVER = Observer()
