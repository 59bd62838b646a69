"""The one bounded poll the tests use where no watch or answer can be awaited instead."""

from __future__ import annotations

import time
from collections.abc import Callable

POLL_SECONDS = 0.05


def wait_until(condition: str, check: Callable[[], object], timeout: float) -> float:
    """Poll `check()` (an etcd read, a participant's answer) until truthy; the seconds it took.

    Fails naming `condition` once `timeout` passes.
    """
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(POLL_SECONDS)
    raise AssertionError(f"not within {timeout}s: {condition}")
