"""Worker processes kept for the whole benchmark run (see worker.py for one worker).

Every worker is forked from one server process that imported torch once (multiprocessing's
forkserver with torch preloaded). Starting 128 workers that each import torch would take
minutes of CPU on 2 cores and about 150 MiB of private memory each; forked, a worker starts
in milliseconds and shares torch's pages with the others. Each worker is still a separate
process with its own etcd clients, as separate agents are.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Mapping
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TypeVar

from benchmarks.worker import Answer, Armed, Command, Failed, Go, Hello, serve

# The modules the server imports once for every worker it forks: torch's backends and ours,
# with their transports, which the registry and etcd-rdzv import only when a handler is made.
# And the harness itself: a forked child runs the main script again (as __mp_main__), whose
# imports then cost nothing. ("__main__" in a preload list would not work in Python 3.11:
# the server is never told the main script's path.)
_PRELOAD = [
    "benchmarks.rendezvous_latency",
    "benchmarks.worker",
    "torch.distributed.elastic.rendezvous.registry",
    "torch.distributed.elastic.rendezvous.etcd_rendezvous",
    "torch.distributed.elastic.rendezvous.etcd_rendezvous_backend",
    "torch.distributed.elastic.rendezvous.c10d_rendezvous_backend",
    "etcd_rdzv.handler",
    "etcd_rdzv.kv.etcd_v2",
    "etcd_rdzv.kv.etcd_v3",
    "etcd_rdzv.kv.failover",
]
_STOP_TIMEOUT_SECONDS = 10.0
_KILL_TIMEOUT_SECONDS = 5.0

AnswerType = TypeVar("AnswerType", bound=Answer)


class WorkerError(RuntimeError):
    """A worker answered with a failure or died."""


class WorkerTimeout(WorkerError):
    """Workers gave no answer in time."""


class Worker:
    def __init__(self, slot: int, process: BaseProcess, connection: Connection) -> None:
        self.slot = slot
        self.process = process
        self.connection = connection
        self.pid = process.pid
        self.server_pid: int | None = None  # the forkserver, learnt from the worker's Hello

    def __repr__(self) -> str:
        return f"Worker(slot={self.slot}, pid={self.pid})"

    def send(self, command: Command) -> None:
        self.connection.send(command)

    def kill(self) -> None:
        """SIGKILL (a crash, not a shutdown) and reap."""
        self.process.kill()
        self.process.join(_KILL_TIMEOUT_SECONDS)
        self.connection.close()


class WorkerPool:
    """Worker processes by slot; `take(n)` gives n live, ready ones, starting what is missing.

    Use as a context manager: `close` stops every worker it started, and reports any that
    would not stop.
    """

    def __init__(self, log_dir: Path, start_timeout: float = 300.0) -> None:
        self.log_dir = log_dir
        self.start_timeout = start_timeout
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(_PRELOAD)
        self._slots: dict[int, Worker] = {}
        # The release: armed workers poll the read end; one byte written releases them all
        # in one system call, where sending each its own "go" would take a write (and, on two
        # cores, a context switch) per worker.
        release_read, self._release_write = os.pipe()
        os.set_blocking(release_read, False)  # for draining; polling ignores it
        self._release_read = Connection(release_read, writable=False)
        self.started_pids: list[int] = []
        self.server_pids: set[int] = set()

    @property
    def size(self) -> int:
        return len(self._slots)

    def take(self, count: int) -> list[Worker]:
        """Workers in slots 0..count-1, replacing dead ones and starting missing ones."""
        fresh = []
        for slot in range(count):
            worker = self._slots.get(slot)
            if worker is None or not worker.process.is_alive():
                if worker is not None:
                    worker.kill()
                fresh.append(self._spawn(slot))
        if fresh:
            try:
                hellos = exchange(fresh, None, Hello, self.start_timeout)
            except WorkerError:
                self.replace(fresh)  # none may keep an unread Hello for the next answer
                raise
            for worker, hello in hellos.items():
                worker.server_pid = hello.server_pid
                self.server_pids.add(hello.server_pid)
                if not hello.preloaded:
                    print(f"warning: {worker} imported torch itself (preload failed)")
        return [self._slots[slot] for slot in range(count)]

    def replace(self, workers: Iterable[Worker]) -> None:
        """Kill these workers now; the next `take` starts fresh ones in their slots."""
        for worker in workers:
            worker.kill()

    def _spawn(self, slot: int) -> Worker:
        ours, theirs = self._context.Pipe()
        log_path = self.log_dir / f"worker-{slot}.log"
        process = self._context.Process(
            target=serve,
            args=(theirs, self._release_read, str(log_path)),
            name=f"bench-worker-{slot}",
            daemon=True,
        )
        process.start()
        theirs.close()
        worker = Worker(slot, process, ours)
        assert worker.pid is not None
        self.started_pids.append(worker.pid)
        self._slots[slot] = worker
        return worker

    def go(
        self,
        workers: Iterable[Worker],
        timeout: float,
        before_release: Callable[[], object] | None = None,
    ) -> float:
        """Arm these workers, then release them all at once: the time just before.

        `before_release` runs between that time and the release (a kill, for recovery).
        Every worker the previous release let go has answered since (or was killed), so its
        byte can go: a worker armed now must wait for this release.
        """
        try:
            os.read(self._release_read.fileno(), 64)
        except BlockingIOError:
            pass  # nothing released yet
        exchange(workers, Go(), Armed, timeout)
        released = time.monotonic()
        if before_release is not None:
            before_release()
        os.write(self._release_write, b"g")
        return released

    def memory(self) -> int:
        """Proportional set size (bytes) of every worker and the server they fork from."""
        pids = [w.pid for w in self._slots.values() if w.pid is not None]
        return sum(proportional_set_size(pid) for pid in [*pids, *self.server_pids])

    def close(self) -> list[int]:
        """Stop every worker (end of its connection ends it); return pids that would not stop.

        Closing again does nothing.
        """
        if self._release_read.closed:
            return []
        workers = list(self._slots.values())
        self._slots.clear()
        for worker in workers:
            worker.connection.close()
        deadline = time.monotonic() + _STOP_TIMEOUT_SECONDS
        stubborn = []
        for worker in workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                stubborn.append(worker)
                worker.kill()
        self._release_read.close()
        os.close(self._release_write)
        return [w.pid for w in stubborn if w.pid is not None and w.process.is_alive()]

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def exchange(
    workers: Iterable[Worker],
    commands: Mapping[Worker, Command] | Command | None,
    expected: type[AnswerType],
    timeout: float,
) -> dict[Worker, AnswerType]:
    """Send each worker its command (or the same one to all, or none), collect one answer each.

    Raise `WorkerError` on the first failure or death, `WorkerTimeout` when `timeout` ends.
    """
    pending = {worker.connection: worker for worker in workers}
    for worker in pending.values():
        command = commands.get(worker) if isinstance(commands, Mapping) else commands
        if command is not None:
            worker.send(command)
    return collect(pending.values(), expected, time.monotonic() + timeout)


def collect(
    workers: Iterable[Worker], expected: type[AnswerType], deadline: float
) -> dict[Worker, AnswerType]:
    """One answer of type `expected` from each worker by `deadline`; `WorkerError` otherwise."""
    pending = {worker.connection: worker for worker in workers}
    answers: dict[Worker, AnswerType] = {}
    while pending:
        remaining = deadline - time.monotonic()
        ready = wait(list(pending), timeout=max(0.0, remaining)) if remaining > 0 else []
        if not ready:
            names = ", ".join(repr(w) for w in list(pending.values())[:8])
            raise WorkerTimeout(
                f"no {expected.__name__} answer in time from {len(pending)} workers: {names}"
            )
        for connection in ready:
            assert isinstance(connection, Connection)
            worker = pending.pop(connection)
            try:
                answer = connection.recv()
            except (EOFError, OSError) as exc:
                raise WorkerError(f"{worker} died (see {worker.process.name}'s log)") from exc
            if isinstance(answer, Failed):
                raise WorkerError(f"{worker} failed in {answer.where}:\n{answer.error}")
            if not isinstance(answer, expected):
                raise WorkerError(f"{worker} answered {answer!r}, not {expected.__name__}")
            answers[worker] = answer
    return answers


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def proportional_set_size(pid: int) -> int:
    """Bytes of memory a process uses, shared pages divided among their sharers; 0 if gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def system_memory_used() -> int:
    """Bytes in use on the machine: MemTotal - MemAvailable."""
    values = {}
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) * 1024
    return values["MemTotal"] - values["MemAvailable"]


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie has ended: it does not count)."""
    try:
        return _stat_fields(pid)[0] != "Z"
    except OSError:
        return False


def process_cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far."""
    fields = _stat_fields(pid)
    # utime and stime: fields 14 and 15 of stat(5), counted from its field 3 here.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat from its third field on (after the command name, which may hold spaces
    and parentheses)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        return stat.read().rsplit(")", 1)[1].split()
