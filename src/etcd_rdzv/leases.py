"""Background refreshers that keep TTL keys alive while their owner lives."""

from __future__ import annotations

import logging
import threading
import time

from etcd_rdzv.kv import KeyNotFound, KeyValue
from etcd_rdzv.telemetry import Observer

log = logging.getLogger(__name__)


class KeepAlive:
    """Refreshes one TTL key every third of its TTL until stopped or the key is gone.

    A third, not half: two refreshes can fail in a row (an etcd leader election) and the key
    still lives.
    """

    def __init__(self, kv: KeyValue, key: str, ttl: float, kind: str, observer: Observer) -> None:
        self.key = key
        self.kind = kind
        self._kv = kv
        self._ttl = ttl
        self._observer = observer
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"etcd-rdzv-keepalive-{kind}", daemon=True
        )

    def start(self) -> KeepAlive:
        self._thread.start()
        return self

    def stop(self, wait: bool = True) -> None:
        self._stopped.set()
        if wait and self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=self._ttl)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stopped.wait(self._ttl / 3):
            started = time.monotonic()
            try:
                self._kv.refresh(self.key, self._ttl)
            except KeyNotFound:
                # Someone tore the version down or the key expired: nothing left to keep.
                self._observer.lease_refresh(self.kind, False, time.monotonic() - started)
                log.warning("keep-alive key %s is gone; stopping its refresher", self.key)
                return
            except Exception as error:
                # Whatever failed (etcd unreachable, a refused request), keep trying until the
                # owner stops us: a refresher that died would let the key expire unseen.
                self._observer.lease_refresh(self.kind, False, time.monotonic() - started)
                log.warning("keep-alive refresh of %s failed: %s", self.key, error)
                continue
            self._observer.lease_refresh(self.kind, True, time.monotonic() - started)
