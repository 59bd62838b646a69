"""A benchmark worker: one process hosting rendezvous nodes, round after round.

The pool (pool.py) forks every worker from a server that imported torch once, so a worker
costs no torch import and shares torch's memory with the others. The harness speaks to a
worker over a connection, a command in and its answers out:

    Prepare -> Ready           create one handler per node, each with its own etcd client, in
                               parallel, through torch's registry exactly as torchrun does
    Go      -> Armed, Done     wait for the pool's release (one byte written to a pipe that
                               every worker polls, so one write releases them all at once),
                               then every node calls next_rendezvous(); timings per node
    Finish  -> Finished        shut the handlers down and drop them

`Go` may come again after `Done`: the survivors' next rendezvous when measuring recovery.
A failure answers `Failed` instead. The end of the connection ends the worker at once, in
whatever state, so a harness that died or gave up on a round leaves no worker behind.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

# Shut-down handlers stop their keep-alive threads asynchronously; a thread still refreshing
# etcd keys in the next round would add to that round's request count, so wait for them.
_THREADS_SETTLE_SECONDS = 5.0


@dataclass(frozen=True)
class NodeSpec:
    index: int  # the node's place in the round, 0..N-1
    conf: Mapping[str, str]  # --rdzv-conf entries


@dataclass(frozen=True)
class Prepare:
    backend: str
    endpoint: str
    run_id: str
    min_nodes: int
    max_nodes: int
    nodes: tuple[NodeSpec, ...]


@dataclass(frozen=True)
class Go:
    pass


@dataclass(frozen=True)
class Finish:
    pass


Command = Prepare | Go | Finish


@dataclass(frozen=True)
class Hello:
    pid: int
    server_pid: int  # the process this worker was forked from
    # False if the pool's server could not import torch ahead: then each worker imports it.
    preloaded: bool


@dataclass(frozen=True)
class Ready:
    pass


@dataclass(frozen=True)
class Armed:
    pass


@dataclass(frozen=True)
class NodeResult:
    index: int
    rank: int
    world_size: int
    master_addr: str
    master_port: int | None
    # time.monotonic() values; CLOCK_MONOTONIC is one clock for every process of the machine,
    # so the harness compares them with its own.
    released_at: float  # when this worker woke up to the release
    returned_at: float
    # CPU time of the thread that called next_rendezvous, from its call to its return.
    thread_cpu_seconds: float


@dataclass(frozen=True)
class Done:
    nodes: tuple[NodeResult, ...]
    # CPU time of the whole process (every thread: the callers, keep-alives, watches, metrics
    # servers) from the release to the return of its last node.
    process_cpu_seconds: float


@dataclass(frozen=True)
class Finished:
    errors: tuple[str, ...] = ()
    threads_left: tuple[str, ...] = ()


@dataclass(frozen=True)
class Failed:
    where: str
    error: str


Answer = Hello | Ready | Armed | Done | Finished | Failed


def serve(connection: Connection, release: Connection, log_path: str) -> None:
    """The worker's main: the pool starts a process with this as its target.

    `release` is the read end of the pool's release pipe: readable means go.
    """
    _send_output_to(Path(log_path))
    # SIGUSR2 writes every thread's stack to the log: where a worker hangs.
    faulthandler.register(signal.SIGUSR2, file=sys.stderr, all_threads=True)
    preloaded = "torch" in sys.modules
    import torch.distributed.elastic.rendezvous.registry  # noqa: F401

    # Everything imported so far lives as long as the process: the collections after each
    # round then skip torch's objects (and leave the pages shared with the server unwritten).
    gc.freeze()
    connection.send(Hello(pid=os.getpid(), server_pid=os.getppid(), preloaded=preloaded))
    commands: queue.Queue[Command] = queue.Queue()
    worker = _Worker(connection, release)
    threading.Thread(target=worker.run, args=(commands,), name="commands", daemon=True).start()
    # This thread only listens, so the end of the connection is seen at once, even while a
    # rendezvous or a shutdown blocks the command thread.
    while True:
        try:
            command = connection.recv()
        except (EOFError, OSError):
            os._exit(0)
        commands.put(command)


def _send_output_to(log_path: Path) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, sys.stdout.fileno())
    os.dup2(log, sys.stderr.fileno())
    os.close(log)


@dataclass
class _Node:
    spec: NodeSpec
    handler: Any = None
    result: NodeResult | None = None
    error: str | None = None


class _Worker:
    def __init__(self, connection: Connection, release: Connection) -> None:
        self.connection = connection
        self.release = release
        self.nodes: list[_Node] = []
        self.own_threads = set(threading.enumerate())

    def run(self, commands: queue.Queue[Command]) -> None:
        self.own_threads.add(threading.current_thread())
        while True:
            command = commands.get()
            try:
                answer = self.answer(command)
            except Exception:
                answer = Failed(type(command).__name__, traceback.format_exc())
            self.connection.send(answer)

    def answer(self, command: Command) -> Answer:
        if isinstance(command, Prepare):
            return self.prepare(command)
        if isinstance(command, Go):
            return self.go()
        return self.finish()

    def prepare(self, prepare: Prepare) -> Answer:
        self.nodes = [_Node(spec) for spec in prepare.nodes]

        def create(node: _Node) -> None:
            node.handler = _create_handler(prepare, node.spec)

        # In parallel: a c10d node that does not host the store waits in its constructor
        # until the host (maybe in this very process) has started it.
        _run_in_threads(self.nodes, create, "create")
        failures = [f"node {n.spec.index}: {n.error}" for n in self.nodes if n.error]
        if failures:
            self.finish()
            return Failed("create", "\n".join(failures))
        return Ready()

    def go(self) -> Answer:
        self.connection.send(Armed())
        self.release.poll(None)
        released_at = time.monotonic()
        cpu_before = time.process_time()

        def rendezvous(node: _Node) -> None:
            thread_cpu_before = time.thread_time()
            info = node.handler.next_rendezvous()
            returned_at = time.monotonic()
            bootstrap = info.bootstrap_store_info
            node.result = NodeResult(
                index=node.spec.index,
                rank=int(info.rank),
                world_size=int(info.world_size),
                master_addr=str(bootstrap.master_addr),
                master_port=None if bootstrap.master_port is None else int(bootstrap.master_port),
                released_at=released_at,
                returned_at=returned_at,
                thread_cpu_seconds=time.thread_time() - thread_cpu_before,
            )

        _run_in_threads(self.nodes, rendezvous, "rendezvous")
        process_cpu = time.process_time() - cpu_before
        failures = [f"node {n.spec.index}: {n.error}" for n in self.nodes if n.error]
        if failures:
            return Failed("rendezvous", "\n".join(failures))
        results = tuple(n.result for n in self.nodes if n.result is not None)
        return Done(results, process_cpu)

    def finish(self) -> Answer:
        errors = _shut_down(self.nodes)
        self.nodes = []
        # torch's etcd backend stops its keep-alive threads only when its objects are
        # collected; nothing here may still refer to them.
        gc.collect()
        return Finished(tuple(errors), self._threads_left())

    def _threads_left(self) -> tuple[str, ...]:
        deadline = time.monotonic() + _THREADS_SETTLE_SECONDS
        for thread in set(threading.enumerate()) - self.own_threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return tuple(sorted(t.name for t in set(threading.enumerate()) - self.own_threads))


def _shut_down(nodes: list[_Node]) -> list[str]:
    errors = []
    # The highest index first: node 0 hosts c10d's store, which the others still use.
    for node in sorted(nodes, key=lambda n: -n.spec.index):
        try:
            if node.handler is not None:
                node.handler.shutdown()
        except Exception as exc:
            errors.append(f"node {node.spec.index}: {exc!r}")
    return errors


def _create_handler(prepare: Prepare, node: NodeSpec) -> Any:
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

    params = RendezvousParameters(
        backend=prepare.backend,
        endpoint=prepare.endpoint,
        run_id=prepare.run_id,
        min_nodes=prepare.min_nodes,
        max_nodes=prepare.max_nodes,
        **node.conf,
    )
    return get_rendezvous_handler(params)


def _run_in_threads(nodes: list[_Node], action: Callable[[_Node], None], what: str) -> None:
    """`action` for every node, each in its own thread; an exception becomes `node.error`."""

    def run(node: _Node) -> None:
        try:
            action(node)
        except BaseException:
            node.error = traceback.format_exc()
            print(f"node {node.spec.index} failed in {what}:\n{node.error}", file=sys.stderr)

    threads = [
        threading.Thread(target=run, args=(node,), name=f"{what}-{node.spec.index}")
        for node in nodes
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
