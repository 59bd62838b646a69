"""The seam between the rendezvous and telemetry.

The protocol calls these methods at each phase, retry, transition, lease refresh and etcd
request. This base class does nothing, so the protocol reads the same with telemetry off;
real observers override what they record. `FanOut` combines several and guarantees what the
protocol relies on: no observer's failure ever reaches it.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

log = logging.getLogger(__name__)


class Phase(str, enum.Enum):
    RENDEZVOUS = "rendezvous"  # one whole next_rendezvous() call
    SETUP = "setup"  # create or observe the state of the current version
    JOIN = "join"
    LAST_CALL = "last_call"  # only on the node that holds it
    FROZEN_WAIT = "frozen_wait"  # waiting for the joinable set to freeze
    CONFIRM = "confirm"
    FINAL_WAIT = "final_wait"  # waiting for every participant to confirm
    WAIT_NEXT_VERSION = "wait_next_version"  # an earlier version is final: wait to join the next


class Outcome(str, enum.Enum):
    """How a phase ended, as the protocol says it: observers never guess it from an exception.

    A sub-phase ends `ok` or `retry` (the state moved on; the rendezvous starts over) or
    `error`; a whole rendezvous ends `ok`, `timeout`, `closed` or `error`.
    """

    OK = "ok"
    RETRY = "retry"
    TIMEOUT = "timeout"
    CLOSED = "closed"
    ERROR = "error"


class PhaseScope:
    """What code inside a phase may add to it."""

    # Set by `end`; a phase left without one ended `ok`, or `error` if an exception left it.
    outcome: Outcome | None = None

    def end(self, outcome: Outcome) -> None:
        """Say how the phase ends, just before leaving it (the protocol does, once)."""
        self.outcome = outcome

    def ended(self, failed: bool) -> Outcome:
        """The outcome said, or the one leaving without saying means."""
        if self.outcome is not None:
            return self.outcome
        return Outcome.ERROR if failed else Outcome.OK

    def annotate(self, **attributes: Any) -> None:
        """Attach attributes (version, rank, participants seen, ...)."""

    def event(self, name: str, **attributes: Any) -> None:
        """Record something that happened inside the phase (a state change seen, a retry)."""


class _NoopScope(PhaseScope):
    def end(self, outcome: Outcome) -> None:
        pass  # shared by every phase of the no-op observer: it keeps nothing


_NOOP_SCOPE = _NoopScope()


class Observer:
    # Whether this observer wants every node to share a per-version context (a trace):
    # only then does the protocol spend etcd requests publishing and reading one.
    shares_version_context: bool = False

    @contextmanager
    def phase(self, phase: Phase, **attributes: Any) -> Iterator[PhaseScope]:
        """Wraps one phase; an exception leaving it ends the phase (retry, timeout, error)."""
        yield _NOOP_SCOPE

    def retry(
        self, phase: Phase | None, reason: str, attempt: int, detail: str | None = None
    ) -> None:
        """A phase starts over (a lost compare-and-swap, a state that moved on, an etcd error).

        `reason` is a short fixed code, fit for a metric label; `detail` says it for people.
        `phase` is None where the caller does not know it (the etcd transport).
        """

    def transition(
        self, version: int | None, before: str | None, after: str, participants: int, made: bool
    ) -> None:
        """The state went from `before` to `after`: written by this node (`made`) or seen."""

    def state_seen(self, version: int | None, status: str, participants: int) -> None:
        """Every state this node read or wrote, changed or not (joins show here)."""

    def nodes_waiting(self, count: int) -> None:
        """The number of nodes waiting for this node's version to end, as last read."""

    def last_call_deadline(self, version: int, ends_at: float) -> None:
        """This node holds the last call of `version` (told inside its `LAST_CALL` phase):
        it ends at `ends_at`, Unix seconds by the rendezvous's wall clock (a simulation's is
        virtual), or sooner if the version fills up; the phase ends with it."""

    def lease_refresh(self, kind: str, ok: bool, seconds: float, error: str | None = None) -> None:
        """A keep-alive refresh of a TTL key of `kind` (`run`, `rank`); `error` says why one
        failed."""

    def keep_alive_stopped(self, kind: str, key: str, reason: str) -> None:
        """A refresher of `kind` stopped for good: its `key` is gone and its owner no longer
        holds what it stood for (`reason` `key_gone`)."""

    def version_torn_down(
        self, version: int, reason: str, ranks: Sequence[int], nodes: Sequence[str]
    ) -> None:
        """`version` failed, and this node is the one that says so (once per version): it
        deleted it (`reason` `keep_alive_missing`: members whose keep-alive keys expired, by
        rank; `members_left`: every missing member left on purpose to rendezvous again, so
        `ranks` are those and nobody failed; `last_call_abandoned`: the last-call holder, by
        rank, froze nothing in time), or it saw it expire first (`frozen_expired`: the ranks
        that never confirmed; `last_call_expired`: torch's layout, the holder that stopped
        renewing the joinable state). `nodes`
        names each rank's node ("host (pid N)") where the run's keys still tell, else
        "unknown"."""

    def etcd_request(self, operation: str, result: str, seconds: float) -> None:
        """One request to etcd; `result` is `ok` or the error kind."""

    def lease_restored(self, kind: str, key: str) -> None:
        """A keep-alive key of `kind` that expired while etcd did not answer was re-created
        by its live owner, in the version it still belongs to."""

    def etcd_unanswered(
        self, call: str, reason: str, detail: str, failures: int, outage_seconds: float
    ) -> None:
        """`call`, one of the handler's methods torch calls while training (`num_nodes_waiting`,
        `is_closed`, `shutdown`), found etcd not answering (`reason`: `unavailable`,
        `rejected`, `corrupt_state`) and answered from what this node last knew. `failures`
        counts such calls since etcd last answered, the first `outage_seconds` ago."""

    def etcd_answered_again(self, call: str, failures: int, outage_seconds: float) -> None:
        """etcd answered `call` after `failures` unanswered calls over `outage_seconds`."""

    def run_left_open(self, version: int | None, reason: str, members: Sequence[str]) -> None:
        """This node leaves the run without closing it: other `members` (keep-alive keys)
        still train in `version` (`reason` `members_training`), or etcd did not answer
        (`etcd_unanswered`)."""

    def closed_while_training(self, version: int) -> None:
        """The run was found closed while this node, a member of `version`, trains: the job
        goes on, but none of its nodes can rendezvous again after a failure."""

    def open_version(self, version: int) -> str | None:
        """This node creates `version`: return the context every node should share, or None."""
        return None

    def enter_version(self, version: int, context: str | None) -> None:
        """This node works on `version`, whose shared context (if any) is `context`."""

    def close(self) -> None:
        """Flush and release what the observer holds (exporters, servers)."""


