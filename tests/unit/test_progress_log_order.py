"""A rendezvous' progress lines stop before its outcome is logged, never after it."""

from __future__ import annotations

import logging
import time

import pytest

from etcd_rdzv.errors import RendezvousTimeoutError
from etcd_rdzv.telemetry import Outcome, Phase
from etcd_rdzv.telemetry.logging import EVENT_LOGGER_NAME, LoggingObserver


class SlowAtTheLastWord(logging.Handler):
    """Records every line, and dawdles on the timeout line: a reporter still running then
    writes its progress lines after it, as a loaded machine makes it do now and then."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.lines.append(message)
        if "rendezvous_timeout" in message:
            time.sleep(0.05)


def test_no_progress_line_follows_the_timeout() -> None:
    handler = SlowAtTheLastWord()
    logger = logging.getLogger(EVENT_LOGGER_NAME)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    observer = LoggingObserver("run", "node", min_nodes=2, max_nodes=2, progress_interval=0.002)
    try:
        with pytest.raises(RendezvousTimeoutError), observer.phase(Phase.RENDEZVOUS) as outer:
            with observer.phase(Phase.FROZEN_WAIT, version=1):
                time.sleep(0.02)  # a few progress lines while it waits
            outer.end(Outcome.TIMEOUT)
            raise RendezvousTimeoutError("late")
        time.sleep(0.02)  # the reporter's next ticks, had it not stopped
    finally:
        observer.close()
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = handler.lines
    last_word = next(i for i, line in enumerate(lines) if "rendezvous_timeout" in line)
    assert any("rendezvous_waiting" in line for line in lines[:last_word]), lines
    assert not any("rendezvous_waiting" in line for line in lines[last_word:]), lines
