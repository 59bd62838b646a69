"""Background refreshers that keep TTL keys alive while their owner lives."""

from __future__ import annotations

import threading
from collections.abc import Callable

from etcd_rdzv.kv import KeyNotFound, KeyValue
from etcd_rdzv.runtime import SYSTEM, Background, Runtime
from etcd_rdzv.telemetry import Observer

# After a failed refresh, the next comes sooner than a third of the TTL: once etcd answers
# again, a key that expired meanwhile is re-created within about this long.
RETRY_AFTER_FAILURE = 1.0


class KeepAlive:
    """Refreshes one TTL key every third of its TTL until stopped or the key is gone.

    A third, not half: two refreshes can fail in a row (an etcd leader election) and the key
    still lives. An outage or pause of etcd longer than the TTL expires the key all the same
    although its owner lives: with a `restore`, the refresher re-creates it once etcd answers.
    """

    def __init__(
        self,
        kv: KeyValue,
        key: str,
        ttl: float,
        kind: str,
        observer: Observer,
        *,
        restore: Callable[[], bool] | None = None,
        runtime: Runtime = SYSTEM,
    ) -> None:
        """`restore()` is asked when the key is found gone: it re-creates the key and returns
        True if its owner still holds what the key stands for (the key expired while etcd did
        not answer), or returns False (the owner left, or its version was torn down)."""
        self.key = key
        self.kind = kind
        self._kv = kv
        self._ttl = ttl
        self._observer = observer
        self._restore = restore
        self._runtime = runtime
        self._stopped = threading.Event()
        self._task: Background | None = None

    def start(self) -> KeepAlive:
        self._task = self._runtime.start(self._run, f"etcd-rdzv-keepalive-{self.kind}")
        return self

    def stop(self, wait: bool = True) -> None:
        self._stopped.set()
        task = self._task
        if wait and task is not None and task.is_alive() and task is not threading.current_thread():
            task.join(timeout=self._ttl)

    @property
    def running(self) -> bool:
        return self._task is not None and self._task.is_alive()

    def _run(self) -> None:
        clock = self._runtime.monotonic
        interval = self._ttl / 3
        wait = interval
        while not self._runtime.wait(self._stopped, wait):
            wait = interval
            started = clock()
            try:
                self._kv.refresh(self.key, self._ttl)
            except KeyNotFound:
                # Torn down, or expired: while etcd was paused or unreachable, or because this
                # process could not refresh in time. Only the owner can tell which.
                seconds = clock() - started
                restored, failure = self._restored()
                why = "the key is gone" + (f"; re-creating it failed: {failure}" if failure else "")
                self._observer.lease_refresh(self.kind, False, seconds, why)
                if restored is None:
                    wait = min(interval, RETRY_AFTER_FAILURE)
                    continue
                if restored:
                    self._observer.lease_restored(self.kind, self.key)
                    continue
                self._observer.keep_alive_stopped(self.kind, self.key, "key_gone")
                return
            except Exception as error:
                # Whatever failed (etcd unreachable, a refused request), keep trying until the
                # owner stops us: a refresher that died would let the key expire unseen.
                self._observer.lease_refresh(self.kind, False, clock() - started, str(error))
                wait = min(interval, RETRY_AFTER_FAILURE)
                continue
            self._observer.lease_refresh(self.kind, True, clock() - started)

    def _restored(self) -> tuple[bool | None, str | None]:
        """Whether the owner re-created its key (see `restore`); None, with the failure, when
        it could not tell yet (etcd failed again): ask at the next attempt."""
        if self._restore is None or self._stopped.is_set():
            return False, None
        try:
            return self._restore(), None
        except Exception as error:
            return None, str(error)
