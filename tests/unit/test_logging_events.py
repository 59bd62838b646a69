"""An event written straight by etcd-rdzv's own handler is the line the standard path writes."""

from __future__ import annotations

import datetime
import io
import json
import logging
import re
import time
import types
from collections.abc import Iterator

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider

from etcd_rdzv.telemetry.logging import (
    EVENT_LOGGER_NAME,
    LOGGER_NAME,
    LoggingObserver,
    _OwnHandler,
)
from etcd_rdzv.telemetry.observer import FanOut, Outcome, Phase
from etcd_rdzv.telemetry.tracing import TracingObserver


class FrozenDatetime(datetime.datetime):
    @classmethod
    def now(cls, tz: datetime.tzinfo | None = None) -> FrozenDatetime:
        return cls(2026, 1, 2, 3, 4, 5, 678901, tzinfo=tz)


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    # structlog's TimeStamper reads the module's `datetime` at each call.
    fake = types.SimpleNamespace(datetime=FrozenDatetime, timezone=datetime.timezone)
    monkeypatch.setattr(structlog.processors, "datetime", fake)
    monkeypatch.setattr(time, "monotonic", lambda: 100.0)  # the phases' `seconds`


@pytest.fixture
def own_handler() -> Iterator[io.StringIO]:
    """etcd-rdzv's handler as `configure_logging` installs it, on a stream of our own."""
    package = logging.getLogger(LOGGER_NAME)
    saved = package.handlers[:], package.propagate, package.level
    stream = io.StringIO()
    package.handlers[:] = []
    package.propagate = False
    package.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        package.handlers[:], package.propagate = saved[0], saved[1]
        package.setLevel(saved[2])


def some_events(observer: FanOut) -> None:
    with observer.phase(Phase.RENDEZVOUS) as outer:
        with observer.phase(Phase.JOIN, version=3) as scope:
            observer.transition(3, "joinable", "frozen", 2, True)
            observer.retry(Phase.JOIN, "compare_failed", 2, "lost the race")
            scope.annotate(rank=1, participants=2, ratio=0.5, note=None)
        observer.version_torn_down(2, "keep_alive_missing", [0, 1], ["a (pid 1)", "b (pid 2)"])
        outer.annotate(version=3, rank=1, world_size=2)
    observer.lease_refresh("rank", False, 0.25, "etcd did not answer")
    observer.closed_while_training(3)
    with pytest.raises(TimeoutError), observer.phase(Phase.RENDEZVOUS) as outer:
        outer.end(Outcome.TIMEOUT)
        raise TimeoutError("late")


def lines_written(stream: io.StringIO, renderer: object, *, direct: bool) -> list[str]:
    handler = _OwnHandler(stream, renderer)
    if not direct:
        # Anything else configured takes the standard path: here a filter that keeps all.
        handler.addFilter(lambda record: True)
    package = logging.getLogger(LOGGER_NAME)
    package.addHandler(handler)
    provider = TracerProvider()
    tracing = TracingObserver(
        provider.get_tracer("t"), run_id="run", min_nodes=2, max_nodes=2, node="n:1"
    )
    start = len(stream.getvalue())
    try:
        some_events(FanOut([tracing, LoggingObserver("run", "n:1", min_nodes=2, max_nodes=2)]))
    finally:
        package.removeHandler(handler)
    return stream.getvalue()[start:].splitlines()


@pytest.mark.usefixtures("frozen_clock")
@pytest.mark.parametrize("renderer_name", ["json", "console"])
def test_the_direct_line_is_the_standard_one(own_handler: io.StringIO, renderer_name: str) -> None:
    renderer = (
        structlog.processors.JSONRenderer()
        if renderer_name == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    direct = lines_written(own_handler, renderer, direct=True)
    standard = lines_written(own_handler, renderer, direct=False)
    assert len(direct) >= 8
    # Each run has its own trace and span ids; all the rest is the same, byte for byte.
    assert [without_ids(line) for line in direct] == [without_ids(line) for line in standard]
    assert sum("trace_id" in line for line in direct) >= 6
    if renderer_name == "json":
        events = [json.loads(line) for line in direct]
        assert {event["level"] for event in events} == {"info", "warning", "error"}
        assert all(event["timestamp"] == "2026-01-02T03:04:05.678901Z" for event in events)


def without_ids(line: str) -> str:
    return re.sub(r"\b[0-9a-f]{32}\b|\b[0-9a-f]{16}\b", "<id>", line)


def test_an_event_below_the_level_is_written_by_neither_path(own_handler: io.StringIO) -> None:
    logging.getLogger(LOGGER_NAME).setLevel(logging.WARNING)
    lines = lines_written(own_handler, structlog.processors.JSONRenderer(), direct=True)
    assert [json.loads(line)["level"] for line in lines] == ["warning", "warning", "error", "error"]


def test_a_handler_on_the_event_logger_sees_every_event(own_handler: io.StringIO) -> None:
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    events = logging.getLogger(EVENT_LOGGER_NAME)
    keep = Keep()
    events.addHandler(keep)
    try:
        lines = lines_written(own_handler, structlog.processors.JSONRenderer(), direct=True)
    finally:
        events.removeHandler(keep)
    assert len(seen) == len(lines) >= 8
    assert isinstance(seen[0].msg, dict) and seen[0].msg["event"] == "state_transition"
