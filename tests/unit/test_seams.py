"""The seams, at run time: what `etcd-rdzv` and the protocol load, and the errors torch gets.

`make lint` proves the imports statically (lint-imports, pyproject.toml); these check the
process itself, which also catches an import made by name at run time.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from torch.distributed.elastic.rendezvous import api as torch_rdzv

from etcd_rdzv import errors
from etcd_rdzv.agent_errors import for_torch, raised_for_torch

HEAVY = ("torch", "opentelemetry", "prometheus_client", "structlog")


def loaded_after(code: str) -> list[str]:
    probe = (
        f"{code}\nimport json, sys\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    loaded: list[str] = json.loads(result.stdout.splitlines()[-1])
    return loaded


@pytest.mark.parametrize(
    "code",
    [
        "from etcd_rdzv.cli import build_parser; build_parser()",
        "import etcd_rdzv.rendezvous, etcd_rdzv.status, etcd_rdzv.kv.memory",
        "import etcd_rdzv.kv.etcd_v3, etcd_rdzv.kv.etcd_v2",
    ],
)
def test_the_protocol_transports_and_cli_load_neither_torch_nor_a_telemetry_backend(
    code: str,
) -> None:
    assert loaded_after(code) == []


def test_the_agent_loads_them() -> None:
    # The probe above would pass on an empty list whatever was imported if it saw nothing.
    assert set(loaded_after("import etcd_rdzv.handler")) == set(HEAVY)


TWINS = [
    (errors.ConfigurationError("bad"), torch_rdzv.RendezvousError),
    (errors.EtcdUnavailableError("down"), torch_rdzv.RendezvousConnectionError),
    (errors.EtcdRejectedError("denied"), torch_rdzv.RendezvousConnectionError),
    (errors.RendezvousTimeoutError("late"), torch_rdzv.RendezvousTimeoutError),
    (errors.RendezvousClosedError("closed"), torch_rdzv.RendezvousClosedError),
    (errors.CorruptStateError("/k", "not JSON", "{"), torch_rdzv.RendezvousStateError),
]


@pytest.mark.parametrize(("error", "torch_class"), TWINS)
def test_torch_gets_each_error_as_its_own_class_and_ours(
    error: errors.EtcdRdzvError, torch_class: type[Exception]
) -> None:
    twin = for_torch(error)
    assert isinstance(twin, torch_class) and isinstance(twin, type(error))
    assert type(twin).__name__ == type(error).__name__
    assert str(twin) == str(error) and vars(twin) == vars(error)


def test_errors_leave_the_boundary_as_torch_errors_with_their_traceback() -> None:
    def deep() -> None:
        raise errors.CorruptStateError("/run/active_version", "not JSON", "{")

    with pytest.raises(torch_rdzv.RendezvousStateError) as raised, raised_for_torch():
        deep()
    assert raised.value.key == "/run/active_version"  # type: ignore[attr-defined]
    assert raised.traceback[-1].name == "deep"


def test_other_exceptions_pass_the_boundary_untouched() -> None:
    with pytest.raises(KeyError), raised_for_torch():
        raise KeyError("x")


@pytest.mark.parametrize(
    "module",
    ["rendezvous", "layouts", "decisions", "protocol", "rank_policy", "swap", "leases", "runtime"],
)
def test_the_protocol_logs_only_through_the_observer(module: str) -> None:
    # Lines written around the observer would lack the run and node every event carries.
    source = Path(__file__).resolve().parents[2] / "src" / "etcd_rdzv" / f"{module}.py"
    imported = {
        alias.name
        for node in ast.walk(ast.parse(source.read_text()))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (
            node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")]
        )
    }
    assert "logging" not in imported
