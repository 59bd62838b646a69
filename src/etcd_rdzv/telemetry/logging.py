"""Structured log events of the rendezvous (structlog over the standard `logging`).

Every event carries `run_id` and `node`, and inside a span `trace_id` and `span_id`. Events
go to the `etcd_rdzv` logger, so the standard logging torchrun uses routes them. When the
application configured no handler, etcd-rdzv adds one to stderr: JSON lines, or readable
console output on a terminal. Either way each line is written once.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any, Literal

import structlog
from opentelemetry import trace

from etcd_rdzv.telemetry.observer import Observer, Phase, PhaseScope

LOGGER_NAME = "etcd_rdzv"
EVENT_LOGGER_NAME = "etcd_rdzv.events"
LogFormat = Literal["auto", "json", "console"]
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
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer,
            foreign_pre_chain=[*_shared_processors(), structlog.processors.format_exc_info],
        )
    )
    setattr(handler, _HANDLER_MARK, True)
    package.addHandler(handler)
    # Our own handler only: no second copy of each line through the root logger.
    package.propagate = False


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
    def __init__(self, run_id: str, node: str) -> None:
        self._log = event_logger(run_id, node)

    @contextmanager
    def phase(self, phase: Phase, **attributes: Any) -> Iterator[PhaseScope]:
        scope = _LogScope(attributes)
        started = time.monotonic()
        if phase is Phase.LAST_CALL:
            self._log.info("last_call_started", **scope.fields)
        try:
            yield scope
        except BaseException as error:
            self._phase_failed(phase, scope, error, time.monotonic() - started)
            raise
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

    def lease_refresh(self, kind: str, ok: bool, seconds: float) -> None:
        if not ok:
            self._log.warning("keep_alive_refresh_failed", kind=kind, seconds=round(seconds, 6))

    def _phase_failed(
        self, phase: Phase, scope: _LogScope, error: BaseException, seconds: float
    ) -> None:
        if phase is not Phase.RENDEZVOUS:
            return  # a phase ending early is a retry, logged as one
        name = type(error).__name__
        event = {
            "RendezvousTimeoutError": "rendezvous_timeout",
            "RendezvousClosedError": "rendezvous_rejected_closed",
        }.get(name, "rendezvous_failed")
        self._log.error(event, seconds=round(seconds, 6), error=f"{name}: {error}", **scope.fields)


class _LogScope(PhaseScope):
    def __init__(self, attributes: dict[str, Any]) -> None:
        self.fields = {k: v for k, v in attributes.items() if v is not None}

    def annotate(self, **attributes: Any) -> None:
        self.fields.update({k: v for k, v in attributes.items() if v is not None})
