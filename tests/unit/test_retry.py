"""The one retry policy: jittered, bounded, never past a deadline."""

from __future__ import annotations

import random

from etcd_rdzv.retry import Backoff, Deadline


def test_delays_are_jittered_within_an_exponential_ceiling() -> None:
    backoff = Backoff(initial=0.01, maximum=0.5)
    rng = random.Random(7)
    for attempt in range(12):
        ceiling = min(0.5, 0.01 * 2**attempt)
        delays = [backoff.delay(attempt, rng) for _ in range(200)]
        assert all(0 <= delay <= ceiling for delay in delays)
        assert len(set(delays)) > 150  # spread, so that losers of one race do not collide again


def test_huge_attempt_numbers_stay_at_the_maximum() -> None:
    assert Backoff(initial=0.01, maximum=0.5).delay(10_000, random.Random(1)) <= 0.5


def test_deadline_bounds_waits() -> None:
    now = [100.0]
    deadline = Deadline(5.0, clock=lambda: now[0])
    assert deadline.bound(10.0) == 5.0
    now[0] = 103.0
    assert deadline.remaining() == 2.0 and not deadline.expired()
    now[0] = 106.0
    assert deadline.remaining() == 0.0 and deadline.expired()
    assert deadline.bound(1.0) == 0.0
