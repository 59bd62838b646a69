"""torchrun finds the backend through the `torchrun.handlers` entry point, as torch loads it."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest
from torch.distributed.elastic.rendezvous import RendezvousParameters, registry

from etcd_rdzv import plugin
from etcd_rdzv.errors import ConfigurationError
from etcd_rdzv.handler import BACKEND_NAME


def test_entry_point_yields_the_handler_creator() -> None:
    (entry_point,) = [
        ep for ep in entry_points(group="torchrun.handlers") if ep.name == BACKEND_NAME
    ]
    # torch calls the loaded object with no arguments and registers what it returns.
    assert entry_point.load()() is plugin.create_handler


def test_torch_registry_resolves_the_backend_name() -> None:
    params = RendezvousParameters(
        backend=BACKEND_NAME, endpoint="127.0.0.1:1", run_id="r", min_nodes=1, max_nodes=2,
        timeout="-1",
    )  # fmt: skip
    # Only our creator validates this key, and it does so before any etcd request: the error
    # proves the name resolved to etcd-rdzv's creator, without I/O.
    with pytest.raises(ConfigurationError, match="timeout must be a positive number"):
        registry.get_rendezvous_handler(params)


def test_importing_etcd_rdzv_first_still_registers_the_backend() -> None:
    # A fresh interpreter: torch's registry loads entry points while its package imports, which
    # must not import etcd-rdzv's handler module circularly.
    script = (
        "import etcd_rdzv.handler\n"
        "from torch.distributed.elastic.rendezvous import rendezvous_handler_registry as r\n"
        "print(sorted(r._registry))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert "'etcd-rdzv'" in done.stdout, done.stderr
    assert "Exception while registering" not in done.stderr
