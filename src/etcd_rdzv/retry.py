"""The one retry policy: bounded attempts and deadline, exponential backoff with full jitter."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from etcd_rdzv.runtime import SYSTEM, Runtime

T = TypeVar("T")


class Deadline:
    """A point in monotonic time that operations must not outlive."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.seconds = seconds
        self.at = clock() + seconds

    def remaining(self) -> float:
        return max(0.0, self.at - self._clock())

    def expired(self) -> bool:
        return self._clock() >= self.at

    def bound(self, seconds: float) -> float:
        """`seconds`, cut so that a wait ends no later than the deadline."""
        return min(seconds, self.remaining())


@dataclass(frozen=True)
class Backoff:
    """Delays between attempts: the n-th is uniform in [0, min(maximum, initial * 2**n)].

    Full jitter spreads nodes that lost the same compare-and-swap, so they do not collide again.
    """

    initial: float = 0.002
    maximum: float = 0.25
    max_attempts: int = 1000

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        ceiling = min(self.maximum, self.initial * 2 ** min(attempt, 30))
        return (rng or random).uniform(0.0, ceiling)

    def sleep(
        self, attempt: int, deadline: Deadline | None = None, runtime: Runtime = SYSTEM
    ) -> float:
        """Sleep before retry number `attempt` (0-based), never past `deadline`."""
        delay = self.delay(attempt, runtime.random)
        if deadline is not None:
            delay = deadline.bound(delay)
        runtime.sleep(delay)
        return delay


CAS_BACKOFF = Backoff(initial=0.002, maximum=0.1)
"""After a lost compare-and-swap on the rendezvous state: the winner's write is already there."""

TRANSIENT_BACKOFF = Backoff(initial=0.05, maximum=1.0, max_attempts=20)
"""After an etcd request failed for a passing reason (leader election, a dropped connection)."""


def retry_while_failing(
    call: Callable[[], T],
    transient: tuple[type[BaseException], ...],
    deadline: Deadline,
    backoff: Backoff = TRANSIENT_BACKOFF,
    on_retry: Callable[[int, BaseException], None] | None = None,
    *,
    runtime: Runtime = SYSTEM,
) -> T:
    """`call()`, tried again after each `transient` failure until `deadline`; the last
    failure is raised once the deadline has passed.

    For callers whose own deadline is longer than one etcd request's (a store operation, a
    rendezvous): an etcd outage then costs them time, not their result.
    """
    attempt = 0
    while True:
        try:
            return call()
        except transient as error:
            if deadline.expired():
                raise
            attempt += 1
            if on_retry is not None:
                on_retry(attempt, error)
            backoff.sleep(min(attempt, 8), deadline, runtime)
