"""The one typed, validated configuration of a rendezvous.

This is the only module that reads `RendezvousParameters` and `--rdzv-conf` keys. Every
default lives here; everything else receives a frozen `RendezvousConfig`.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from etcd_rdzv.errors import ConfigurationError
from etcd_rdzv.rank_policy import RankPolicy, default_node_id, env_rank

if TYPE_CHECKING:
    # Only its attributes are read: `etcd-rdzv status` builds a config without loading torch.
    from torch.distributed.elastic.rendezvous import RendezvousParameters

log = logging.getLogger(__name__)

DEFAULT_ETCD_PORT = 2379
DEFAULT_PREFIX = "/torchelastic/p2p"
DEFAULT_TIMEOUT_SECONDS = 600.0
DEFAULT_LAST_CALL_TIMEOUT_SECONDS = 30.0
DEFAULT_REQUEST_TIMEOUT_SECONDS = 10.0
DEFAULT_METRICS_PORT = 9401
DEFAULT_PROGRESS_INTERVAL_SECONDS = 30.0
DEFAULT_METRICS_ADDR = "0.0.0.0"
_DISABLED = frozenset({"off", "none", "disabled", "false", "no"})

Protocol = Literal["http", "https"]
EtcdApi = Literal["v3", "v2"]
# v3 is served by every etcd from 3.4 on; v2 only by 3.4/3.5 with --enable-v2, and is kept for
# rendezvous shared with torch's `etcd` backend, which speaks nothing else.
DEFAULT_ETCD_API: EtcdApi = "v3"
# How nodes join and confirm (etcd_rdzv.layouts): by claims where the API has transactions
# (v3), else by compare-and-swap of the shared state, as torch's backend does (v2).
KeyLayoutName = Literal["claims", "torch"]
KEY_LAYOUT_OF_API: dict[EtcdApi, KeyLayoutName] = {"v3": "claims", "v2": "torch"}

# Keys torchrun or torch's other backends pass that mean nothing to this backend.
_FOREIGN_KEYS = frozenset(
    {
        "rank",
        "join_timeout",
        "read_timeout",
        "close_timeout",
        "heartbeat",
        "keep_alive_interval",
        "keep_alive_max_attempt",
        "is_host",
        "store_type",
        "local_addr",
        "use_libuv",
    }
)
_RUN_ID_PATTERN = re.compile(r"^[^/\s]{1,128}$")
_ENDPOINT_PATTERN = re.compile(
    r"^(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]/\s]+))(?::(?P<port>\d+))?$"
)


@dataclass(frozen=True)
class EtcdEndpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)


@dataclass(frozen=True)
class TlsFiles:
    cacert: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def as_strings(self) -> tuple[str | None, str | None, str | None]:
        """(cacert, cert, key) as the client libraries take them: paths as text, or None."""
        return _text(self.cacert), _text(self.cert), _text(self.key)

    def client_context(self) -> ssl.SSLContext:
        """A client's TLS context: the server verified against `cacert` (else the system's
        CAs), its host name checked, and this client's certificate when given. Raises
        ssl.SSLError for a file that is not what it should be."""
        context = ssl.create_default_context(cafile=_text(self.cacert))
        if self.cert:
            context.load_cert_chain(str(self.cert), _text(self.key))
        return context


@dataclass(frozen=True)
class Credentials:
    """An etcd user and its password. The password never appears in a repr, log or span."""

    username: str
    password: str = field(repr=False)

    @classmethod
    def from_settings(
        cls, conf: Mapping[str, Any], environ: Mapping[str, str], flags: SettingFlags | None = None
    ) -> Credentials | None:
        """From `username` (or ETCD_RDZV_USERNAME) and a password taken from ETCD_RDZV_PASSWORD
        or the file `password_file` names: never from `--rdzv-conf`, whose values show in
        `ps` and in torchrun's own logs. `flags`: how the caller's user names these settings
        in its messages (the agent's `--rdzv-conf` keys unless told)."""
        flags = flags or AGENT_FLAGS
        if "password" in conf:
            raise ConfigurationError(
                "--rdzv-conf password= would show the password on the command line: set "
                f"ETCD_RDZV_PASSWORD, or name a file with {flags.password_file}."
            )
        username = conf.get("username", environ.get("ETCD_RDZV_USERNAME"))
        password_file = conf.get("password_file", environ.get("ETCD_RDZV_PASSWORD_FILE"))
        password = environ.get("ETCD_RDZV_PASSWORD")
        if password_file:
            try:
                password = Path(str(password_file)).read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as error:
                raise ConfigurationError(
                    f"{flags.password_file_setting}{password_file}: cannot read it "
                    f"({error.strerror})."
                ) from None
        if not username:
            if password is not None:
                raise ConfigurationError(
                    f"An etcd password is set but no user: add {flags.username}."
                )
            return None
        if not password:
            raise ConfigurationError(
                f"etcd user {username!r} has no password: set ETCD_RDZV_PASSWORD, or name a file "
                f"with {flags.password_file}."
            )
        return cls(str(username), password)


@dataclass(frozen=True)
class SettingFlags:
    """How a command's user sets the credentials, for the messages that ask for them."""

    username: str
    password_file: str
    password_file_setting: str  # what precedes the path when a message names the file


AGENT_FLAGS = SettingFlags(
    "--rdzv-conf username=NAME", "--rdzv-conf password_file=PATH", "password_file="
)


@dataclass(frozen=True)
class ProtocolTtls:
    """Lifetimes of the protocol's ephemeral keys, in seconds (torch's values by default).

    A key outlives its owner by at most its TTL: these bound how long a crashed node can hold
    the others up.
    """

    setup: float = 5.0
    joinable: float = 10.0
    frozen: float = 10.0
    keep_alive: float = 10.0
    # Only cleans up state of runs long gone; must outlast anything a live job survives.
    run: float = 7200.0

    @classmethod
    def from_keep_alive(cls, keep_alive: float) -> ProtocolTtls:
        """All the lifetimes that bound a dead node's hold on the others, from one setting.

        torch's values keep the same proportions (setup 5 s, joinable and frozen 10 s for a
        10 s keep-alive), so the default is unchanged; a shorter `keep_alive_ttl` then bounds
        the recovery from a death in any phase, not only after the version went final.
        """
        return cls(
            setup=keep_alive / 2, joinable=keep_alive, frozen=keep_alive, keep_alive=keep_alive
        )


@dataclass(frozen=True)
class TelemetryConfig:
    """Where metrics, traces and logs go. `--rdzv-conf` keys win over environment variables."""

    metrics_port: int | None = DEFAULT_METRICS_PORT  # None: no metrics endpoint; 0: a free port
    metrics_addr: str = DEFAULT_METRICS_ADDR
    trace_file: Path | None = None
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "INFO"
    # Seconds between `rendezvous_waiting` log events while a rendezvous lasts; None: never.
    progress_interval: float | None = DEFAULT_PROGRESS_INTERVAL_SECONDS

    @classmethod
    def from_settings(cls, conf: Mapping[str, Any], environ: Mapping[str, str]) -> TelemetryConfig:
        def setting(key: str) -> Any:
            value = conf.get(key)
            return environ.get(f"ETCD_RDZV_{key.upper()}") if value is None else value

        trace_file = setting("trace_file")
        log_format = str(setting("log_format") or "auto").lower()
        if log_format not in ("auto", "json", "console"):
            raise ConfigurationError(f"log_format={log_format!r}: use auto, json or console.")
        log_level = str(setting("log_level") or "INFO").upper()
        if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigurationError(f"log_level={log_level!r}: use DEBUG, INFO, WARNING, ERROR.")
        return cls(
            metrics_port=_metrics_port(setting("metrics_port")),
            metrics_addr=str(setting("metrics_addr") or DEFAULT_METRICS_ADDR),
            trace_file=Path(str(trace_file)) if trace_file else None,
            log_format=log_format,  # type: ignore[arg-type]
            log_level=log_level,
            progress_interval=_progress_interval(setting("progress_interval")),
        )


@dataclass(frozen=True)
class RendezvousConfig:
    run_id: str
    endpoints: tuple[EtcdEndpoint, ...]
    min_nodes: int
    max_nodes: int
    timeout: float = DEFAULT_TIMEOUT_SECONDS
    last_call_timeout: float = DEFAULT_LAST_CALL_TIMEOUT_SECONDS
    prefix: str = DEFAULT_PREFIX
    protocol: Protocol = "http"
    tls: TlsFiles = field(default_factory=TlsFiles)
    etcd_api: EtcdApi = DEFAULT_ETCD_API
    credentials: Credentials | None = None
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_SECONDS
    ttls: ProtocolTtls = field(default_factory=ProtocolTtls)
    local_addr: str | None = None
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    rank_policy: RankPolicy = field(default_factory=RankPolicy)
    # Who this node is across restarts of its agent (`rank_policy.default_node_id` unless the
    # platform names it); None: the host name.
    node_id: str | None = None
    env_rank: int | None = None  # this node's rank under rank_policy=from_env

    def __post_init__(self) -> None:
        _check_run_id(self.run_id)
        if self.rank_policy.decided_at_freeze and self.etcd_api == "v2":
            raise ConfigurationError(
                f"{self.rank_policy.describe()} needs etcd_api=v3: over v2 the rendezvous "
                "keeps torch's key layout, where a rank is the join order (torch's own nodes "
                "may take part). Use etcd_api=v3, or rank_policy=join_order without rank0_node."
            )
        if self.rank_policy.kind == "from_env" and self.env_rank is None:
            raise ConfigurationError(
                f"rank_policy=from_env={self.rank_policy.env_var}: this node has no rank in "
                f"{self.rank_policy.env_var}."
            )
        if not self.endpoints:
            raise ConfigurationError("No etcd endpoint given: pass --rdzv-endpoint HOST:PORT.")
        if self.min_nodes < 1:
            raise ConfigurationError(f"min_nodes must be at least 1, got {self.min_nodes}.")
        if self.max_nodes < self.min_nodes:
            raise ConfigurationError(
                f"max_nodes ({self.max_nodes}) is smaller than min_nodes ({self.min_nodes}): "
                "pass --nnodes MIN:MAX with MIN <= MAX."
            )
        for name in ("timeout", "last_call_timeout", "request_timeout"):
            _check_positive(name, getattr(self, name))
        for name, value in vars(self.ttls).items():
            _check_positive(f"{name} TTL", value)
        if not self.prefix.startswith("/") or (self.prefix.endswith("/") and self.prefix != "/"):
            raise ConfigurationError(
                f"etcd_prefix {self.prefix!r} must start with '/' and not end with one."
            )

    @property
    def key_layout(self) -> KeyLayoutName:
        """The run's key layout, which its etcd API decides: every node of a run uses one."""
        return KEY_LAYOUT_OF_API[self.etcd_api]

    @property
    def run_path(self) -> str:
        """The etcd directory holding everything of this run (torch's layout)."""
        base = "" if self.prefix == "/" else self.prefix
        return f"{base}/run_{self.run_id}"

    @classmethod
    def from_parameters(
        cls, params: RendezvousParameters, environ: Mapping[str, str] | None = None
    ) -> RendezvousConfig:
        conf: Mapping[str, Any] = params.config
        environ = os.environ if environ is None else environ
        _warn_unknown_keys(conf)
        protocol = _protocol(conf.get("protocol"))
        tls = load_tls_files(conf, protocol)
        ttls = ProtocolTtls.from_keep_alive(
            _seconds(conf, "keep_alive_ttl", ProtocolTtls.keep_alive)
        )
        rank_policy = RankPolicy.parse(conf.get("rank_policy"), conf.get("rank0_node"))
        node_id = str(conf.get("node_id") or "").strip() or default_node_id(
            socket.gethostname(), params.local_addr, environ
        )
        return cls(
            run_id=str(params.run_id),
            endpoints=parse_endpoints(params.endpoint),
            min_nodes=int(params.min_nodes),
            max_nodes=int(params.max_nodes),
            timeout=_seconds(conf, "timeout", DEFAULT_TIMEOUT_SECONDS),
            last_call_timeout=_seconds(
                conf, "last_call_timeout", DEFAULT_LAST_CALL_TIMEOUT_SECONDS
            ),
            prefix=normalize_prefix(str(conf.get("etcd_prefix", DEFAULT_PREFIX))),
            protocol=protocol,
            tls=tls,
            etcd_api=parse_etcd_api(conf.get("etcd_api", environ.get("ETCD_RDZV_ETCD_API"))),
            credentials=Credentials.from_settings(conf, environ),
            request_timeout=_seconds(conf, "request_timeout", DEFAULT_REQUEST_TIMEOUT_SECONDS),
            ttls=ttls,
            local_addr=params.local_addr,
            telemetry=TelemetryConfig.from_settings(conf, environ),
            rank_policy=rank_policy,
            node_id=node_id,
            env_rank=env_rank(rank_policy, environ),
        )


KNOWN_KEYS = frozenset(
    {"timeout", "last_call_timeout", "etcd_prefix", "protocol", "cacert", "cert", "key",
     "keep_alive_ttl", "request_timeout", "metrics_port", "metrics_addr", "trace_file",
     "log_format", "log_level", "progress_interval", "etcd_api", "username", "password_file",
     "rank_policy", "rank0_node", "node_id"}
)  # fmt: skip


def parse_endpoints(text: str) -> tuple[EtcdEndpoint, ...]:
    """Parse `host[:port]` entries separated by commas; the port defaults to 2379."""
    if not text or not text.strip():
        raise ConfigurationError("No etcd endpoint given: pass --rdzv-endpoint HOST:PORT.")
    endpoints = []
    for raw in text.split(","):
        item = raw.strip()
        for scheme in ("http://", "https://"):
            if item.startswith(scheme):
                raise ConfigurationError(
                    f"Endpoint {item!r}: give HOST:PORT without a scheme; "
                    "TLS is chosen with the protocol setting (https)."
                )
        match = _ENDPOINT_PATTERN.match(item)
        if not match:
            raise ConfigurationError(
                f"Malformed etcd endpoint {item!r} in {text!r}: expected HOST:PORT "
                "(several separated by commas, IPv6 as [ADDR]:PORT)."
            )
        port = int(match["port"]) if match["port"] else DEFAULT_ETCD_PORT
        if not 0 < port < 65536:
            raise ConfigurationError(f"Endpoint {item!r}: port {port} is not in 1..65535.")
        endpoints.append(EtcdEndpoint(match["ipv6"] or match["host"], port))
    return tuple(endpoints)


def normalize_prefix(prefix: str) -> str:
    stripped = "/" + prefix.strip().strip("/")
    return stripped


def _check_run_id(run_id: str) -> None:
    if not _RUN_ID_PATTERN.match(run_id):
        raise ConfigurationError(
            f"Run id {run_id!r} is not usable as an etcd key component: use 1 to 128 "
            "characters without '/' or white space."
        )


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigurationError(f"{name} must be a positive number of seconds, got {value}.")


def _seconds(conf: Mapping[str, Any], key: str, default: float) -> float:
    value = conf.get(key, default)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"--rdzv-conf {key}={value!r} is not a number of seconds."
        ) from None
    _check_positive(key, seconds)
    return seconds


