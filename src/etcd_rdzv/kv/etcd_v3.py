"""The etcd v3 API transport: a small client of etcd's gRPC gateway (JSON over HTTP).

Requests go over `http.client` (`kv/gateway_http.py`): unary ones on kept-alive connections,
each watch stream on a fresh one; a third of the CPU urllib3's pool manager took.

Why our own client: the maintained gRPC clients are asyncio-only or pin old protobuf, and the
one gateway client retries on its own; see docs/etcd-v3.md for the evaluation. The gateway is
served by every etcd from 3.4 on at `/v3/`, needs no generated code, and gives the same
control over failover and retries as the v2 transport: a request that may have applied is never
re-sent blindly; it raises `OutcomeUnknown`.

How v2 ideas map onto v3:
- A TTL key is a key attached to a lease of its own. Leases are granted one second longer than
  asked, so a lease left unused by a lost compare-and-swap can serve the retry within a second
  and the key still lives at least its TTL. `refresh` is a lease keep-alive.
- A v2 directory with a TTL (the run directory) becomes a marker key attached to a lease, and
  every key written below it without a TTL of its own is attached to that lease: the run's keys
  still vanish together when the last agent stops refreshing the run. Agents find the lease on
  the marker, so any of them keeps it alive.
- Revisions are `mod_revision`s; compare-and-swap is a transaction on `mod_revision`.
"""

from __future__ import annotations

import base64
import json
import math
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from etcd_rdzv.config import Credentials, RendezvousConfig
from etcd_rdzv.errors import CorruptStateError, EtcdRejectedError
from etcd_rdzv.kv import advice
from etcd_rdzv.kv.base import (
    AlreadyExists,
    Change,
    Claim,
    CompareFailed,
    Entry,
    KeyNotFound,
    KeyValue,
    KvError,
    Listing,
    OutcomeUnknown,
)
from etcd_rdzv.kv.failover import Failover, WatchTimedOut
from etcd_rdzv.kv.gateway_http import AnswerLost, GatewayHttp, NotSent, StreamTimedOut
from etcd_rdzv.telemetry import Observer

Json = dict[str, Any]

# Errors raised before a request left this process: nothing can have applied.
_NOT_SENT = (NotSent,)
# The request was sent and the answer lost: applied or not, nobody can tell.
_ANSWER_LOST = (AnswerLost,)

# gRPC status codes the gateway reports in `code`.
_INVALID_ARGUMENT = 3
_NOT_FOUND = 5
_PERMISSION_DENIED = 7
_RESOURCE_EXHAUSTED = 8
_OUT_OF_RANGE = 11
_UNAVAILABLE = 14
_DEADLINE_EXCEEDED = 4
_UNAUTHENTICATED = 16

# etcd answers these before proposing anything: safe to retry any request.
_NOT_APPLIED = ("no leader", "too many requests", "not capable")
# The same outcome labels as the v2 transport reports for these answers.
_ANSWER_OUTCOMES: dict[type[KvError], str] = {
    KeyNotFound: "not_found",
    AlreadyExists: "already_exists",
    CompareFailed: "compare_failed",
}
# Leases granted this much longer than asked; a spare lease serves retries for as long.
_LEASE_MARGIN_SECONDS = 1.0


class V3ApiUnavailable(EtcdRejectedError):
    """The server answers HTTP but serves no v3 JSON gateway at /v3/ (etcd before 3.4)."""


# etcd's gateway, with client-certificate auth and user auth both on, refuses any request
# whose client certificate has a Common Name: over gRPC etcd would take the CN for the user,
# and through the gateway it cannot (etcd's embed/serve.go, v3.4).
_COMMON_NAME_REFUSED = "CommonName of client sending a request against gateway"
_COMMON_NAME_ADVICE = (
    "etcd refuses requests from a client certificate with a Common Name (CN) while it runs "
    "with both client certificate auth (--client-cert-auth) and etcd users (auth enabled): "
    "its JSON gateway, the v3 API this client speaks, cannot take the CN for the user, as "
    "gRPC clients do. Use a client certificate without a CN (the user then comes from "
    "username= and its password), or client certificates without etcd users (auth "
    "disabled). See docs/reliability.md#security."
)


