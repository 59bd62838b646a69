"""The errors users see. Each message says what happened and what to do next.

These import nothing: the protocol, the transports and `etcd-rdzv status` raise them without
loading torch. torchrun's agent gets them as subclasses of torch's rendezvous errors too, so
that it handles them as it handles its own backends' errors: the handler and the store
translate at the boundary torch calls (`etcd_rdzv.agent_errors`).
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "CorruptStateError",
    "EtcdRdzvError",
    "EtcdRejectedError",
    "EtcdUnavailableError",
    "RendezvousClosedError",
    "RendezvousTimeoutError",
]


class EtcdRdzvError(Exception):
    """Every error etcd-rdzv raises on purpose."""


class ConfigurationError(EtcdRdzvError, ValueError):
    """A rendezvous parameter or `--rdzv-conf` key is invalid."""


class EtcdUnavailableError(EtcdRdzvError):
    """No etcd endpoint answered within the allowed time."""


class EtcdRejectedError(EtcdRdzvError):
    """etcd answered but refused the request (permissions, missing API): retrying cannot help."""


class RendezvousTimeoutError(EtcdRdzvError):
    """The rendezvous did not complete within its timeout."""


class RendezvousClosedError(EtcdRdzvError):
    """The run is closed: no node joins any further version."""


class CorruptStateError(EtcdRdzvError):
    """A key of this run holds a value that is not what the protocol wrote."""

    def __init__(self, key: str, problem: str, raw: str | None) -> None:
        shown = raw if raw is None or len(raw) <= 200 else raw[:200] + "..."
        super().__init__(
            f"etcd key {key!r} holds an invalid rendezvous value ({problem}): {shown!r}. "
            "Another program may be writing under this run's prefix; use a distinct run id "
            "or etcd_prefix, or delete the key to reset the run."
        )
        self.key = key
        self.problem = problem
