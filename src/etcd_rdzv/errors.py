"""The errors users see. Each message says what happened and what to do next.

They subclass torch's rendezvous errors, so torchrun's agent handles them as it handles
torch's own backends' errors.
"""

from __future__ import annotations

from torch.distributed.elastic.rendezvous import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousStateError,
    RendezvousTimeoutError,
)

__all__ = [
    "ConfigurationError",
    "CorruptStateError",
    "EtcdRejectedError",
    "EtcdUnavailableError",
    "RendezvousClosedError",
    "RendezvousError",
    "RendezvousTimeoutError",
]


class ConfigurationError(RendezvousError, ValueError):
    """A rendezvous parameter or `--rdzv-conf` key is invalid."""


class EtcdUnavailableError(RendezvousConnectionError):
    """No etcd endpoint answered within the allowed time."""


class EtcdRejectedError(RendezvousConnectionError):
    """etcd answered but refused the request (permissions, missing API): retrying cannot help."""


class CorruptStateError(RendezvousStateError):
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
