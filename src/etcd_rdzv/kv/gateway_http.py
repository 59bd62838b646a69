"""Requests to etcd's JSON gateway over `http.client`: unary ones on kept-alive connections,
watch streams each on a connection of its own.

Why not urllib3: a rendezvous is a dozen small requests and three watches per node, and on a
busy host every node's CPU is the rendezvous' latency (docs/benchmarks.md). Measured on one
node against a local etcd (`time.process_time`, issue 16): a `get` took 0.60 ms of CPU
through urllib3's pool manager and 0.26 ms through one kept-alive `http.client` connection; a
watch that sees one event took about 1 ms through urllib3 (URL parsing, pool keys, header
objects, retry bookkeeping, its chunked reader) and 0.49 ms here
(the same `watch` in a loop, the event written by another client 3 ms after it opened).

Unary connections are kept per endpoint, one per thread in flight at most (the main thread and
the keep-alive refreshers each take one), and one is dropped as soon as a request on it fails:
the next request opens a fresh one. A watch stream is closed once its caller has what it waited
for (a stream stopped mid-way cannot carry another request).

Errors are this module's own, so that the transport can tell what may have applied:
`NotSent` (no byte of the request left: refused, unresolvable, TLS handshake failed) and
`AnswerLost` (sent, no complete answer: a timeout, a reset); `ssl.SSLError` is raised as is
inside `NotSent.cause`. A watch stream's read past its time raises `StreamTimedOut`.
"""

from __future__ import annotations

import http.client
import select
import socket
import ssl
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from etcd_rdzv.config import EtcdEndpoint


class NotSent(Exception):
    """The request did not leave this process: nothing can have applied."""

    def __init__(self, endpoint: str, cause: BaseException) -> None:
        super().__init__(f"{endpoint}: {cause}")
        self.cause = cause


class AnswerLost(Exception):
    """The request was sent and no complete answer came: applied or not, nobody can tell."""

    def __init__(self, endpoint: str, cause: BaseException) -> None:
        super().__init__(f"{endpoint}: {cause!r}")
        self.cause = cause


class StreamTimedOut(Exception):
    """A watch stream sent nothing more within its read timeout."""


class GatewayHttp:
    """POST JSON bodies to a fixed set of endpoints: small requests on kept-alive connections,
    streams on fresh ones."""

    def __init__(
        self, endpoints: Sequence[EtcdEndpoint], prefix: str, tls: ssl.SSLContext | None
    ) -> None:
        self._endpoints = endpoints
        self._prefix = prefix  # "/v3"
        self._tls = tls
        self._idle: list[list[http.client.HTTPConnection]] = [[] for _ in endpoints]
        self._lock = threading.Lock()

    def post(
        self, index: int, path: str, body: bytes, headers: dict[str, str], timeout: float
    ) -> tuple[int, bytes]:
        """(status, body) of one request to endpoint `index`, within `timeout` seconds for the
        connection and again for the answer."""
        endpoint = self._endpoints[index]
        connection = self._take(index)
        fresh = connection is None
        if connection is None:
            connection = self._open(endpoint, timeout)
        else:
            connection.timeout = timeout
            if connection.sock is not None:
                connection.sock.settimeout(timeout)
        try:
            connection.request("POST", self._prefix + path, body, headers)
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            if not fresh and isinstance(error, ConnectionError | http.client.HTTPException):
                # The server closed the kept connection as this request went out; a new one
                # carries it (the write failed, so the server read none of it).
                return self.post(index, path, body, headers, timeout)
            raise NotSent(str(endpoint), error) from error
        try:
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            raise AnswerLost(str(endpoint), error) from error
        if response.will_close:
            connection.close()
        else:
            self._give_back(index, connection)
        return response.status, data

    @contextmanager
    def stream(
        self,
        index: int,
        path: str,
        body: bytes,
        headers: dict[str, str],
        *,
        connect_timeout: float,
        read_timeout: float,
    ) -> Iterator[tuple[int, Iterator[bytes]]]:
        """A streamed POST to endpoint `index`: its status and its body, line by line (the
        gateway sends one JSON message per line), each awaited up to `read_timeout`. The
        connection is closed when the block ends."""
        endpoint = self._endpoints[index]
        connection = self._open(endpoint, connect_timeout)
        try:
            try:
                connection.request("POST", self._prefix + path, body, headers)
            except (OSError, http.client.HTTPException) as error:
                raise NotSent(str(endpoint), error) from error
            assert connection.sock is not None
            connection.sock.settimeout(read_timeout)
            try:
                response = connection.getresponse()
            except TimeoutError:
                raise StreamTimedOut() from None
            except (OSError, http.client.HTTPException) as error:
                raise AnswerLost(str(endpoint), error) from error
            yield response.status, _lines(response, str(endpoint))
        finally:
            connection.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, [[] for _ in self._endpoints]
        for connections in idle:
            for connection in connections:
                connection.close()

    def _open(self, endpoint: EtcdEndpoint, timeout: float) -> http.client.HTTPConnection:
        connection: http.client.HTTPConnection
        if self._tls is None:
            connection = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=timeout)
        else:
            connection = http.client.HTTPSConnection(
                endpoint.host, endpoint.port, timeout=timeout, context=self._tls
            )
        try:
            connection.connect()
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            raise NotSent(str(endpoint), error) from error
        assert connection.sock is not None
        # Small requests, each awaited: do not hold one back for the previous one's ACK.
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection

    def _take(self, index: int) -> http.client.HTTPConnection | None:
        while True:
            with self._lock:
                if not self._idle[index]:
                    return None
                connection = self._idle[index].pop()
            if not _dropped(connection):
                return connection
            connection.close()

    def _give_back(self, index: int, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            self._idle[index].append(connection)


def _lines(response: http.client.HTTPResponse, endpoint: str) -> Iterator[bytes]:
    """The non-empty lines of a streamed body, as they arrive; the last one even without its
    newline."""
    buffered = b""
    while True:
        try:
            chunk = response.read1(65536)
        except TimeoutError:
            raise StreamTimedOut() from None
        except (OSError, http.client.HTTPException) as error:
            raise AnswerLost(endpoint, error) from error
        if not chunk:
            if buffered.strip():
                yield buffered
            return
        buffered += chunk
        *lines, buffered = buffered.split(b"\n")
        yield from (line for line in lines if line.strip())


def _dropped(connection: http.client.HTTPConnection) -> bool:
    """Whether an idle connection was closed by the server (it is readable: EOF, or data
    nobody asked for)."""
    sock = connection.sock
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)
