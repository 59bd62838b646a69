"""The etcd v2 API transport, over python-etcd.

python-etcd is used one client per endpoint with its own reconnection and urllib3's retries
turned off: both would re-send a write whose answer was lost, and a re-sent compare-and-swap
can repeat its effect. Failover and retries happen here instead, where the kind of failure
is known: a request that never reached etcd is retried anywhere; a conditional write that
may have applied raises `OutcomeUnknown`.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import Any, TypeVar

import etcd
import urllib3.exceptions

from etcd_rdzv.config import EtcdEndpoint, RendezvousConfig
from etcd_rdzv.errors import EtcdRejectedError
from etcd_rdzv.kv import advice
from etcd_rdzv.kv.base import (
    AlreadyExists,
    Change,
    CompareFailed,
    Entry,
    KeyNotFound,
    KeyValue,
    Listing,
    OutcomeUnknown,
)
from etcd_rdzv.kv.failover import Failover, WatchTimedOut
from etcd_rdzv.telemetry import Observer

T = TypeVar("T")

# Errors raised before a request left this process: nothing can have applied.
_NOT_SENT = (
    urllib3.exceptions.NewConnectionError,
    urllib3.exceptions.ConnectTimeoutError,
    urllib3.exceptions.NameResolutionError,
    ConnectionRefusedError,
    socket.gaierror,
)


class V2ApiUnavailable(EtcdRejectedError):
    """The server answers, but not the v2 API (etcd 3.6, or 3.4/3.5 without --enable-v2)."""


class EtcdV2(KeyValue):
    def __init__(self, config: RendezvousConfig, observer: Observer) -> None:
        """Connect as `config` says: its endpoints, TLS files, credentials and timeout."""
        plain_http = config.protocol == "http"
        self._failover = Failover(
            config.endpoints,
            config.request_timeout,
            observer,
            lambda error: _explain(error, plain_http),
        )
        self._clients = [_client(endpoint, config) for endpoint in config.endpoints]
        self._client_certificate = config.tls.cert is not None

    def describe(self) -> str:
        return self._failover.describe()

    # --- the interface -----------------------------------------------------------------------

    def get(self, key: str) -> Entry:
        result = self._call("get", key, idempotent=True, request=lambda c: c.read(key))
        return _entry(result)

    def create(self, key: str, value: str, ttl: float | None = None) -> Entry:
        result = self._call(
            "create",
            key,
            idempotent=False,
            request=lambda c: c.write(key, value, ttl=_ttl(ttl), prevExist=False),
        )
        return _entry(result)

    def put(self, key: str, value: str, ttl: float | None = None) -> Entry:
        result = self._call(
            "put", key, idempotent=True, request=lambda c: c.write(key, value, ttl=_ttl(ttl))
        )
        return _entry(result)

    def compare_and_swap(
        self, key: str, value: str, expected: Entry, ttl: float | None = None
    ) -> Entry:
        try:
            result = self._call(
                "compare_and_swap",
                key,
                idempotent=False,
                request=lambda c: c.write(key, value, ttl=_ttl(ttl), prevIndex=expected.revision),
            )
        except KeyNotFound:
            raise CompareFailed(key) from None
        return _entry(result)

    def compare_and_delete(self, key: str, expected: Entry) -> None:
        try:
            self._call(
                "compare_and_delete",
                key,
                idempotent=False,
                request=lambda c: c.delete(key, prevIndex=expected.revision),
            )
        except KeyNotFound:
            raise CompareFailed(key) from None

    def refresh(self, key: str, ttl: float) -> None:
        self._call("refresh", key, idempotent=True, request=lambda c: c.refresh(key, _ttl(ttl)))

    def ensure_directory(self, key: str, ttl: float | None = None) -> None:
        def create() -> None:
            self._call(
                "create",
                key,
                idempotent=False,
                request=lambda c: c.write(key, None, dir=True, prevExist=False, ttl=_ttl(ttl)),
            )

        try:
            create()
        except AlreadyExists:
            pass
        except OutcomeUnknown:
            # Applied or not: a read tells, and one that gets no answer either is an etcd that
            # never answers (a TLS-only etcd spoken to in plain HTTP closes every connection):
            # its error, with what to do, is better at start than a rendezvous that hangs.
            try:
                self.get(key)
            except KeyNotFound:
                with contextlib.suppress(AlreadyExists, OutcomeUnknown):
                    create()

    def list(self, prefix: str) -> Listing:
        result = self._call("list", prefix, idempotent=True, request=lambda c: c.read(prefix))
        read_revision = int(result.etcd_index)
        nodes: list[dict[str, Any]] = getattr(result, "_children", [])
        entries = tuple(
            Entry(
                node["key"],
                node.get("value") or "",
                int(node["modifiedIndex"]),
                read_revision,
                float(node["ttl"]) if node.get("ttl") is not None else None,
            )
            for node in nodes
            if not node.get("dir")
        )
        return Listing(entries, read_revision)

    def watch(
        self, key: str, after_revision: int, timeout: float, recursive: bool = False
    ) -> Change | None:
        if timeout <= 0:
            return None
        try:
            result = self._call(
                "watch",
                key,
                idempotent=True,
                request=lambda c: c.watch(
                    key, index=after_revision + 1, timeout=timeout, recursive=recursive
                ),
            )
        except _HistoryGone:
            return None
        if result is None:
            return None
        if result.action in ("delete", "expire", "compareAndDelete"):
            return Change(result.key, None, result.modifiedIndex)
        return Change(result.key, result.value or "", result.modifiedIndex)

    def close(self) -> None:
        for client in self._clients:
            client.http.clear()

    # --- execution ---------------------------------------------------------------------------

    def _call(
        self, operation: str, key: str, *, idempotent: bool, request: Callable[[etcd.Client], T]
    ) -> T:
        def attempt(index: int) -> T:
            try:
                return request(self._clients[index])
            except etcd.EtcdWatchTimedOut:
                raise WatchTimedOut from None

        def classify(error: Exception, where: str) -> tuple[str, Exception | None]:
            if not isinstance(error, etcd.EtcdException):
                return "error", error
            return _classify(error, key, where, idempotent, self._client_certificate)

        return self._failover.call(operation, key, attempt, classify)


class _HistoryGone(Exception):
    """etcd dropped the events a watch asked for; the caller re-reads."""


def _explain(error: Exception, plain_http: bool) -> str | None:
    """Advice when the requests never got an answer: plain HTTP to an etcd serving TLS."""
    if not plain_http or not isinstance(error, etcd.EtcdConnectionFailed):
        return None
    cause = _root_cause(error)
    if isinstance(cause, urllib3.exceptions.ProtocolError) and len(cause.args) > 1:
        cause = cause.args[1]  # ("Connection aborted.", RemoteDisconnected(...))
    return advice.PLAIN_HTTP_TO_TLS if advice.closed_without_reply(cause) else None


def _classify(
    error: etcd.EtcdException,
    key: str,
    where: str,
    idempotent: bool,
    client_certificate: bool = False,
) -> tuple[str, Exception | None]:
    """The outcome to report, and the error to raise (None: a transient failure to retry)."""
    payload = getattr(error, "payload", None) or {}
    if "404" in str(payload.get("cause", "")) and "errorCode" not in payload:
        # A plain 404 page instead of etcd's JSON error: the /v2/keys URL itself is missing.
        return "no_v2_api", V2ApiUnavailable(
            f"{where}: this etcd does not serve the v2 API (HTTP 404): etcd 3.6 and later "
            "removed it, and 3.4/3.5 serve it only with --enable-v2. Use etcd_api=v3 (the "
            "default); keep v2 only for a rendezvous shared with torch's etcd backend."
        )
    if isinstance(error, etcd.EtcdKeyNotFound):
        return "not_found", KeyNotFound(key, _index(error))
    if isinstance(error, etcd.EtcdAlreadyExist):
        return "already_exists", AlreadyExists(key)
    if isinstance(error, etcd.EtcdCompareFailed | etcd.EtcdNotFile):
        return "compare_failed", CompareFailed(key)
    if isinstance(error, etcd.EtcdEventIndexCleared | etcd.EtcdWatcherCleared):
        return "history_gone", _HistoryGone()
    if isinstance(error, etcd.EtcdInsufficientPermissions):
        return "permission_denied", EtcdRejectedError(
            f"{where}: refused ({error}). Check the etcd user and its role on this prefix."
        )
    if isinstance(error, etcd.EtcdConnectionFailed):
        cause = _root_cause(error)
        if isinstance(cause, urllib3.exceptions.SSLError | ssl.SSLError):
            return "tls_error", EtcdRejectedError(
                advice.tls_failure(where, cause, client_certificate)
            )
        if isinstance(cause, _NOT_SENT) or idempotent:
            return "unavailable", None
        return "outcome_unknown", OutcomeUnknown(f"{where}: answer lost ({cause!r})")
    if isinstance(error, etcd.EtcdLeaderElectionInProgress):
        return "leader_election", None
    if payload.get("errorCode") == 300:
        return "raft_error", None  # raft internal errors are not applied
    return "error", EtcdRejectedError(f"{where}: {error}")


def _client(endpoint: EtcdEndpoint, config: RendezvousConfig) -> etcd.Client:
    cacert, cert, key = config.tls.as_strings()
    credentials = config.credentials
    client = etcd.Client(
        username=credentials.username if credentials else None,
        password=credentials.password if credentials else None,
        host=endpoint.host,
        port=endpoint.port,
        protocol=config.protocol,
        cert=(cert, key) if cert and key else cert,
        ca_cert=cacert,
        read_timeout=config.request_timeout,
        allow_reconnect=False,
    )
    # Every retry is decided in EtcdV2._call; urllib3 would re-send PUTs on its own.
    client.http.connection_pool_kw["retries"] = False
    return client


def _entry(result: Any) -> Entry:
    ttl = float(result.ttl) if result.ttl is not None else None
    return Entry(
        result.key, result.value or "", int(result.modifiedIndex), int(result.etcd_index), ttl
    )


def _ttl(ttl: float | None) -> int | None:
    # v2 TTLs are whole seconds; never round a TTL down to zero (that means "no TTL").
    return None if ttl is None else max(1, round(ttl))


def _index(error: Exception) -> int | None:
    payload = getattr(error, "payload", None)
    if isinstance(payload, dict) and isinstance(payload.get("index"), int):
        return int(payload["index"])
    return None


def _root_cause(error: BaseException) -> BaseException:
    cause: BaseException = getattr(error, "cause", None) or error
    if isinstance(cause, urllib3.exceptions.MaxRetryError) and cause.reason is not None:
        cause = cause.reason
    return cause
