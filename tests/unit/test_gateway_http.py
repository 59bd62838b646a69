"""The v3 transport's HTTP: kept-alive connections of its unary requests and its watch
streams, against tiny local servers that misbehave on purpose (the contract with etcd itself
is tests/integration/test_kv.py, over a real etcd)."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from etcd_rdzv.config import EtcdEndpoint
from etcd_rdzv.kv.gateway_http import AnswerLost, GatewayHttp, NotSent, StreamTimedOut

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class Server:
    """Answers each request with `OK`; counts connections; can close one after answering,
    or answer nothing."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.close_after_answer = False
        self.answer = True
        self._threads: list[threading.Thread] = []
        self.stopped = threading.Event()

    def serve(self) -> None:
        # A short accept timeout: closing the listener from another thread does not wake an
        # accept on Linux, so the loop checks `stopped` between them (bounded by the test).
        self.listener.settimeout(0.05)
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            thread = threading.Thread(target=self._handle, args=(client,), daemon=True)
            # Listed before it starts: `wait_closed` must see it even if it answers at once.
            self._threads.append(thread)
            thread.start()

    def wait_closed(self) -> None:
        for thread in self._threads:
            thread.join(5)
            assert not thread.is_alive()

    def _handle(self, client: socket.socket) -> None:
        with client:
            client.settimeout(5)
            buffer = b""
            while True:
                try:
                    chunk = client.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buffer += chunk
                while b"\r\n\r\n" in buffer:
                    head, _, rest = buffer.partition(b"\r\n\r\n")
                    length = next(
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    )
                    if len(rest) < length:
                        break
                    buffer = rest[length:]
                    if not self.answer:
                        return  # close without a word
                    client.sendall(OK)
                    if self.close_after_answer:
                        return


@contextmanager
def server() -> Iterator[Server]:
    running = Server()
    thread = threading.Thread(target=running.serve, daemon=True)
    thread.start()
    try:
        yield running
    finally:
        running.stopped.set()
        thread.join(5)
        running.listener.close()


def post(http: GatewayHttp) -> tuple[int, bytes]:
    return http.post(0, "/kv/range", b"{}", {"Content-Type": "application/json"}, 2.0)


def test_requests_reuse_one_connection() -> None:
    with server() as running:
        http = GatewayHttp([EtcdEndpoint("127.0.0.1", running.port)], "/v3", None)
        assert [post(http) for _ in range(5)] == [(200, b"{}")] * 5
        http.close()
    assert running.connections == 1


def test_a_connection_the_server_closed_is_replaced_before_it_is_used() -> None:
    """As when etcd closes an idle connection or restarts between two requests."""
    with server() as running:
        running.close_after_answer = True
        http = GatewayHttp([EtcdEndpoint("127.0.0.1", running.port)], "/v3", None)
        answers = []
        for _ in range(3):
            answers.append(post(http))
            running.wait_closed()
            # The server's close reached this side (loopback may deliver it a moment later).
            for idle in http._idle[0]:
                assert idle.sock is not None
                assert select.select([idle.sock], [], [], 5)[0], "no EOF within 5 s"
        http.close()
    assert answers == [(200, b"{}")] * 3
    assert running.connections == 3


def test_a_refused_connection_is_not_sent() -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]
    http = GatewayHttp([EtcdEndpoint("127.0.0.1", port)], "/v3", None)
    with pytest.raises(NotSent, match=f"127.0.0.1:{port}"):
        post(http)


def test_a_request_without_an_answer_is_an_answer_lost() -> None:
    with server() as running:
        running.answer = False
        http = GatewayHttp([EtcdEndpoint("127.0.0.1", running.port)], "/v3", None)
        with pytest.raises(AnswerLost):
            post(http)
        http.close()


# --- watch streams ----------------------------------------------------------------------------


@contextmanager
def streaming(parts: list[bytes], then: threading.Event, *, end: bool = True) -> Iterator[int]:
    """A server that answers one request with a chunked body of `parts` (one chunk each),
    then holds the stream open until `then` is set, and ends it (`end`) or just closes it."""
    listener = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        client, _ = listener.accept()
        with client:
            client.settimeout(5)
            request = b""
            while b"\r\n\r\n" not in request:
                request += client.recv(65536)
            client.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for part in parts:
                client.sendall(b"%x\r\n%s\r\n" % (len(part), part))
            then.wait(5)
            if end:
                client.sendall(b"0\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        then.set()
        thread.join(5)
        listener.close()


def test_a_stream_yields_each_line_however_the_chunks_cut_them() -> None:
    released = threading.Event()
    parts = [b'{"a":1}\n{"b"', b":2}\n", b"\n", b'{"c":3}\n']
    with streaming(parts, released) as port:
        http = GatewayHttp([EtcdEndpoint("127.0.0.1", port)], "/v3", None)
        with http.stream(0, "/watch", b"{}", {}, connect_timeout=2, read_timeout=5) as (
            status,
            lines,
        ):
            assert status == 200
            assert [next(lines) for _ in range(3)] == [b'{"a":1}', b'{"b":2}', b'{"c":3}']
            released.set()  # the server ends the stream
            assert list(lines) == []


def test_a_stream_cut_off_mid_way_is_an_answer_lost() -> None:
    released = threading.Event()
    with streaming([b'{"created":true}\n'], released, end=False) as port:
        http = GatewayHttp([EtcdEndpoint("127.0.0.1", port)], "/v3", None)
        with http.stream(0, "/watch", b"{}", {}, connect_timeout=2, read_timeout=5) as (
            _,
            lines,
        ):
            assert next(lines) == b'{"created":true}'
            released.set()
            with pytest.raises(AnswerLost):
                next(lines)


def test_a_stream_that_sends_nothing_more_times_out_and_is_closed() -> None:
    released = threading.Event()
    with streaming([b'{"created":true}\n'], released) as port:
        http = GatewayHttp([EtcdEndpoint("127.0.0.1", port)], "/v3", None)
        with http.stream(0, "/watch", b"{}", {}, connect_timeout=2, read_timeout=0.2) as (
            _,
            lines,
        ):
            assert next(lines) == b'{"created":true}'
            with pytest.raises(StreamTimedOut):
                next(lines)
        assert not released.is_set()  # closed by the client, not by the server


def test_a_stream_to_nobody_is_not_sent() -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]
    http = GatewayHttp([EtcdEndpoint("127.0.0.1", port)], "/v3", None)
    opening = http.stream(0, "/watch", b"{}", {}, connect_timeout=2, read_timeout=2)
    with pytest.raises(NotSent, match=f"127.0.0.1:{port}"), opening:
        pass
