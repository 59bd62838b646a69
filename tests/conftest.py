"""Shared fixtures: real etcd servers on free loopback ports, and unique run ids.

Every test that uses `etcd` (or `etcd_factory`) runs once per etcd API: `v3` against an etcd
started without the v2 API, `v2` against one started with it. While it runs, the environment
says which API (`ETCD_RDZV_ETCD_API`), so every agent it starts, in-process or as a child
process, speaks that one. A test about one API alone says so with `only_etcd_api("v2")`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol
from uuid import uuid4

import pytest

from etcd_rdzv.config import RendezvousConfig, parse_endpoints, parse_etcd_api
from etcd_rdzv.kv import KeyValue, connect
from etcd_rdzv.telemetry import NOOP_OBSERVER, Observer
from etcd_rdzv_devtools.local_etcd import (
    LocalEtcd,
    LocalEtcdCluster,
    ServerTls,
    start_local_etcd,
    start_local_etcd_cluster,
)

ETCD_APIS = ("v3", "v2")


def only_etcd_api(api: str) -> pytest.MarkDecorator:
    """Run a test for one etcd API only (e.g. a mixed rendezvous with torch's v2 backend)."""
    return pytest.mark.parametrize("etcd_api", [api], indirect=True)


def open_kv(
    server: LocalEtcd | str,
    api: str,
    *,
    request_timeout: float = 10.0,
    observer: Observer = NOOP_OBSERVER,
) -> KeyValue:
    """A transport of `api` to `server` (or to endpoints given as HOST:PORT[,...])."""
    endpoints = server if isinstance(server, str) else server.endpoint
    config = RendezvousConfig(
        "kv",
        parse_endpoints(endpoints),
        1,
        1,
        etcd_api=parse_etcd_api(api),
        request_timeout=request_timeout,
    )
    return connect(config, observer)


_TESTS_DIR = Path(__file__).parent
# Tests are marked by the folder they live in, so `-m "not integration"` needs no bookkeeping.
_MARK_BY_FOLDER = {"integration": "integration", "e2e": "e2e", "soak": "soak"}


class EtcdFactory(Protocol):
    """Starts an extra etcd server; takes the keyword arguments of `start_local_etcd`."""

    def __call__(
        self,
        *,
        enable_v2: bool | None = None,
        data_dir: Path | None = None,
        name: str = "etcd-rdzv-test",
        extra_args: tuple[str, ...] = (),
        ready_timeout: float = 15.0,
        log_path: Path | None = None,
        tls: ServerTls | None = None,
    ) -> LocalEtcd: ...


def pytest_configure(config: pytest.Config) -> None:
    # Declared in pyproject.toml too; repeated so these fixtures work from any rootdir.
    config.addinivalue_line("markers", "integration: talks to a real etcd server")
    config.addinivalue_line("markers", "e2e: runs real torchrun agents")
    config.addinivalue_line("markers", "soak: the long soak; `make soak` runs it")


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


@pytest.fixture(scope="session", params=ETCD_APIS)
def etcd_api(request: pytest.FixtureRequest) -> str:
    """The etcd API this test runs with: `v3`, or `v2` (torch's, for mixed rendezvous)."""
    return str(request.param)


@pytest.fixture(autouse=True)
def _agents_speak_the_etcd_api(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    if "etcd_api" in request.fixturenames:
        monkeypatch.setenv("ETCD_RDZV_ETCD_API", request.getfixturevalue("etcd_api"))
    else:
        monkeypatch.delenv("ETCD_RDZV_ETCD_API", raising=False)


@pytest.fixture(scope="session")
def etcd(etcd_api: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEtcd]:
    """One etcd server per API shared by the whole session; isolate tests by `run_id`.

    For v3 the server has no v2 API at all, as etcd 3.6 and later.
    """
    _require_etcd_binary()
    server = start_local_etcd(
        enable_v2=etcd_api == "v2", data_dir=tmp_path_factory.mktemp(f"etcd-session-{etcd_api}")
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def etcd_factory(etcd_api: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdFactory]:
    """Start extra etcd servers for this test only; all are stopped at teardown.

    The v2 API is on only when the test runs for v2, unless `enable_v2` says otherwise.
    """
    _require_etcd_binary()
    started: list[LocalEtcd] = []

    def start(
        *,
        enable_v2: bool | None = None,
        data_dir: Path | None = None,
        name: str = "etcd-rdzv-test",
        extra_args: tuple[str, ...] = (),
        ready_timeout: float = 15.0,
        log_path: Path | None = None,
        tls: ServerTls | None = None,
    ) -> LocalEtcd:
        server = start_local_etcd(
            enable_v2=etcd_api == "v2" if enable_v2 is None else enable_v2,
            data_dir=tmp_path_factory.mktemp("etcd") if data_dir is None else data_dir,
            name=name,
            extra_args=extra_args,
            ready_timeout=ready_timeout,
            log_path=log_path,
            tls=tls,
        )
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def etcd_cluster(etcd_api: str, tmp_path: Path) -> Iterator[LocalEtcdCluster]:
    """Three etcd members as one cluster for this test only, v2 on only for the v2 run."""
    _require_etcd_binary()
    started = start_local_etcd_cluster(3, enable_v2=etcd_api == "v2", root_dir=tmp_path / "etcd")
    try:
        yield started
    finally:
        started.close()


_IS_LEADER = re.compile(r"^etcd_server_is_leader\s+(\S+)$", re.MULTILINE)


def etcd_leaders(members: list[LocalEtcd]) -> list[LocalEtcd]:
    """The running members that say (in their metrics) that they lead the cluster."""

    def leads(member: LocalEtcd) -> bool:
        found = _IS_LEADER.search(member.metrics_text())
        return found is not None and float(found.group(1)) == 1.0

    return [member for member in members if member.is_running() and leads(member)]


@pytest.fixture
def kv(etcd: LocalEtcd, etcd_api: str) -> Iterator[KeyValue]:
    """Our transport of this test's API to the session's etcd, to set up and inspect keys."""
    transport = open_kv(etcd, etcd_api)
    try:
        yield transport
    finally:
        transport.close()


def etcd_keys(server: LocalEtcd, api: str, prefix: str) -> set[str]:
    """Every key below `prefix`, as etcd's own client `etcdctl` lists them (not our transport)."""
    etcdctl = shutil.which("etcdctl") or "etcdctl"
    endpoints = f"--endpoints={server.client_url}"
    command = (
        [etcdctl, endpoints, "get", "--prefix", "--keys-only", prefix]
        if api == "v3"
        else [etcdctl, endpoints, "ls", "--recursive", "-p", prefix]
    )
    environment = {**os.environ, "ETCDCTL_API": api.removeprefix("v")}
    listed = subprocess.run(
        command, env=environment, capture_output=True, text=True, timeout=30, check=False
    )
    if listed.returncode != 0 and "Key not found" in listed.stderr:
        return set()
    listed.check_returncode()
    # v2 lists directories with a trailing slash; they are not keys.
    return {line for line in listed.stdout.splitlines() if line and not line.endswith("/")}


@pytest.fixture
def run_id() -> str:
    """A run id no other test uses, so tests can share one etcd server."""
    return f"t-{uuid4().hex[:12]}"
