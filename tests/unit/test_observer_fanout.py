"""FanOut: every observer sees every phase and call, in order; none's failure reaches the caller."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from etcd_rdzv.telemetry.observer import FanOut, Observer, Outcome, Phase, PhaseScope


class Recording(Observer):
    def __init__(self, name: str, log: list[str], fail: str = "") -> None:
        self.name, self.log, self.fail = name, log, fail

    @contextmanager
    def phase(self, phase: Phase, **attributes: Any) -> Iterator[PhaseScope]:
        if self.fail == "enter":
            raise RuntimeError("enter")
        self.log.append(f"{self.name} enter {phase.value}")
        scope = PhaseScope()
        try:
            yield scope
        except BaseException as error:
            self.log.append(f"{self.name} saw {type(error).__name__}")
            raise
        finally:
            self.log.append(f"{self.name} exit {scope.outcome}")
            if self.fail == "exit":
                raise RuntimeError("exit")

    def etcd_request(self, operation: str, result: str, seconds: float) -> None:
        self.log.append(f"{self.name} {operation}")
        if self.fail == "call":
            raise RuntimeError("call")


def test_phases_nest_and_unwind_innermost_first() -> None:
    log: list[str] = []
    observer = FanOut([Recording("a", log), Observer(), Recording("b", log)])
    with observer.phase(Phase.JOIN) as scope:
        scope.end(Outcome.RETRY)
    assert log == ["a enter join", "b enter join", "b exit Outcome.RETRY", "a exit Outcome.RETRY"]


def test_the_body_exception_passes_and_every_observer_sees_it() -> None:
    log: list[str] = []
    observer = FanOut([Recording("a", log), Recording("b", log)])
    with pytest.raises(KeyError), observer.phase(Phase.JOIN):
        raise KeyError("body")
    inner = ["b enter join", "b saw KeyError", "b exit None"]
    assert log == ["a enter join", *inner, "a saw KeyError", "a exit None"]


@pytest.mark.parametrize("fail", ["enter", "exit", "call"])
def test_an_observer_failing_is_logged_once_and_changes_nothing_else(
    fail: str, caplog: pytest.LogCaptureFixture
) -> None:
    log: list[str] = []
    observer = FanOut([Recording("bad", log, fail=fail), Recording("good", log)])
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            with observer.phase(Phase.CONFIRM):
                observer.etcd_request("put", "ok", 0.001)
        with pytest.raises(ValueError), observer.phase(Phase.CONFIRM):
            raise ValueError("the body's own")
    assert log.count("good enter confirm") == 3 and log.count("good put") == 2
    assert log.count("good exit None") == 3
    warnings = [r.getMessage() for r in caplog.records if "telemetry failed" in r.getMessage()]
    assert len(warnings) == 1, warnings


def test_a_method_set_on_the_instance_is_called() -> None:
    calls: list[int] = []
    plain = Observer()
    plain.closed_while_training = calls.append  # type: ignore[method-assign,assignment]
    FanOut([plain]).closed_while_training(7)
    assert calls == [7]
