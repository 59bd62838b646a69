"""Time, sleep, randomness and background threads, as the protocol uses them.

The protocol never calls `time`, `random` or `threading` for these itself: it asks a `Runtime`.
In production that is the system's (`SYSTEM`). The simulator (tests/simulation) gives each
node one on a virtual clock, where every sleep and background thread is a step its seeded
scheduler interleaves: the same code runs in both.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Protocol


class Background(Protocol):
    """A started background task (a thread, or a simulated one)."""

    def join(self, timeout: float | None = None) -> None: ...

    def is_alive(self) -> bool: ...


class Runtime:
    """The system's clocks, sleep, randomness and threads."""

    def __init__(self, rng: random.Random | None = None) -> None:
        # The module's generator unless told: full jitter needs no reproducible sequence.
        self.random: random.Random = rng or random._inst

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        """Wall-clock seconds since the epoch: the stamps written into state documents."""
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def wait(self, event: threading.Event, seconds: float) -> bool:
        """Until `event` is set or `seconds` pass; whether it is set."""
        return event.wait(seconds)

    def start(self, target: Callable[[], None], name: str) -> Background:
        """Run `target` in the background (a daemon thread)."""
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        return thread


SYSTEM = Runtime()
