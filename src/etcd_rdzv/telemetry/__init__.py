"""Telemetry behind one seam: the rendezvous reports to an `Observer`, never to a backend.

This package's root is the interface only, and imports nothing but the standard library: the
protocol, the transports and `etcd-rdzv status` import it without loading OpenTelemetry's SDK,
prometheus_client or structlog. The observers that use them, and `build_telemetry` that
assembles them for an agent, live in their own modules (`etcd_rdzv.telemetry.agent`).
"""

from __future__ import annotations

from etcd_rdzv.telemetry.observer import (
    NOOP_OBSERVER,
    FanOut,
    Observer,
    Outcome,
    Phase,
    PhaseScope,
)

__all__ = [
    "NOOP_OBSERVER",
    "FanOut",
    "Observer",
    "Outcome",
    "Phase",
    "PhaseScope",
]