def _progress_interval(value: object) -> float | None:
    if value is None or value == "":
        return DEFAULT_PROGRESS_INTERVAL_SECONDS
    if str(value).strip().lower() in _DISABLED:
        return None
    return _seconds({"progress_interval": value}, "progress_interval", 0)


def _metrics_port(value: object) -> int | None:
    if value is None or value == "":
        return DEFAULT_METRICS_PORT
    if str(value).strip().lower() in _DISABLED:
        return None
    try:
        port = int(str(value))
    except ValueError:
        raise ConfigurationError(
            f"metrics_port={value!r}: give a port (0 picks a free one) or 'off'."
        ) from None
    if not 0 <= port < 65536:
        raise ConfigurationError(f"metrics_port={port} is not in 0..65535.")
    return port


def parse_etcd_api(value: object) -> EtcdApi:
    """`v3` (the default) or `v2`, from `--rdzv-conf etcd_api` or ETCD_RDZV_ETCD_API."""
    if value is None or str(value).strip().lower() in ("", "v3", "3"):
        return "v3"
    if str(value).strip().lower() in ("v2", "2"):
        return "v2"
    raise ConfigurationError(
        f"etcd_api={value!r}: use 'v3' (etcd 3.4 and later) or 'v2' (a rendezvous shared with "
        "torch's etcd backend; needs etcd 3.4/3.5 started with --enable-v2)."
    )


