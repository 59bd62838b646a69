"""Keep-alive refreshers against a real etcd that stops answering for a while."""

from __future__ import annotations

from etcd_rdzv.leases import KeepAlive
from etcd_rdzv.telemetry import Observer
from etcd_rdzv_devtools.local_etcd import LocalEtcd
from tests.conftest import EtcdFactory, open_kv
from tests.support.waiting import wait_until


class RefreshLog(Observer):
    def __init__(self) -> None:
        self.results: list[bool] = []

    def lease_refresh(self, kind: str, ok: bool, seconds: float, error: str | None = None) -> None:
        self.results.append(ok)


def test_refresher_survives_an_etcd_that_stops_answering(
    etcd_factory: EtcdFactory, etcd_api: str
) -> None:
    server: LocalEtcd = etcd_factory()
    refreshes = RefreshLog()
    kv = open_kv(server, etcd_api, request_timeout=0.5, observer=refreshes)
    kv.put("/lease-test/rank_0", "me", ttl=30)
    keep_alive = KeepAlive(kv, "/lease-test/rank_0", ttl=0.9, kind="rank", observer=refreshes)
    keep_alive.start()
    try:
        wait_until("a first refresh", lambda: True in refreshes.results, timeout=10)
        server.pause()
        try:
            wait_until("a failed refresh", lambda: False in refreshes.results, timeout=10)
            assert keep_alive.running, "the refresher died instead of retrying"
        finally:
            server.resume()
        failures = len(refreshes.results)
        wait_until(
            "a refresh after etcd came back",
            lambda: True in refreshes.results[failures:],
            timeout=10,
        )
        assert keep_alive.running
    finally:
        keep_alive.stop()
        kv.close()
    assert not keep_alive.running
