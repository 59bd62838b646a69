"""Structured log events of the rendezvous (structlog over the standard `logging`).

Every event carries `run_id` and `node`, and inside a span `trace_id` and `span_id`. Events
go to the `etcd_rdzv` logger, so the standard logging torchrun uses routes them. When the
application configured no handler, etcd-rdzv adds one to stderr: JSON lines, or readable
console output on a terminal. Either way each line is written once.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal, TextIO

import structlog
from opentelemetry import trace

from etcd_rdzv.telemetry.observer import Observer, Outcome, Phase, PhaseScope

LOGGER_NAME = "etcd_rdzv"
EVENT_LOGGER_NAME = "etcd_rdzv.events"
LogFormat = Literal["auto", "json", "console"]
# While etcd does not answer, torch's monitor loop asks every --monitor-interval (0.1 s by
# default): one warning when the outage starts, then one per this many seconds it lasts.
UNANSWERED_LOG_INTERVAL = 30.0
_HANDLER_MARK = "_etcd_rdzv_handler"


def configure_logging(log_format: LogFormat = "auto", level: str = "INFO") -> None:
    """Route the `etcd_rdzv` loggers; idempotent, and leaves an application's own setup alone."""
    package = logging.getLogger(LOGGER_NAME)
    package.setLevel(level)
    if any(getattr(handler, _HANDLER_MARK, False) for handler in package.handlers):
        return
    if logging.getLogger().handlers:
        return  # the application routes logs itself: ours propagate to its handlers
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    package.addHandler(_OwnHandler(sys.stderr, renderer))
    # Our own handler only: no second copy of each line through the root logger.
    package.propagate = False


class _OwnHandler(logging.StreamHandler[TextIO]):
    """The handler etcd-rdzv adds when the application configured none.

    It keeps its renderer, so that an event only it would write can skip the standard
    path's record and formatter (see `_EventLog`), for the very same line.
    """

    def __init__(self, stream: TextIO, renderer: Any) -> None:
        super().__init__(stream)
        self.renderer = renderer
        self.own_formatter = structlog.stdlib.ProcessorFormatter(
            processor=renderer,
            foreign_pre_chain=[*_shared_processors(), structlog.processors.format_exc_info],
        )
        self.setFormatter(self.own_formatter)
        setattr(self, _HANDLER_MARK, True)

    def write_event(self, logger: logging.Logger, level: int, event: dict[str, Any]) -> None:
        """What the standard path writes for `event`, built as `event_logger`'s processors
        build it: ProcessorFormatter renders a structlog record's dict with its renderer, and
        the formatted message is that rendering alone."""
        try:
            line = self.renderer(logger, event["level"], event)
            with self.lock:  # type: ignore[union-attr]  # set in Handler.__init__
                self.stream.write(line + self.terminator)
                self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(logger.makeRecord(logger.name, level, "", 0, event, (), None))


def _sole_handler(logger: logging.Logger, level: int) -> _OwnHandler | None:
    """Our handler, if a record of `logger` at `level` would reach it and nothing else: no
    other handler or filter, no record factory, nothing that could see the difference."""
    if logger.handlers or logger.filters or logger.disabled or not logger.propagate:
        return None
    package = logger.parent
    if package is None or package.filters or package.propagate or len(package.handlers) != 1:
        return None
    handler = package.handlers[0]
    if (
        type(handler) is not _OwnHandler
        or handler.filters
        or level < handler.level
        or handler.formatter is not handler.own_formatter
        or logging.getLogRecordFactory() is not logging.LogRecord
    ):
        return None
    return handler