class _GatewayError(Exception):
    def __init__(self, status: int, code: int | None, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class _AuthenticationFailed(Exception):
    def __init__(self, username: str) -> None:
        super().__init__(username)
        self.username = username


class _LeaseGone(Exception):
    """A write named a lease that has expired."""


class _HistoryGone(Exception):
    """etcd compacted the revisions a watch asked for; the caller re-reads."""


class _StreamEnded(Exception):
    """The server closed a watch stream without an event (it is shutting down)."""


@dataclass(frozen=True)
class _Guard:
    """The compares of a conditional write, and what a refused one means.

    A refused transaction runs the `otherwise` reads, so that `refusal` can build its error
    from them (the key's current entry) and the caller needs no read of its own.
    """

    compares: list[Json]
    refusal: Callable[[Json], KvError]
    otherwise: list[Json]
    # More operations in the same transaction, after the put, when it applies.
    then: list[Json] = field(default_factory=list)

    def check(self, reply: Json) -> None:
        if not reply.get("succeeded"):
            raise self.refusal(reply)


class EtcdV3(KeyValue):
    supports_claims = True

    def __init__(self, config: RendezvousConfig, observer: Observer) -> None:
        """Connect as `config` says: its endpoints, TLS files, credentials and timeout."""
        endpoints = config.endpoints
        plain_http = config.protocol == "http"
        self._failover = Failover(
            endpoints, config.request_timeout, observer, lambda error: _explain(error, plain_http)
        )
        self._credentials = config.credentials
        self._client_certificate = config.tls.cert is not None
        # The auth token of the endpoint that issued it; any endpoint accepts it.
        self._token: str | None = None
        self._request_timeout = config.request_timeout
        # Unary requests on kept-alive connections, watch streams on fresh ones (see the module).
        self._http = GatewayHttp(
            endpoints, "/v3", config.tls.client_context() if config.protocol == "https" else None
        )
        self._lock = threading.Lock()
        # The lease of each TTL key this process wrote, so a refresh needs no read.
        self._key_leases: dict[str, int] = {}
        # Directory marker key -> (lease, ttl) that keys below it without a TTL attach to.
        self._directories: dict[str, tuple[int, float]] = {}
        # Leases granted for a write that lost its compare: no key uses them yet.
        self._spares: dict[int, tuple[int, float]] = {}

    def describe(self) -> str:
        return self._failover.describe()

    # --- the interface -----------------------------------------------------------------------

    def get(self, key: str) -> Entry:
        def found(reply: Json) -> None:
            if not reply.get("kvs"):
                raise KeyNotFound(key, _revision(reply))

        reply = self._call(
            "get", key, "/kv/range", {"key": _encode(key)}, idempotent=True, check=found
        )
        return _entry(reply["kvs"][0], _revision(reply))

    def create(self, key: str, value: str, ttl: float | None = None) -> Entry:
        guard = _Guard(
            [_absent(key)], lambda reply: AlreadyExists(key, _ranged(reply, 0)), [_read(key)]
        )
        revision = _revision(self._write("create", key, value, ttl, guard))
        return Entry(key, value, revision, revision, ttl)

    def put(self, key: str, value: str, ttl: float | None = None) -> Entry:
        revision = _revision(self._write("put", key, value, ttl))
        return Entry(key, value, revision, revision, ttl)

    def compare_and_swap(
        self, key: str, value: str, expected: Entry, ttl: float | None = None
    ) -> Entry:
        guard = _Guard(
            [_unchanged(expected)],
            lambda reply: CompareFailed(key, _ranged(reply, 0)),
            [_read(key)],
        )
        revision = _revision(self._write("compare_and_swap", key, value, ttl, guard))
        return Entry(key, value, revision, revision, ttl)

    def claim(
        self, key: str, value: str, *, guard: Entry, queue: str, ttl: float | None = None
    ) -> Claim:
        def refusal(reply: Json) -> KvError:
            current = _ranged(reply, 0)
            if current is not None and current.revision == guard.revision:
                return AlreadyExists(key)
            return CompareFailed(guard.key, current)

        claimed = _Guard(
            [_unchanged(guard), _absent(key)], refusal, [_read(guard.key)], then=[_count(queue)]
        )
        reply = self._write("claim", key, value, ttl, claimed)
        revision = _revision(reply)
        position = int(reply["responses"][1]["response_range"].get("count", 0))
        return Claim(Entry(key, value, revision, revision, ttl), position)

    def compare_and_delete(self, key: str, expected: Entry) -> None:
        txn = {
            "compare": [_unchanged(expected)],
            "success": [{"request_delete_range": {"key": _encode(key)}}],
        }
        self._call(
            "compare_and_delete", key, "/kv/txn", txn, idempotent=False,
            check=_succeeded(CompareFailed(key)),
        )  # fmt: skip
        with self._lock:
            self._key_leases.pop(key, None)

    def refresh(self, key: str, ttl: float) -> None:
        lease = self._lease_of(key)

        def alive(reply: Json) -> None:
            # The keep-alive endpoint streams; one request gets one `result`. No TTL: expired.
            result = reply.get("result", reply)
            if int(result.get("TTL", 0)) <= 0:
                raise KeyNotFound(key, _revision(result))

        try:
            self._call(
                "refresh", key, "/lease/keepalive", {"ID": str(lease)}, idempotent=True,
                check=alive,
            )  # fmt: skip
        except KeyNotFound:
            with self._lock:
                self._key_leases.pop(key, None)
                self._directories.pop(key, None)
            raise

    def ensure_directory(self, key: str, ttl: float | None = None) -> None:
        """v3 has no directories; one with a TTL becomes a marker key holding its lease."""
        if ttl is None:
            return
        lease = self._directory_lease(key, ttl)
        if lease is not None:
            with self._lock:
                self._directories[key] = (lease, ttl)

    def list(self, prefix: str) -> Listing:
        """The keys directly below `prefix`; an absent prefix is an empty listing over v3."""
        start = prefix.rstrip("/") + "/"
        body = {"key": _encode(start), "range_end": _encode(_prefix_end(start))}
        reply = self._call("list", prefix, "/kv/range", body, idempotent=True)
        revision = _revision(reply)
        entries = (_entry(kv, revision) for kv in reply.get("kvs", ()))
        return Listing(
            tuple(entry for entry in entries if "/" not in entry.key[len(start) :]), revision
        )

    def watch(
        self, key: str, after_revision: int, timeout: float, recursive: bool = False
    ) -> Change | None:
        """As the interface says; for a single key, the change may be a later one than the first.

        etcd delivers the events of a watch that starts in the past (the store moved on since
        the caller's read) only on its syncs of lagging watchers, every 100 ms, and keeps such
        a watcher lagging until one. So a single-key watch starts at the present, and when the
        stream's first answer shows the store has moved past `after_revision`, one read of the
        key covers the gap: the caller gets the key's latest value, which is what it wants
        anyway, and any later change comes at once. A recursive watch starts right after
        `after_revision`, lagging or not: no read would show it a deletion in the gap.
        """
        if timeout <= 0:
            return None
        create: Json = {"key": _encode(key)}
        if recursive:
            start = key.rstrip("/") + "/"
            create.update(
                key=_encode(start),
                range_end=_encode(_prefix_end(start)),
                start_revision=str(after_revision + 1),
            )

        def changed_since() -> Change | None:
            try:
                entry = self.get(key)
            except KeyNotFound:
                return None  # a deletion, or never there: the stream will tell which
            if entry.revision <= after_revision:
                return None
            return Change(key, entry.value, entry.revision)

        def request(index: int) -> Change:
            shortcut = None if recursive else changed_since
            return self._first_event(
                index, {"create_request": create}, after_revision, timeout, shortcut
            )

        try:
            return self._failover.call("watch", key, request, self._classifier(key, True))
        except _HistoryGone:
            return None

    def time_left(self, entry: Entry) -> float | None:
        if not entry.lease:
            return None
        reply = self._call(
            "get", entry.key, "/lease/timetolive", {"ID": str(entry.lease)}, idempotent=True
        )
        return max(0.0, float(reply.get("TTL", 0)))

    def close(self) -> None:
        self._http.close()

    # --- leases ------------------------------------------------------------------------------

    def _write(
        self, operation: str, key: str, value: str, ttl: float | None, guard: _Guard | None = None
    ) -> Json:
        """Put `value`; with a `guard`, in a transaction that puts only if its compares hold and
        raises its refusal otherwise. Returns etcd's reply."""
        for attempt in range(2):
            lease, granted = self._lease_for(key, ttl)
            put = {"key": _encode(key), "value": _encode(value), "lease": str(lease)}
            try:
                if guard is None:
                    reply = self._call(operation, key, "/kv/put", put, idempotent=True)
                else:
                    txn = {
                        "compare": guard.compares,
                        "success": [{"request_put": put}, *guard.then],
                        "failure": guard.otherwise,
                    }
                    reply = self._call(
                        operation, key, "/kv/txn", txn, idempotent=False, check=guard.check
                    )
            except (AlreadyExists, CompareFailed):
                if granted and ttl is not None:
                    self._keep_spare(lease, ttl)
                raise
            except _LeaseGone:
                # The directory's lease expired under us (every agent stopped refreshing it):
                # give the directory a new one and write once more.
                if attempt or not self._renew_directory_of(key):
                    raise EtcdRejectedError(
                        f"etcd at {self.describe()}: the lease of {key} expired"
                    ) from None
                continue
            with self._lock:
                if granted:
                    self._key_leases[key] = lease
                else:
                    self._key_leases.pop(key, None)
            return reply
        raise AssertionError("unreachable: the loop returns or raises")

    def _lease_for(self, key: str, ttl: float | None) -> tuple[int, bool]:
        """(lease, granted for this key); without a TTL, the enclosing directory's lease or 0."""
        if ttl is not None:
            return self._grant(ttl), True
        with self._lock:
            directory = self._directory_of(key)
            return (0 if directory is None else self._directories[directory][0]), False

    def _grant(self, ttl: float) -> int:
        seconds = _lease_seconds(ttl)
        with self._lock:
            spare = self._spares.pop(seconds, None)
        if spare is not None and time.monotonic() - spare[1] < _LEASE_MARGIN_SECONDS:
            return spare[0]
        reply = self._call(
            "grant_lease", f"ttl={seconds}", "/lease/grant", {"TTL": str(seconds)}, idempotent=False
        )
        return int(reply["ID"])

    def _keep_spare(self, lease: int, ttl: float) -> None:
        with self._lock:
            self._spares[_lease_seconds(ttl)] = (lease, time.monotonic())

    def _lease_of(self, key: str) -> int:
        with self._lock:
            if key in self._directories:
                return self._directories[key][0]
            if key in self._key_leases:
                return self._key_leases[key]
        lease = self.get(key).lease  # a key this process did not write
        if not lease:
            raise EtcdRejectedError(f"etcd at {self.describe()}: {key} has no TTL to refresh")
        return lease

    def _directory_lease(self, key: str, ttl: float) -> int | None:
        """The lease on the directory's marker key, creating both if absent.

        None for a marker without a lease: keys below it stay permanent, as written there.
        """
        try:
            return self.get(key).lease or None
        except KeyNotFound:
            pass
        lease = self._grant(ttl)
        marker = _encode(key)
        txn = {
            "compare": [_absent(key)],
            "success": [{"request_put": {"key": marker, "lease": str(lease)}}],
        }
        try:
            if self._call("create", key, "/kv/txn", txn, idempotent=False).get("succeeded"):
                return lease
        except OutcomeUnknown:
            pass
        # Another agent created the marker first (or our lost write did): use what is there.
        self._keep_spare(lease, ttl)
        try:
            return self.get(key).lease or None
        except KeyNotFound:
            return None

    def _renew_directory_of(self, key: str) -> bool:
        with self._lock:
            directory = self._directory_of(key)
            if directory is None:
                return False
            _, ttl = self._directories.pop(directory)
        self.ensure_directory(directory, ttl)
        return True

    def _directory_of(self, key: str) -> str | None:
        """The innermost directory with a lease that `key` lies below; hold the lock."""
        enclosing = [d for d in self._directories if key.startswith(d.rstrip("/") + "/")]
        return max(enclosing, key=len) if enclosing else None

    # --- execution ---------------------------------------------------------------------------

    def _call(
        self,
        operation: str,
        key: str,
        path: str,
        body: Json,
        *,
        idempotent: bool,
        check: Callable[[Json], None] | None = None,
    ) -> Json:
        """POST `body`; `check` raises the KvError a well-formed refusal means (a failed compare),
        inside the request so that its metrics count it like the v2 transport does."""

        def request(index: int) -> Json:
            status, data = self._http.post(
                index,
                path,
                json.dumps(body).encode(),
                self._headers(index),
                self._request_timeout,
            )
            reply = _json(data)
            if status != 200 or not isinstance(reply, dict):
                raise _gateway_error(status, reply, data)
            if check is not None:
                check(reply)
            return reply

        return self._failover.call(operation, key, request, self._classifier(key, idempotent))

    def _first_event(
        self,
        index: int,
        create: Json,
        after_revision: int,
        timeout: float,
        shortcut: Callable[[], Change | None] | None,
    ) -> Change:
        """Open a watch stream and wait for its first event; WatchTimedOut if none comes.

        `shortcut` is asked once, if the store has moved past `after_revision`.
        """
        give_up_at = time.monotonic() + timeout
        stream = self._http.stream(
            index,
            "/watch",
            json.dumps(create).encode(),
            self._headers(index),
            connect_timeout=self._request_timeout,
            read_timeout=timeout,
        )
        try:
            with stream as (status, lines):
                if status != 200:
                    data = b"".join(lines)
                    raise _gateway_error(status, _json(data), data)
                for line in lines:
                    message = _json(line)
                    if not isinstance(message, dict):
                        raise _gateway_error(status, message, line)
                    if "error" in message:
                        raise _stream_error(message["error"])
                    result = message.get("result", {})
                    if result.get("canceled") or "compact_revision" in result:
                        raise _HistoryGone()
                    # A lagging member may start a watch at the present before `after_revision`.
                    changes = [_change(event) for event in result.get("events", ())]
                    changes = [change for change in changes if change.revision > after_revision]
                    if changes:
                        return changes[0]
                    if result.get("created") and shortcut and _revision(result) > after_revision:
                        change = shortcut()
                        if change is not None:
                            return change
                    if time.monotonic() >= give_up_at:
                        raise WatchTimedOut()
                raise _StreamEnded()
        except StreamTimedOut:
            raise WatchTimedOut() from None

    def _headers(self, index: int) -> dict[str, str]:
        # Accept, though JSON is the only answer: etcd tells a request that came through its
        # gateway by the metadata the gateway makes of this header. Without it, with client
        # certificate auth and users on, a request without a token is authorized as the user
        # the *server* certificate's CN names, which the gateway presents to etcd's gRPC port
        # (docs/reliability.md#security): an agent without credentials would borrow it.
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._credentials is not None:
            with self._lock:
                token = self._token
            if token is None:
                token = self._authenticate(index, self._credentials)
            # The raw token, no "Bearer": that is what etcd's gateway expects.
            headers["Authorization"] = token
        return headers

    def _authenticate(self, index: int, credentials: Credentials) -> str:
        """A token for `credentials`, asked of endpoint `index` (inside a request attempt, so
        its failures are classified and retried like the request's own)."""
        body = {"name": credentials.username, "password": credentials.password}
        status, data = self._http.post(
            index,
            "/auth/authenticate",
            json.dumps(body).encode(),
            {"Content-Type": "application/json", "Accept": "application/json"},
            self._request_timeout,
        )
        reply = _json(data)
        if status != 200 or not isinstance(reply, dict) or "token" not in reply:
            error = _gateway_error(status, reply, data)
            if error.code == _INVALID_ARGUMENT and "authentication failed" in error.message:
                raise _AuthenticationFailed(credentials.username)
            raise error
        token = str(reply["token"])
        with self._lock:
            self._token = token
        return token

    def _classifier(
        self, key: str, idempotent: bool
    ) -> Callable[[Exception, str], tuple[str, Exception | None]]:
        def classify(error: Exception, where: str) -> tuple[str, Exception | None]:
            if isinstance(error, _GatewayError) and _token_expired(error):
                if self._credentials is not None:
                    with self._lock:
                        self._token = None  # the next attempt authenticates again
                    return "auth_token_expired", None
                return "unauthenticated", EtcdRejectedError(
                    f"{where}: etcd requires authentication ({error.message}). Set --rdzv-conf "
                    "username=NAME and the password in ETCD_RDZV_PASSWORD or password_file."
                )
            return _classify(error, key, where, idempotent, self._client_certificate)

        return classify


def _explain(error: Exception, plain_http: bool) -> str | None:
    """Advice when the requests never got an answer: plain HTTP to an etcd serving TLS."""
    if plain_http and isinstance(error, AnswerLost) and advice.closed_without_reply(error.cause):
        return advice.PLAIN_HTTP_TO_TLS
    return None


def _classify(
    error: Exception, key: str, where: str, idempotent: bool, client_certificate: bool = False
) -> tuple[str, Exception | None]:
    """The outcome to report, and the error to raise (None: a transient failure to retry)."""
    if isinstance(error, KvError):
        return _ANSWER_OUTCOMES.get(type(error), "error"), error
    if isinstance(error, _HistoryGone):
        return "history_gone", error
    if isinstance(error, _AuthenticationFailed):
        return "unauthenticated", EtcdRejectedError(
            f"{where}: etcd refused user {error.username!r}: wrong user name or password."
        )
    if isinstance(error, _StreamEnded):
        return "unavailable", None
    tls_failure = error.cause if isinstance(error, NotSent) else error
    if isinstance(tls_failure, ssl.SSLError):
        return "tls_error", EtcdRejectedError(
            advice.tls_failure(where, tls_failure, client_certificate)
        )
    if isinstance(error, _NOT_SENT):
        return "unavailable", None
    if isinstance(error, _ANSWER_LOST):
        if idempotent:
            return "unavailable", None
        return "outcome_unknown", OutcomeUnknown(f"{where}: answer lost ({error!r})")
    if not isinstance(error, _GatewayError):
        return "error", error
    message = error.message
    if error.code is None:
        if _COMMON_NAME_REFUSED in message:
            return "error", EtcdRejectedError(f"{where}: {_COMMON_NAME_ADVICE}")
        if error.status == 404:
            return "no_v3_api", V3ApiUnavailable(
                f"{where}: this server does not serve etcd's v3 JSON API at /v3/ (HTTP 404). "
                "etcd 3.4 or later is needed for etcd_api=v3; with an older etcd started "
                "with v2 on, use etcd_api=v2."
            )
        return "error", EtcdRejectedError(f"{where}: HTTP {error.status}: {message}")
    if error.code == _NOT_FOUND and "lease not found" in message:
        return "lease_not_found", _LeaseGone(message)
    if error.code == _OUT_OF_RANGE and "compacted" in message:
        return "history_gone", _HistoryGone()
    if error.code == _PERMISSION_DENIED:
        return "permission_denied", EtcdRejectedError(
            f"{where}: refused ({message}). Check the etcd user and its role on this prefix."
        )
    if error.code in (_UNAVAILABLE, _DEADLINE_EXCEEDED, _RESOURCE_EXHAUSTED):
        if any(reason in message for reason in _NOT_APPLIED):
            return "leader_election", None
        if idempotent:
            return "unavailable", None
        return "outcome_unknown", OutcomeUnknown(f"{where}: {message}")
    return "error", EtcdRejectedError(f"{where}: {message} (gRPC code {error.code})")


def _token_expired(error: _GatewayError) -> bool:
    """A token etcd no longer takes (expired, or the auth store changed), or none at all."""
    if error.code == _UNAUTHENTICATED:
        return True
    return error.code == _INVALID_ARGUMENT and any(
        reason in error.message
        for reason in ("revision of auth store is old", "user name is empty", "invalid auth token")
    )


def _gateway_error(status: int, reply: Json | None, raw: bytes) -> _GatewayError:
    if reply is None or "code" not in reply:
        return _GatewayError(status, None, raw[:200].decode(errors="replace").strip())
    message = reply.get("message") or reply.get("error")
    return _GatewayError(status, int(reply["code"]), str(message))


def _stream_error(error: Any) -> _GatewayError:
    if not isinstance(error, dict):
        return _GatewayError(200, None, str(error))
    return _GatewayError(
        int(error.get("http_code", 200)), int(error.get("grpc_code", 2)), str(error.get("message"))
    )


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


def _succeeded(refusal: KvError) -> Callable[[Json], None]:
    def check(reply: Json) -> None:
        if not reply.get("succeeded"):
            raise refusal

    return check


def _absent(key: str) -> Json:
    return {"key": _encode(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}


def _read(key: str) -> Json:
    return {"request_range": {"key": _encode(key)}}


def _count(prefix: str) -> Json:
    span = {"key": _encode(prefix), "range_end": _encode(_prefix_end(prefix))}
    return {"request_range": {**span, "count_only": True}}


def _ranged(reply: Json, index: int) -> Entry | None:
    """The key that the `index`-th operation of a transaction read; None when absent."""
    kvs = reply["responses"][index]["response_range"].get("kvs")
    return _entry(kvs[0], _revision(reply)) if kvs else None


def _unchanged(expected: Entry) -> Json:
    return {
        "key": _encode(expected.key),
        "target": "MOD",
        "result": "EQUAL",
        "mod_revision": str(expected.revision),
    }


def _entry(kv: Json, read_revision: int) -> Entry:
    key = _decode(kv["key"])
    return Entry(
        key,
        _decode(kv.get("value", ""), key),
        int(kv.get("mod_revision", 0)),
        read_revision,
        lease=int(kv.get("lease", 0)),
    )


def _change(event: Json) -> Change:
    kv = event.get("kv", {})
    # The gateway omits enum zero values: an event without `type` is a PUT.
    key = _decode(kv["key"])
    value = None if event.get("type") == "DELETE" else _decode(kv.get("value", ""), key)
    return Change(key, value, int(kv.get("mod_revision", 0)))


def _revision(reply: Json) -> int:
    return int(reply.get("header", {}).get("revision", 0))


def _lease_seconds(ttl: float) -> int:
    return max(1, math.ceil(ttl + _LEASE_MARGIN_SECONDS))


def _encode(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def _decode(data: str, key: str | None = None) -> str:
    """Text from the gateway's base64. etcd-rdzv writes only UTF-8, so other bytes are not ours:
    an error that names the key, never a silent U+FFFD that a rewrite would then keep."""
    raw = base64.b64decode(data)
    try:
        return raw.decode()
    except UnicodeDecodeError as error:
        raise CorruptStateError(
            key or "(a key)", f"not UTF-8 text ({error.reason})", repr(raw)
        ) from None


def _prefix_end(prefix: str) -> str:
    """The smallest key after every key that starts with `prefix`."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)
