"""The kept-alive connections of the v3 transport's unary requests, against a tiny local
server that can misbehave on purpose (the contract with etcd itself is tests/integration/
test_kv.py, over a real etcd)."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from etcd_rdzv.config import EtcdEndpoint
from etcd_rdzv.kv.unary import AnswerLost, NotSent, UnaryHttp

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


def post(http: UnaryHttp) -> tuple[int, bytes]:
    return http.post(0, "/kv/range", b"{}", {"Content-Type": "application/json"}, 2.0)


def test_requests_reuse_one_connection() -> None:
    with server() as running:
        http = UnaryHttp([EtcdEndpoint("127.0.0.1", running.port)], "/v3", None)
        assert [post(http) for _ in range(5)] == [(200, b"{}")] * 5
        http.close()
    assert running.connections == 1


def test_a_connection_the_server_closed_is_replaced_before_it_is_used() -> None:
    """As when etcd closes an idle connection or restarts between two requests."""
    with server() as running:
        running.close_after_answer = True
        http = UnaryHttp([EtcdEndpoint("127.0.0.1", running.port)], "/v3", None)
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
    http = UnaryHttp([EtcdEndpoint("127.0.0.1", port)], "/v3", None)
    with pytest.raises(NotSent, match=f"127.0.0.1:{port}"):
        post(http)


def test_a_request_without_an_answer_is_an_answer_lost() -> None:
    with server() as running:
        running.answer = False
        http = UnaryHttp([EtcdEndpoint("127.0.0.1", running.port)], "/v3", None)
        with pytest.raises(AnswerLost):
            post(http)
        http.close()