def _shared_processors() -> list[Any]:
    return [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def _add_trace_ids(
    logger: Any, method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event["trace_id"] = trace.format_trace_id(context.trace_id)
        event["span_id"] = trace.format_span_id(context.span_id)
    return event


_STAMP = structlog.processors.TimeStamper(fmt="iso", utc=True)


class _EventLog:
    """This node's events, as `event_logger` logs them.

    When etcd-rdzv's own handler is the only one they reach (torchrun's agents, unless the
    application set up logging), the line is rendered and written here directly: the
    standard path's LogRecord, its copy in ProcessorFormatter and the handler chain were
    most of an event's cost. Anything else configured takes the standard path.
    """

    def __init__(self, run_id: str, node: str) -> None:
        self._bound = event_logger(run_id, node)
        self._context = {"run_id": run_id, "node": node}
        self._logger = logging.getLogger(EVENT_LOGGER_NAME)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(logging.INFO, "info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(logging.WARNING, "warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit(logging.ERROR, "error", event, fields)

    def _emit(self, level: int, method: str, event: str, fields: dict[str, Any]) -> None:
        logger = self._logger
        if not logger.isEnabledFor(level):
            return  # as structlog's filter_by_level drops it
        handler = _sole_handler(logger, level)
        if handler is None:
            getattr(self._bound, method)(event, **fields)
            return
        # `event_logger`'s processors, in their order (the keys' order in the line).
        line = {**self._context, **fields, "event": event, "level": method, "logger": logger.name}
        _add_trace_ids(logger, method, _STAMP(logger, method, line))
        handler.write_event(logger, level, line)


def event_logger(run_id: str, node: str) -> Any:
    """A structlog logger bound to this node and run, writing through `etcd_rdzv.events`."""
    return structlog.wrap_logger(
        logging.getLogger(EVENT_LOGGER_NAME),
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            _add_trace_ids,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
    ).bind(run_id=run_id, node=node)


class LoggingObserver(Observer):
    def __init__(
        self,
        run_id: str,
        node: str,
        *,
        min_nodes: int | None = None,
        max_nodes: int | None = None,
        progress_interval: float | None = None,
    ) -> None:
        self._log = _EventLog(run_id, node)
        self._unanswered_logged_at = float("-inf")
        self._progress = _Progress(self._log, min_nodes, max_nodes, progress_interval)

    @contextmanager
    def phase(self, phase: Phase, **attributes: Any) -> Iterator[PhaseScope]:
        scope = _LogScope(attributes)
        started = time.monotonic()
        if phase is Phase.LAST_CALL:
            self._log.info("last_call_started", **scope.fields)
        self._progress.enter(phase, scope)
        # Progress stops before the outcome is logged: no "waiting" line after the last word.
        try:
            yield scope
        except BaseException as error:
            self._progress.leave(phase)
            self._phase_failed(phase, scope.ended(failed=True), scope, error, started)
            raise
        self._progress.leave(phase)
        seconds = round(time.monotonic() - started, 6)
        if phase is Phase.JOIN:
            self._log.info("joined", seconds=seconds, **scope.fields)
        elif phase is Phase.LAST_CALL:
            self._log.info("last_call_ended", seconds=seconds, **scope.fields)
        elif phase is Phase.RENDEZVOUS:
            self._log.info("rendezvous_completed", seconds=seconds, **scope.fields)

    def retry(
        self, phase: Phase | None, reason: str, attempt: int, detail: str | None = None
    ) -> None:
        self._log.info(
            "retry",
            phase=phase.value if phase else None,
            reason=reason,
            attempt=attempt,
            detail=detail,
        )

    def transition(
        self, version: int | None, before: str | None, after: str, participants: int, made: bool
    ) -> None:
        fields = {"version": version, "participants": participants, "made": made}
        self._log.info("state_transition", from_state=before, to_state=after, **fields)
        if made and before == "setup" and after == "joinable":
            self._log.info("version_created", **fields)
        elif made and after == "closed":
            self._log.info("rendezvous_closed", **fields)

    def state_seen(self, version: int | None, status: str, participants: int) -> None:
        self._progress.participants = participants

    def close(self) -> None:
        self._progress.close()

    def lease_refresh(self, kind: str, ok: bool, seconds: float, error: str | None = None) -> None:
        if not ok:
            self._log.warning(
                "keep_alive_refresh_failed", kind=kind, seconds=round(seconds, 6), error=error
            )

    def keep_alive_stopped(self, kind: str, key: str, reason: str) -> None:
        self._log.warning("keep_alive_stopped", kind=kind, key=key, reason=reason)

    def version_torn_down(
        self, version: int, reason: str, ranks: Sequence[int], nodes: Sequence[str]
    ) -> None:
        # Members leaving to rendezvous again is the normal way a version ends.
        log = self._log.info if reason == "members_left" else self._log.warning
        log(
            "version_torn_down", version=version, reason=reason, ranks=list(ranks),
            nodes=list(nodes),
        )  # fmt: skip

    def lease_restored(self, kind: str, key: str) -> None:
        self._log.warning("keep_alive_restored", kind=kind, key=key)

    def etcd_unanswered(
        self, call: str, reason: str, detail: str, failures: int, outage_seconds: float
    ) -> None:
        now = time.monotonic()
        if failures > 1 and now - self._unanswered_logged_at < UNANSWERED_LOG_INTERVAL:
            return
        self._unanswered_logged_at = now
        self._log.warning(
            "etcd_unanswered_while_training",
            call=call,
            reason=reason,
            detail=detail,
            failures=failures,
            outage_seconds=round(outage_seconds, 3),
            answered_with="last known state: no node waiting, run not closed",
        )

    def etcd_answered_again(self, call: str, failures: int, outage_seconds: float) -> None:
        self._log.info(
            "etcd_answered_again",
            call=call,
            failures=failures,
            outage_seconds=round(outage_seconds, 3),
        )

    def run_left_open(self, version: int | None, reason: str, members: Sequence[str]) -> None:
        self._log.info("run_left_open", version=version, reason=reason, members=list(members))

    def closed_while_training(self, version: int) -> None:
        self._log.error(
            "run_closed_while_training",
            version=version,
            consequence="training goes on, but no node of the run can rendezvous again",
        )

    def _phase_failed(
        self,
        phase: Phase,
        outcome: Outcome,
        scope: _LogScope,
        error: BaseException,
        started: float,
    ) -> None:
        if phase is not Phase.RENDEZVOUS:
            return  # a phase ending early is a retry, logged as one
        event = {
            Outcome.TIMEOUT: "rendezvous_timeout",
            Outcome.CLOSED: "rendezvous_rejected_closed",
        }.get(outcome, "rendezvous_failed")
        self._log.error(
            event,
            seconds=round(time.monotonic() - started, 6),
            error=f"{type(error).__name__}: {error}",
            **scope.fields,
        )


class _Progress:
    """While a rendezvous lasts, a `rendezvous_waiting` event every `interval` seconds.

    A stuck agent's log then says where it waits and for whom, not only that it started.
    One thread for the observer's life, started with it: starting a thread per rendezvous
    put a thread start (and the wait for it to run) on every rendezvous' critical path. The
    thread is never woken by a rendezvous either (two thread switches per rendezvous): it
    looks by itself, once per interval while idle, so a rendezvous that began meanwhile is
    still reported on time, its first report being due one interval after it began.
    """

    def __init__(
        self, log: _EventLog, min_nodes: int | None, max_nodes: int | None, interval: float | None
    ) -> None:
        self._log = log
        self._needed = {"min_nodes": min_nodes, "max_nodes": max_nodes}
        self._interval = interval or None
        self._lock = threading.Lock()
        self._phases: list[tuple[Phase, _LogScope, float]] = []
        self._due: float | None = None  # the next report of the rendezvous under way
        self._closed = threading.Event()
        self.participants: int | None = None
        if self._interval is not None:
            threading.Thread(target=self._report, name="etcd-rdzv-progress", daemon=True).start()

    def enter(self, phase: Phase, scope: _LogScope) -> None:
        if self._interval is None:
            return  # nothing reads the phases
        now = time.monotonic()
        with self._lock:
            self._phases.append((phase, scope, now))
            if phase is Phase.RENDEZVOUS:
                self._due = now + self._interval

    def leave(self, phase: Phase) -> None:
        if self._interval is None:
            return
        with self._lock:
            self._phases = [entry for entry in self._phases if entry[0] is not phase]
            if phase is Phase.RENDEZVOUS:
                self._due = None

    def close(self) -> None:
        self._closed.set()

    def _report(self) -> None:
        assert self._interval is not None
        wait = self._interval
        while not self._closed.wait(wait):
            wait = self._report_if_due(self._interval)

    def _report_if_due(self, interval: float) -> float:
        """Report if the rendezvous under way is due; return how long to wait for the next."""
        # Under the lock: once `leave` took the phase away, no line about it follows.
        with self._lock:
            if self._due is None:
                return interval
            now = time.monotonic()
            if now < self._due:
                return self._due - now
            self._due = now + interval
            self._log_waiting(now)
            return interval

    def _log_waiting(self, now: float) -> None:
        if not self._phases:
            return
        _, _, began = self._phases[0]
        phase, scope, since = self._phases[-1]
        fields = dict(scope.fields)
        # The state read last, not the phase's start: joins since then count.
        fields["participants"] = self.participants
        self._log.info(
            "rendezvous_waiting",
            **{**fields, "phase": phase.value},
            **{k: v for k, v in self._needed.items() if v is not None},
            phase_seconds=round(now - since, 1),
            seconds=round(now - began, 1),
        )


class _LogScope(PhaseScope):
    def __init__(self, attributes: dict[str, Any]) -> None:
        self.fields = {k: v for k, v in attributes.items() if v is not None}

    def annotate(self, **attributes: Any) -> None:
        self.fields.update({k: v for k, v in attributes.items() if v is not None})
