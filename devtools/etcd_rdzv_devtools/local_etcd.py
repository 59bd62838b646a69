"""Throwaway etcd servers on loopback, for the demo, the tests and the benchmarks.

Each server listens on 127.0.0.1 only, on ports picked free at start, with its own data
directory and log file. Nothing here is meant for production etcd.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from etcd_rdzv_devtools.logfiles import log_tail

__all__ = [
    "LocalEtcd",
    "LocalEtcdCluster",
    "LocalEtcdError",
    "ServerTls",
    "find_etcd_binary",
    "free_loopback_ports",
    "reserved_loopback_ports",
    "start_local_etcd",
    "start_local_etcd_cluster",
]

LOOPBACK = "127.0.0.1"
# Picking a free port and etcd binding it are two steps; another process may win the port in
# between. A few fresh tries make that race harmless without hiding real start-up failures.
_PORT_ATTEMPTS = 3
_ADDRESS_IN_USE = "address already in use"
_HEALTH_POLL_SECONDS = 0.05
_HTTP_TIMEOUT_SECONDS = 1.0
_STOP_TIMEOUT_SECONDS = 10.0
_REAP_TIMEOUT_SECONDS = 5.0

# Servers still running when the interpreter exits are stopped, so an aborted test session or
# demo does not leave etcd processes behind. Weak, so this never keeps a server alive.
_live_servers: weakref.WeakSet[LocalEtcd] = weakref.WeakSet()


class LocalEtcdError(RuntimeError):
    """A local etcd server could not be started or did not become healthy."""


def find_etcd_binary() -> str:
    """Return the path of the `etcd` executable, or raise saying how to install it."""
    path = shutil.which("etcd")
    if path is None:
        raise LocalEtcdError(
            "etcd executable not found on PATH. Install it with "
            "`apt-get install etcd-server` (Debian/Ubuntu) or put an etcd 3.x binary on PATH."
        )
    return path


@dataclass(frozen=True)
class ServerTls:
    """TLS for a local etcd's client port: its certificate, and the CA it trusts for clients.

    `client_cert`/`client_key` are what this module itself presents for health checks when
    `client_cert_auth` is on.
    """

    cacert: Path
    cert: Path
    key: Path
    client_cert: Path | None = None
    client_key: Path | None = None
    client_cert_auth: bool = False

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.cacert))
        if self.client_cert is not None:
            context.load_cert_chain(
                str(self.client_cert), str(self.client_key) if self.client_key else None
            )
        return context


@dataclass(eq=False)
class LocalEtcd:
    """One etcd server process on loopback. Create it with `start_local_etcd`.

    `stop()` keeps the data directory so `restart()` can bring the same server back;
    `close()` (also the context-manager exit) stops it and removes a data directory that
    `start_local_etcd` created itself.
    """

    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    command: tuple[str, ...]
    owns_data_dir: bool = False
    tls: ServerTls | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.client_port}"

    @property
    def client_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{LOOPBACK}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{LOOPBACK}:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def launch(self) -> None:
        """Start the etcd process without waiting for it; see `wait_ready`."""
        if self.is_running():
            raise LocalEtcdError(f"etcd {self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # Appending keeps the log of earlier runs, so a restart's log tail tells the whole story.
        # The log is a file, never a pipe: an unread pipe fills up and blocks etcd.
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_environment_without_etcd_settings(),
                # Its own session: a Ctrl-C in the terminal reaches the demo, which then stops
                # its agents while etcd still serves them, and stops etcd last.
                start_new_session=True,
            )
        _live_servers.add(self)

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Block until `/health` reports healthy; raise `LocalEtcdError` with the log tail."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise LocalEtcdError(
                    f"etcd {self.name} exited (code {code}) before becoming healthy.\n"
                    f"Log {self.log_path}:\n{self.log_tail()}"
                )
            if self._is_healthy():
                return
            if time.monotonic() >= deadline:
                raise LocalEtcdError(
                    f"etcd {self.name} at {self.client_url} not healthy after {timeout:.1f}s.\n"
                    f"Log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(_HEALTH_POLL_SECONDS)

    def _is_healthy(self) -> bool:
        try:
            body = _http_get(f"{self.client_url}/health", _HTTP_TIMEOUT_SECONDS, self.tls)
        except (OSError, urllib.error.URLError):
            return False
        try:
            return bool(json.loads(body).get("health") == "true")
        except (ValueError, AttributeError):
            return False

    def stop(self, timeout: float = _STOP_TIMEOUT_SECONDS) -> None:
        """Terminate the process, killing it if it does not exit in time. Idempotent."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        # A paused (SIGSTOPped) process only acts on SIGTERM once it is continued.
        process.send_signal(signal.SIGCONT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(_REAP_TIMEOUT_SECONDS)

    def kill(self) -> None:
        """SIGKILL the process (a crash, not a shutdown) and reap it."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait(_REAP_TIMEOUT_SECONDS)

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): it keeps its sockets but answers nothing."""
        self._require_running("pause")
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Continue a paused process (SIGCONT)."""
        self._require_running("resume")
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def restart(self, ready_timeout: float = 15.0) -> None:
        """Stop if running, then start again on the same ports and data directory."""
        self.stop()
        self.launch()
        self.wait_ready(ready_timeout)

    def close(self) -> None:
        """Stop, and remove the data directory if `start_local_etcd` created it."""
        self.stop()
        if self.owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def metrics_text(self, timeout: float = 5.0) -> str:
        """The Prometheus exposition text served at `/metrics`."""
        return _http_get(f"{self.client_url}/metrics", timeout, self.tls)

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def _require_running(self, action: str) -> None:
        if not self.is_running():
            raise LocalEtcdError(f"cannot {action} etcd {self.name}: it is not running")

    def __enter__(self) -> LocalEtcd:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass(eq=False)
class LocalEtcdCluster:
    """Several etcd members on loopback forming one cluster."""

    members: list[LocalEtcd]
    owned_root: Path | None = None

    @property
    def endpoints(self) -> str:
        """Comma-separated `host:port` client endpoints, as torchrun's `--rdzv-endpoint`."""
        return ",".join(member.endpoint for member in self.members)

    @property
    def client_urls(self) -> list[str]:
        return [member.client_url for member in self.members]

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def close(self) -> None:
        self.stop()
        if self.owned_root is not None:
            shutil.rmtree(self.owned_root, ignore_errors=True)

    def __enter__(self) -> LocalEtcdCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def start_local_etcd(
    *,
    enable_v2: bool = True,
    data_dir: Path | None = None,
    name: str = "etcd-rdzv-test",
    extra_args: Sequence[str] = (),
    ready_timeout: float = 15.0,
    log_path: Path | None = None,
    tls: ServerTls | None = None,
) -> LocalEtcd:
    """Start one etcd server on free loopback ports and wait until it is healthy.

    Without `data_dir` a temporary directory is created and removed by `close()`. The log
    goes to `log_path`, by default `etcd.log` inside the data directory. With `tls` the
    client port speaks only HTTPS.
    """
    binary = find_etcd_binary()
    owns_data_dir = data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="etcd-rdzv-")) if data_dir is None else data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "etcd.log" if log_path is None else log_path

    for attempt in range(1, _PORT_ATTEMPTS + 1):
        client_port, peer_port = free_loopback_ports(2)
        server = LocalEtcd(
            name=name,
            client_port=client_port,
            peer_port=peer_port,
            data_dir=data_dir,
            log_path=log_path,
            command=_etcd_command(
                binary,
                name=name,
                client_port=client_port,
                peer_port=peer_port,
                data_dir=data_dir,
                initial_cluster=f"{name}=http://{LOOPBACK}:{peer_port}",
                cluster_token=f"{name}-{peer_port}",
                enable_v2=enable_v2,
                extra_args=(*_tls_args(tls), *extra_args),
                client_scheme="https" if tls else "http",
            ),
            owns_data_dir=owns_data_dir,
            tls=tls,
        )
        try:
            server.launch()
            server.wait_ready(ready_timeout)
        except LocalEtcdError:
            server.stop()
            if attempt < _PORT_ATTEMPTS and _ADDRESS_IN_USE in server.log_tail().lower():
                continue
            if owns_data_dir:
                shutil.rmtree(data_dir, ignore_errors=True)
            raise
        return server
    raise AssertionError("unreachable: the last attempt returns or raises")


