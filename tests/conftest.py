"""Shared fixtures: real etcd servers on free loopback ports, and unique run ids."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol
from uuid import uuid4

import pytest

from etcd_rdzv.local_etcd import LocalEtcd, start_local_etcd

_TESTS_DIR = Path(__file__).parent
# Tests are marked by the folder they live in, so `-m "not integration"` needs no bookkeeping.
_MARK_BY_FOLDER = {"integration": "integration", "e2e": "e2e"}


class EtcdFactory(Protocol):
    """Starts an extra etcd server; takes the keyword arguments of `start_local_etcd`."""

    def __call__(
        self,
        *,
        enable_v2: bool = True,
        data_dir: Path | None = None,
        name: str = "etcd-rdzv-test",
        extra_args: tuple[str, ...] = (),
        ready_timeout: float = 15.0,
        log_path: Path | None = None,
    ) -> LocalEtcd: ...


def pytest_configure(config: pytest.Config) -> None:
    # Declared in pyproject.toml too; repeated so these fixtures work from any rootdir.
    config.addinivalue_line("markers", "integration: talks to a real etcd server")
    config.addinivalue_line("markers", "e2e: runs real torchrun agents")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            folder = item.path.relative_to(_TESTS_DIR).parts[0]
        except ValueError:
            continue
        mark = _MARK_BY_FOLDER.get(folder)
        if mark is not None:
            item.add_marker(mark)


def _require_etcd_binary() -> None:
    # A missing etcd fails loudly instead of silently skipping every integration test.
    if shutil.which("etcd") is None:
        pytest.fail(
            "etcd is not installed: the integration tests need a real etcd server. "
            "Install it with `apt-get install etcd-server` or put an etcd 3.x binary on PATH.",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEtcd]:
    """One etcd server (v2 API on) shared by the whole session; isolate tests by `run_id`."""
    _require_etcd_binary()
    server = start_local_etcd(data_dir=tmp_path_factory.mktemp("etcd-session"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def etcd_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdFactory]:
    """Start extra etcd servers for this test only; all are stopped at teardown."""
    _require_etcd_binary()
    started: list[LocalEtcd] = []

    def start(
        *,
        enable_v2: bool = True,
        data_dir: Path | None = None,
        name: str = "etcd-rdzv-test",
        extra_args: tuple[str, ...] = (),
        ready_timeout: float = 15.0,
        log_path: Path | None = None,
    ) -> LocalEtcd:
        server = start_local_etcd(
            enable_v2=enable_v2,
            data_dir=tmp_path_factory.mktemp("etcd") if data_dir is None else data_dir,
            name=name,
            extra_args=extra_args,
            ready_timeout=ready_timeout,
            log_path=log_path,
        )
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def run_id() -> str:
    """A run id no other test uses, so tests can share one etcd server."""
    return f"t-{uuid4().hex[:12]}"
