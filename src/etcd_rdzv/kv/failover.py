"""The request loop both transports share: one preferred endpoint, failover, bounded retries.

A transport supplies the request and a classifier that says, for each error, whether it is a
passing failure (retry, maybe elsewhere) or an answer to raise. Only the transport knows its
client's errors; the loop, its metrics and its deadline are the same for every etcd API.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from etcd_rdzv.config import EtcdEndpoint
from etcd_rdzv.errors import EtcdUnavailableError
from etcd_rdzv.kv.advice import UNREACHABLE
from etcd_rdzv.kv.base import OutcomeUnknown
from etcd_rdzv.retry import TRANSIENT_BACKOFF, Deadline
from etcd_rdzv.telemetry import Observer

T = TypeVar("T")

Classifier = Callable[[Exception, str], tuple[str, Exception | None]]
"""(error, "etcd at HOST:PORT: OPERATION KEY") -> (outcome label, error to raise or None)."""


class WatchTimedOut(Exception):
    """A watch saw nothing before its timeout: not a failure, reported as `timeout`."""


class Failover:
    def __init__(
        self,
        endpoints: Sequence[EtcdEndpoint],
        request_timeout: float,
        observer: Observer,
        explain: Callable[[Exception], str | None] = lambda error: None,
    ) -> None:
        """`explain(error)`: what to tell the user when the passing failures never passed,
        from the last one (None: check that etcd runs and is reachable)."""
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = tuple(endpoints)
        self.request_timeout = request_timeout
        self._observer = observer
        self._explain = explain
        self._preferred = 0
        self._lock = threading.Lock()

    def describe(self) -> str:
        return ",".join(str(endpoint) for endpoint in self.endpoints)

    def call(
        self,
        operation: str,
        key: str,
        request: Callable[[int], T],
        classify: Classifier,
    ) -> T:
        """Run `request(endpoint_index)`, failing over and retrying what `classify` allows.

        A watch's request raises WatchTimedOut when it saw nothing; the call then returns None.
        """
        deadline = Deadline(self.request_timeout)
        outcome = "unavailable"
        last: Exception | None = None
        for attempt in range(TRANSIENT_BACKOFF.max_attempts):
            index = self._preferred
            started = time.monotonic()
            try:
                result = request(index)
                outcome = "ok"
                return result
            except WatchTimedOut:
                outcome = "timeout"
                return None  # type: ignore[return-value]
            except Exception as error:
                where = f"etcd at {self.endpoints[index]}: {operation} {key}"
                outcome, fatal = classify(error, where)
                last = error
                if fatal is not None:
                    if isinstance(fatal, OutcomeUnknown):
                        self._fail_over(index)
                    raise fatal from None
            finally:
                self._observer.etcd_request(operation, outcome, time.monotonic() - started)
            self._fail_over(index)
            if deadline.expired():
                break
            self._observer.retry(None, outcome, attempt + 1)
            TRANSIENT_BACKOFF.sleep(attempt, deadline)
        advice = (self._explain(last) if last is not None else None) or UNREACHABLE
        raise EtcdUnavailableError(
            f"etcd at {self.describe()} did not answer {operation} {key} within "
            f"{self.request_timeout:g}s (last: {outcome}). {advice}"
        )

    def _fail_over(self, failed_index: int) -> None:
        with self._lock:
            if self._preferred == failed_index:
                self._preferred = (failed_index + 1) % len(self.endpoints)