def _protocol(value: object) -> Protocol:
    if value is None or value == "http":
        return "http"
    if value == "https":
        return "https"
    raise ConfigurationError(f"--rdzv-conf protocol={value!r}: use 'http' or 'https'.")


def load_tls_files(conf: Mapping[str, Any], protocol: Protocol) -> TlsFiles:
    """The TLS files named in `conf` (cacert, cert, key), checked to exist and to load."""
    paths = {name: Path(str(conf[name])) for name in ("cacert", "cert", "key") if conf.get(name)}
    if paths and protocol != "https":
        raise ConfigurationError(
            f"TLS files given ({', '.join(sorted(paths))}) but protocol is http: "
            "add --rdzv-conf protocol=https."
        )
    for name, path in paths.items():
        if not path.is_file():
            raise ConfigurationError(f"--rdzv-conf {name}={path}: no such file.")
    if "key" in paths and "cert" not in paths:
        raise ConfigurationError("--rdzv-conf key= needs its certificate: add cert=PATH.")
    tls = TlsFiles(**paths)
    _check_tls_files_load(tls)
    return tls


def _check_tls_files_load(tls: TlsFiles) -> None:
    """Load the files once now, so a wrong file fails here and not in the middle of a join."""
    context = ssl.create_default_context()
    try:
        if tls.cacert:
            context.load_verify_locations(cafile=str(tls.cacert))
    except ssl.SSLError as error:
        raise ConfigurationError(
            f"--rdzv-conf cacert={tls.cacert} is not a PEM CA certificate{_why(error)}."
        ) from None
    try:
        if tls.cert:
            context.load_cert_chain(str(tls.cert), str(tls.key) if tls.key else None)
    except ssl.SSLError as error:
        raise ConfigurationError(
            f"--rdzv-conf cert={tls.cert} key={tls.key}: not a matching PEM certificate and "
            f"private key{_why(error)}."
        ) from None


def _why(error: ssl.SSLError) -> str:
    """` (OpenSSL's reason)`, or nothing where OpenSSL gives none (a file that is no PEM)."""
    reason = error.reason or re.sub(r"^\[\w+\]\s*|\s*\(_ssl\.c:\d+\)$", "", error.strerror or "")
    return f" ({reason})" if reason else ""


def _warn_unknown_keys(conf: Mapping[str, Any]) -> None:
    # `password` is refused with its own message (Credentials.from_settings), not ignored.
    unknown = sorted(set(conf) - KNOWN_KEYS - _FOREIGN_KEYS - {"password"})
    if unknown:
        log.warning(
            "etcd-rdzv ignores these --rdzv-conf keys: %s (known: %s)",
            ", ".join(unknown),
            ", ".join(sorted(KNOWN_KEYS)),
        )
