"""The throwaway etcd servers the other tests stand on."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from etcd_rdzv_devtools.local_etcd import LocalEtcd, LocalEtcdError, start_local_etcd_cluster
from tests.conftest import only_etcd_api

if TYPE_CHECKING:
    from tests.conftest import EtcdFactory

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def put_v2(server: LocalEtcd, key: str, value: str, timeout: float = 2.0) -> None:
    request = urllib.request.Request(
        f"{server.client_url}/v2/keys/{key}",
        data=urllib.parse.urlencode({"value": value}).encode(),
        method="PUT",
    )
    with _DIRECT.open(request, timeout=timeout) as response:
        assert response.status in (200, 201)


def get_v2(server: LocalEtcd, key: str, timeout: float = 2.0) -> str:
    # quorum=true: a plain v2 read is served locally, and a follower may not have applied the
    # latest write yet.
    url = f"{server.client_url}/v2/keys/{key}?quorum=true"
    with _DIRECT.open(url, timeout=timeout) as response:
        body: dict[str, Any] = json.loads(response.read())
    return str(body["node"]["value"])


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@only_etcd_api("v2")  # probes the server through the v2 HTTP API
def test_serves_v2_on_loopback_and_stop_ends_the_process(etcd_factory: EtcdFactory) -> None:
    server = etcd_factory()
    assert server.endpoint == f"127.0.0.1:{server.client_port}"
    assert server.client_url == f"http://127.0.0.1:{server.client_port}"
    put_v2(server, "hello", "world")
    assert get_v2(server, "hello") == "world"
    assert "etcd_server_has_leader 1" in server.metrics_text()

    pid = server.pid
    assert pid is not None
    server.stop()
    assert not server.is_running()
    assert not process_exists(pid), "stop() returned but the etcd process still exists"
    server.stop()  # idempotent


@only_etcd_api("v2")  # probes the server through the v2 HTTP API
def test_restart_keeps_ports_and_data(etcd_factory: EtcdFactory) -> None:
    server = etcd_factory()
    put_v2(server, "kept", "across-restart")
    ports = (server.client_port, server.peer_port)
    old_pid = server.pid

    server.restart()

    assert (server.client_port, server.peer_port) == ports
    assert server.pid != old_pid
    assert get_v2(server, "kept") == "across-restart"


@only_etcd_api("v2")  # probes the server through the v2 HTTP API
def test_kill_is_a_crash_and_restart_recovers(etcd_factory: EtcdFactory) -> None:
    server = etcd_factory()
    put_v2(server, "durable", "yes")
    server.kill()
    assert not server.is_running()
    server.restart()
    assert get_v2(server, "durable") == "yes"


@only_etcd_api("v2")  # probes the server through the v2 HTTP API
def test_paused_server_answers_nothing_until_resumed(etcd_factory: EtcdFactory) -> None:
    server = etcd_factory()
    server.pause()
    try:
        with pytest.raises((TimeoutError, urllib.error.URLError)):
            get_v2(server, "anything", timeout=0.5)
    finally:
        server.resume()
    server.wait_ready(timeout=10.0)
    put_v2(server, "after-pause", "ok")
    assert get_v2(server, "after-pause") == "ok"


@only_etcd_api("v2")  # probes the server through the v2 HTTP API
def test_stop_ends_a_paused_server(etcd_factory: EtcdFactory) -> None:
    server = etcd_factory()
    pid = server.pid
    assert pid is not None
    server.pause()
    started = time.monotonic()
    server.stop()
    assert not process_exists(pid)
    # Ended by SIGTERM once continued, not by the kill after the stop timeout.
    assert time.monotonic() - started < 5.0


@only_etcd_api("v2")  # probes the server through the v2 HTTP API
def test_failed_start_reports_the_log_tail(etcd_factory: EtcdFactory) -> None:
    with pytest.raises(LocalEtcdError) as caught:
        etcd_factory(extra_args=("--no-such-flag",))
    message = str(caught.value)
    assert "exited" in message
    assert "flag provided but not defined: -no-such-flag" in message


@only_etcd_api("v2")  # probes the server through the v2 HTTP API
def test_v2_can_be_left_off(etcd_factory: EtcdFactory) -> None:
    server = etcd_factory(enable_v2=False)
    with pytest.raises(urllib.error.HTTPError) as caught:
        put_v2(server, "anything", "v")
    assert caught.value.code == 404


def test_three_member_cluster_survives_losing_one(tmp_path: Path) -> None:
    with start_local_etcd_cluster(3, root_dir=tmp_path) as cluster:
        first, second, third = cluster.members
        assert cluster.endpoints == f"{first.endpoint},{second.endpoint},{third.endpoint}"
        put_v2(first, "replicated", "v")
        first.kill()
        # If the killed member led, the others first elect a new leader (about a second).
        second.wait_ready(timeout=15.0)
        assert get_v2(second, "replicated") == "v"
        put_v2(third, "after-loss", "still-quorate")
        assert get_v2(second, "after-loss") == "still-quorate"
    assert not any(member.is_running() for member in cluster.members)
