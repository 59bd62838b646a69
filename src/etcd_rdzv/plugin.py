"""The `torchrun.handlers` entry point. Imports nothing from torch when loaded.

torch's rendezvous registry loads entry points while its own package is still importing:
a plugin module that imported torch's rendezvous package at load time would be imported
circularly whenever etcd-rdzv is imported first, and torch would drop it with a warning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousParameters


def handler_creator() -> Callable[[RendezvousParameters], RendezvousHandler]:
    """torch calls this with no arguments and registers what it returns as `etcd-rdzv`."""
    return create_handler


def create_handler(params: RendezvousParameters) -> RendezvousHandler:
    from etcd_rdzv.handler import create_handler as create

    return create(params)
