"""The telemetry of one agent: its observers, built as its configuration asks.

Only the handler (and tools that stand in for an agent) import this: it loads OpenTelemetry's
SDK, prometheus_client and structlog, which nothing below the handler needs.
"""

from __future__ import annotations

from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from etcd_rdzv import __version__
from etcd_rdzv.config import RendezvousConfig
from etcd_rdzv.telemetry.export import build_tracer_provider, shutdown_provider
from etcd_rdzv.telemetry.logging import LoggingObserver, configure_logging
from etcd_rdzv.telemetry.metrics import MetricsObserver, MetricsServer, RendezvousMetrics
from etcd_rdzv.telemetry.observer import FanOut, Observer
from etcd_rdzv.telemetry.tracing import TracingObserver, node_identity

__all__ = ["Telemetry", "build_telemetry"]


class Telemetry(FanOut):
    """The observers of one agent, with the server and exporters they own."""

    def __init__(
        self,
        observers: list[Observer],
        *,
        metrics_server: MetricsServer | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        super().__init__(observers)
        self.metrics_server = metrics_server
        self.tracer_provider = tracer_provider

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_server.port if self.metrics_server else None

    def close(self) -> None:
        super().close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.tracer_provider is not None:
            shutdown_provider(self.tracer_provider)


def build_telemetry(config: RendezvousConfig) -> Telemetry:
    """Tracing, metrics and logs as `config.telemetry` asks; what is off costs nothing."""
    settings = config.telemetry
    configure_logging(settings.log_format, settings.log_level)
    node = node_identity()
    # Order matters: tracing is entered first, so that metrics (exemplars) and logs (trace
    # ids) run inside each phase's span.
    observers: list[Observer] = []
    provider = build_tracer_provider(settings.trace_file)
    if provider is not None:
        tracer = provider.get_tracer("etcd_rdzv", __version__)
        observers.append(
            TracingObserver(
                tracer,
                run_id=config.run_id,
                min_nodes=config.min_nodes,
                max_nodes=config.max_nodes,
                node=node,
            )
        )
    server = None
    if settings.metrics_port is not None:
        registry = CollectorRegistry()
        nodes = (config.min_nodes, config.max_nodes)
        metrics = RendezvousMetrics(registry)
        policy = config.rank_policy.kind
        observers.append(MetricsObserver(metrics, config.run_id, nodes, policy))
        server = MetricsServer(registry, settings.metrics_addr, settings.metrics_port)
    observers.append(
        LoggingObserver(
            config.run_id,
            node,
            min_nodes=config.min_nodes,
            max_nodes=config.max_nodes,
            progress_interval=settings.progress_interval,
        )
    )
    return Telemetry(observers, metrics_server=server, tracer_provider=provider)