def start_local_etcd_cluster(
    size: int = 3,
    *,
    enable_v2: bool = True,
    root_dir: Path | None = None,
    name_prefix: str = "etcd-rdzv-member",
    extra_args: Sequence[str] = (),
    ready_timeout: float = 30.0,
) -> LocalEtcdCluster:
    """Start `size` etcd members on loopback as one cluster and wait until all are healthy.

    Member `i` keeps its data in `root_dir/<name_prefix>-<i>` (a temporary root by default,
    removed by `close()`), its log in `etcd.log` there.
    """
    if size < 1:
        raise ValueError(f"a cluster needs at least one member, got size={size}")
    binary = find_etcd_binary()
    owned_root = Path(tempfile.mkdtemp(prefix="etcd-rdzv-cluster-")) if root_dir is None else None
    root = owned_root if owned_root is not None else root_dir
    assert root is not None

    for attempt in range(1, _PORT_ATTEMPTS + 1):
        ports = free_loopback_ports(2 * size)
        names = [f"{name_prefix}-{index}" for index in range(size)]
        peer_ports = ports[size:]
        initial_cluster = ",".join(
            f"{name}=http://{LOOPBACK}:{port}" for name, port in zip(names, peer_ports, strict=True)
        )
        # Unique per cluster (ports are), so members of two test clusters never join each
        # other should a port be reused while an old member still runs.
        cluster_token = f"{name_prefix}-{peer_ports[0]}"
        # A fresh data dir per attempt: a member that did start may have written the old ports.
        attempt_root = root / f"attempt-{attempt}"
        members = []
        for name, client_port, peer_port in zip(names, ports[:size], peer_ports, strict=True):
            data_dir = attempt_root / name
            data_dir.mkdir(parents=True, exist_ok=True)
            members.append(
                LocalEtcd(
                    name=name,
                    client_port=client_port,
                    peer_port=peer_port,
                    data_dir=data_dir,
                    log_path=data_dir / "etcd.log",
                    command=_etcd_command(
                        binary,
                        name=name,
                        client_port=client_port,
                        peer_port=peer_port,
                        data_dir=data_dir,
                        initial_cluster=initial_cluster,
                        cluster_token=cluster_token,
                        enable_v2=enable_v2,
                        extra_args=extra_args,
                    ),
                )
            )
        cluster = LocalEtcdCluster(members=members, owned_root=owned_root)
        try:
            # All members must be up before any can be healthy: health needs a quorum.
            for member in members:
                member.launch()
            deadline = time.monotonic() + ready_timeout
            for member in members:
                member.wait_ready(max(0.0, deadline - time.monotonic()))
        except LocalEtcdError:
            cluster.stop()
            bind_failed = any(_ADDRESS_IN_USE in m.log_tail().lower() for m in members)
            if attempt < _PORT_ATTEMPTS and bind_failed:
                continue
            cluster.close()
            raise
        return cluster
    raise AssertionError("unreachable: the last attempt returns or raises")