NOOP_OBSERVER = Observer()


class FanOut(Observer):
    """Several observers behind one; each failure is logged once per method and swallowed."""

    def __init__(self, observers: Sequence[Observer]) -> None:
        self.observers = tuple(observers)
        self.shares_version_context = any(o.shares_version_context for o in self.observers)
        self._reported: set[str] = set()
        # Per method, the observers that do something on it: an agent's every etcd request
        # then calls the metrics alone, not three observers of which two do nothing.
        self._doing = {
            method: tuple(o for o in self.observers if _overrides(o, method)) for method in _METHODS
        }

    @contextmanager
    def phase(self, phase: Phase, **attributes: Any) -> Iterator[PhaseScope]:
        # By hand rather than an ExitStack of guarded managers: a few µs less per phase.
        entered: list[AbstractContextManager[PhaseScope]] = []
        scopes: list[PhaseScope] = []
        exc_info: tuple[Any, Any, Any] = (None, None, None)
        try:
            for observer in self._doing["phase"]:
                try:
                    manager = observer.phase(phase, **attributes)
                    scope = manager.__enter__()
                except Exception as error:
                    self._failed("phase", error)
                    continue
                entered.append(manager)
                if scope is not None:
                    scopes.append(scope)
            yield _FanOutScope(scopes, self._failed)
        except BaseException as error:
            exc_info = (type(error), error, error.__traceback__)
            raise
        finally:
            # Innermost first; the body's own exception always passes on.
            for left in reversed(entered):
                try:
                    left.__exit__(*exc_info)
                except Exception as error:
                    if error is not exc_info[1]:
                        self._failed("phase", error)

    def retry(
        self, phase: Phase | None, reason: str, attempt: int, detail: str | None = None
    ) -> None:
        self._each("retry", lambda o: o.retry(phase, reason, attempt, detail))

    def transition(
        self, version: int | None, before: str | None, after: str, participants: int, made: bool
    ) -> None:
        self._each("transition", lambda o: o.transition(version, before, after, participants, made))

    def state_seen(self, version: int | None, status: str, participants: int) -> None:
        self._each("state_seen", lambda o: o.state_seen(version, status, participants))

    def nodes_waiting(self, count: int) -> None:
        self._each("nodes_waiting", lambda o: o.nodes_waiting(count))

    def last_call_deadline(self, version: int, ends_at: float) -> None:
        self._each("last_call_deadline", lambda o: o.last_call_deadline(version, ends_at))

    def lease_refresh(self, kind: str, ok: bool, seconds: float, error: str | None = None) -> None:
        self._each("lease_refresh", lambda o: o.lease_refresh(kind, ok, seconds, error))

    def keep_alive_stopped(self, kind: str, key: str, reason: str) -> None:
        self._each("keep_alive_stopped", lambda o: o.keep_alive_stopped(kind, key, reason))

    def version_torn_down(
        self, version: int, reason: str, ranks: Sequence[int], nodes: Sequence[str]
    ) -> None:
        self._each(
            "version_torn_down", lambda o: o.version_torn_down(version, reason, ranks, nodes)
        )

    def etcd_request(self, operation: str, result: str, seconds: float) -> None:
        self._each("etcd_request", lambda o: o.etcd_request(operation, result, seconds))

    def lease_restored(self, kind: str, key: str) -> None:
        self._each("lease_restored", lambda o: o.lease_restored(kind, key))

    def etcd_unanswered(
        self, call: str, reason: str, detail: str, failures: int, outage_seconds: float
    ) -> None:
        self._each(
            "etcd_unanswered",
            lambda o: o.etcd_unanswered(call, reason, detail, failures, outage_seconds),
        )

    def etcd_answered_again(self, call: str, failures: int, outage_seconds: float) -> None:
        self._each(
            "etcd_answered_again", lambda o: o.etcd_answered_again(call, failures, outage_seconds)
        )

    def run_left_open(self, version: int | None, reason: str, members: Sequence[str]) -> None:
        self._each("run_left_open", lambda o: o.run_left_open(version, reason, members))

    def closed_while_training(self, version: int) -> None:
        self._each("closed_while_training", lambda o: o.closed_while_training(version))

    def open_version(self, version: int) -> str | None:
        shared = None
        for observer in self._doing["open_version"]:
            try:
                shared = observer.open_version(version) or shared
            except Exception as error:
                self._failed("open_version", error)
        return shared

    def enter_version(self, version: int, context: str | None) -> None:
        self._each("enter_version", lambda o: o.enter_version(version, context))

    def close(self) -> None:
        self._each("close", lambda o: o.close())

    def _each(self, method: str, call: Callable[[Observer], None]) -> None:
        for observer in self._doing[method]:
            try:
                call(observer)
            except Exception as error:
                self._failed(method, error)

    def _failed(self, method: str, error: BaseException) -> None:
        if method not in self._reported:
            self._reported.add(method)
            log.warning("etcd-rdzv telemetry failed in %s (ignored): %r", method, error)


_METHODS = tuple(
    name for name, value in vars(Observer).items() if not name.startswith("_") and callable(value)
)


def _overrides(observer: Observer, method: str) -> bool:
    """Whether `observer` does anything on `method`: the base class's methods do nothing."""
    if method in getattr(observer, "__dict__", ()):
        return True
    return getattr(type(observer), method) is not getattr(Observer, method)


class _FanOutScope(PhaseScope):
    def __init__(
        self, scopes: list[PhaseScope], failed: Callable[[str, BaseException], None]
    ) -> None:
        self._scopes = scopes
        self._failed = failed

    def end(self, outcome: Outcome) -> None:
        self.outcome = outcome
        for scope in self._scopes:
            try:
                scope.end(outcome)
            except Exception as error:
                self._failed("end", error)

    def annotate(self, **attributes: Any) -> None:
        for scope in self._scopes:
            try:
                scope.annotate(**attributes)
            except Exception as error:
                self._failed("annotate", error)

    def event(self, name: str, **attributes: Any) -> None:
        for scope in self._scopes:
            try:
                scope.event(name, **attributes)
            except Exception as error:
                self._failed("event", error)