def _etcd_command(
    binary: str,
    *,
    name: str,
    client_port: int,
    peer_port: int,
    data_dir: Path,
    initial_cluster: str,
    cluster_token: str,
    enable_v2: bool,
    extra_args: Sequence[str],
    client_scheme: str = "http",
) -> tuple[str, ...]:
    client_url = f"{client_scheme}://{LOOPBACK}:{client_port}"
    peer_url = f"http://{LOOPBACK}:{peer_port}"
    command = [
        binary,
        f"--name={name}",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client_url}",
        f"--advertise-client-urls={client_url}",
        f"--listen-peer-urls={peer_url}",
        f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster={initial_cluster}",
        "--initial-cluster-state=new",
        f"--initial-cluster-token={cluster_token}",
        # Per-method gRPC latency histograms, which the etcd dashboard charts (as compose runs).
        "--metrics=extensive",
    ]
    if enable_v2:
        command.append("--enable-v2=true")
    command.extend(extra_args)
    return tuple(command)


@contextmanager
def reserved_loopback_ports(count: int) -> Iterator[list[int]]:
    """Free ports, held bound (not listening) until the block ends: nothing started meanwhile
    can take them, and no port is handed out twice."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((LOOPBACK, 0))
        yield [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_loopback_ports(count: int) -> list[int]:
    """Ports the kernel reports free now, released for the caller to bind."""
    with reserved_loopback_ports(count) as ports:
        return ports


def _environment_without_etcd_settings() -> dict[str, str]:
    # etcd reads ETCD_* variables as flags; a developer's own settings must not leak in.
    return {key: value for key, value in os.environ.items() if not key.startswith("ETCD_")}


# Loopback requests must never go through an HTTP proxy set in the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _tls_args(tls: ServerTls | None) -> tuple[str, ...]:
    if tls is None:
        return ()
    args = (f"--cert-file={tls.cert}", f"--key-file={tls.key}", f"--trusted-ca-file={tls.cacert}")
    return (*args, "--client-cert-auth") if tls.client_cert_auth else args


def _http_get(url: str, timeout: float, tls: ServerTls | None = None) -> str:
    if tls is not None:
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}),
            urllib.request.HTTPSHandler(context=tls.client_context()),
        )
        with opener.open(url, timeout=timeout) as response:
            return bytes(response.read()).decode("utf-8", errors="replace")
    with _DIRECT.open(url, timeout=timeout) as response:
        body: bytes = response.read()
    return body.decode("utf-8", errors="replace")


@atexit.register
def _stop_leftover_servers() -> None:
    for server in list(_live_servers):
        server.stop(timeout=_REAP_TIMEOUT_SECONDS)
