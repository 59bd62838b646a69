"""The setups compared, and one measured round of each: a rendezvous, or a recovery.

A round takes workers from the pool, has them create their handlers (not timed), releases
them all at once (one write that wakes every worker: see `WorkerPool.go`) and measures until
the last `next_rendezvous()` returns. Time zero is the moment just before that write. A
node's latency is its return minus time zero, on the machine's one monotonic clock. On two
cores many workers take a while to all run again: each round records when the last woke.

Requests are etcd's own counts from its /metrics: handler creation (prepare to ready) and the
rendezvous (go to the last return), separately. CPU per node is the process CPU time of each
worker from its go to its last node's return (all its threads: the calling one, keep-alives,
watches, metrics servers), summed over the workers and divided by the nodes.

A round may go on with a re-rendezvous (`again`): once all nodes returned, the same handlers
are released together again and every node calls `next_rendezvous()` a second time, as all
agents of a job do after a failure. It is measured alike, from its own release, into a
result of its own (`re_rendezvous`); it creates no handler, so its creation counts are 0.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from prometheus_client.parser import text_string_to_metric_families
from tests.support.harness import check_membership

from benchmarks.pool import (
    Worker,
    WorkerError,
    WorkerPool,
    WorkerTimeout,
    collect,
    exchange,
    process_cpu_seconds,
    system_memory_used,
)
from benchmarks.worker import Done, Finish, Finished, NodeResult, NodeSpec, Prepare, Ready
from etcd_rdzv_devtools.local_etcd import LocalEtcd, free_loopback_ports

TELEMETRY_OFF = {"metrics_port": "off", "log_level": "WARNING", "progress_interval": "off"}
# Telemetry on is the defaults plus a trace file per node and metrics on a free loopback port
# (the default, port 9401 on all interfaces, would collide between nodes on one machine).
TELEMETRY_ON = {"metrics_port": "0", "metrics_addr": "127.0.0.1"}
# Requests etcd served: v2 HTTP requests, and v3 gRPC calls (the JSON gateway makes one each).
REQUEST_COUNTERS = ("etcd_http_received_total", "grpc_server_started_total")
# Bytes etcd sent its clients over gRPC (the v3 JSON gateway is one of them); etcd 3.4 counts
# no bytes of its v2 HTTP API.
SENT_BYTES_COUNTER = "etcd_network_client_grpc_sent_bytes_total"
REFERENCE = "torch etcd"

Status = Literal["ok", "timeout", "failed"]


@dataclass(frozen=True)
class Setup:
    key: str  # for --setups
    name: str
    backend: str
    conf: Mapping[str, str] = field(default_factory=dict)
    uses_etcd: bool = True  # c10d keeps its state in a TCPStore of its own
    traced: bool = False  # telemetry on: each node writes its own trace file
    # The key of the setup this one differs from by its rank policy alone (None: join order,
    # the default). Such a setup runs only at --rank-policy-nodes.
    policy_baseline: str | None = None

    def node_confs(self, nodes: int, run_id: str, trace_dir: Path) -> list[dict[str, str]]:
        confs = []
        for index in range(nodes):
            conf = dict(self.conf)
            if self.backend == "c10d":
                # Exactly one node hosts the TCPStore: node 0 (never the one a recovery kills).
                conf["is_host"] = "true" if index == 0 else "false"
            if self.backend == "etcd-rdzv":
                # All nodes share this machine's host name, the default node id: each gets an
                # id of its own, as nodes on hosts of their own have (rank policies rank by id).
                conf["node_id"] = f"node{index}"
            if self.traced:
                conf["trace_file"] = str(trace_dir / f"{run_id}-node{index}.jsonl")
            confs.append(conf)
        return confs


def all_setups() -> list[Setup]:
    """torch's three backends and etcd-rdzv over both APIs, telemetry off and on; and
    etcd-rdzv over v3 with telemetry off and rank_policy=stable, against v3-off (join order)."""
    ours = [
        Setup(
            f"{api}-{state}",
            f"etcd-rdzv {api}, telemetry {state}",
            "etcd-rdzv",
            {"etcd_api": api, **(TELEMETRY_ON if state == "on" else TELEMETRY_OFF)},
            traced=state == "on",
        )
        for api in ("v3", "v2")
        for state in ("off", "on")
    ]
    # Rank policies other than join order exist over v3 only (the claims layout).
    stable = Setup(
        "v3-stable",
        "etcd-rdzv v3, telemetry off, stable",
        "etcd-rdzv",
        {"etcd_api": "v3", **TELEMETRY_OFF, "rank_policy": "stable"},
        policy_baseline="v3-off",
    )
    return [
        Setup("torch-etcd", REFERENCE, "etcd"),
        Setup("torch-etcd-v2", "torch etcd-v2", "etcd-v2"),
        Setup("torch-c10d", "torch c10d", "c10d", uses_etcd=False),
        *ours,
        stable,
    ]


def rank_policy_keys(setups: Sequence[Setup]) -> set[str]:
    """The keys of the rank-policy setups in `setups` and of their baselines."""
    policies = [s for s in setups if s.policy_baseline is not None]
    return {s.key for s in policies} | {s.policy_baseline for s in policies if s.policy_baseline}


def rank_policy_pairs(setups: Sequence[Setup]) -> list[tuple[str, str, str]]:
    """(name, its baseline's name, its rank policy) of each rank-policy setup in `setups`."""
    names = {setup.key: setup.name for setup in all_setups()}
    return [
        (s.name, names[s.policy_baseline], s.conf["rank_policy"])
        for s in setups
        if s.policy_baseline is not None
    ]


@dataclass(frozen=True)
class Plan:
    """What every round shares."""

    etcd: LocalEtcd
    pool: WorkerPool
    trace_dir: Path
    # torch's `etcd` backend reads it as an integer number of seconds.
    last_call_timeout: int
    ready_timeout: float
    round_timeout: float
    recovery_timeout: float
    finish_timeout: float


@dataclass
class Outcome:
    """What every measured round records."""

    setup: str
    nodes: int
    round: int
    status: Status = "ok"
    error: str | None = None
    # The first node's return, from time zero.
    first_seconds: float | None = None
    membership_checked: bool = False


@dataclass
class RoundResult(Outcome):
    workers: int = 0
    nodes_per_worker: int = 1
    create_seconds: float | None = None
    # The release to the last return: the round's time.
    wall_seconds: float | None = None
    # The release to the moment the last worker was running again: how together "together"
    # was on this machine.
    last_woken_seconds: float | None = None
    node_seconds: list[float] = field(default_factory=list)
    thread_cpu_seconds: list[float] = field(default_factory=list)
    cpu_seconds_per_node: float | None = None
    requests_create: int | None = None
    requests_rendezvous: int | None = None
    # Bytes etcd sent (v3 only: see SENT_BYTES_COUNTER), handler creation and rendezvous.
    sent_bytes_create: int | None = None
    sent_bytes_rendezvous: int | None = None
    # etcd's own CPU time (user and system) from the release to the last return.
    etcd_cpu_seconds: float | None = None
    threads_left: list[str] = field(default_factory=list)
    # The whole round: workers taken, handlers created, rendezvous, shut down.
    round_seconds: float | None = None
    # Memory once every handler had rendezvoused: the pool's PSS and the machine's use.
    pool_memory_bytes: int | None = None
    system_memory_bytes: int | None = None
    # The round's second rendezvous of the same handlers (see the module's doc), not its first.
    re_rendezvous: bool = False

    @property
    def requests(self) -> int | None:
        if self.requests_create is None or self.requests_rendezvous is None:
            return None
        return self.requests_create + self.requests_rendezvous

    @property
    def sent_bytes(self) -> int | None:
        if self.sent_bytes_create is None or self.sent_bytes_rendezvous is None:
            return None
        return self.sent_bytes_create + self.sent_bytes_rendezvous


@dataclass
class RecoveryResult(Outcome):
    # SIGKILL of one node's process to the last survivor's return of the next rendezvous.
    recovery_seconds: float | None = None


@dataclass(frozen=True)
class EtcdServed:
    """etcd's own counters at one moment: requests served and bytes sent to clients."""

    requests: int = 0
    sent_bytes: int = 0

    def __sub__(self, earlier: EtcdServed) -> EtcdServed:
        return EtcdServed(self.requests - earlier.requests, self.sent_bytes - earlier.sent_bytes)


def etcd_served(etcd: LocalEtcd) -> EtcdServed:
    requests = sent = 0.0
    for family in text_string_to_metric_families(etcd.metrics_text()):
        for sample in family.samples:
            if sample.name in REQUEST_COUNTERS:
                requests += sample.value
            elif sample.name == SENT_BYTES_COUNTER:
                sent += sample.value
    return EtcdServed(int(requests), int(sent))


def run_round(
    plan: Plan, setup: Setup, nodes: int, round_index: int, per_worker: int, *, again: bool = False
) -> list[RoundResult]:
    """One rendezvous of `nodes` nodes, `per_worker` of them (threads) in each worker; and with
    `again`, the same nodes' re-rendezvous: its result follows the first's."""
    started = time.monotonic()
    count = -(-nodes // per_worker)
    result = RoundResult(setup.name, nodes, round_index, workers=count)
    result.nodes_per_worker = per_worker
    workers: list[Worker] = []
    try:
        workers = plan.pool.take(count)
        prepared = _prepare(plan, setup, workers, nodes, min_nodes=nodes)
        before = _served(plan, setup)
        creating = time.monotonic()
        _create(plan, workers, prepared)
        result.create_seconds = time.monotonic() - creating
        created = _served(plan, setup)
        creation = created - before
        _rendezvous(plan, setup, workers, result, created)
    except WorkerError as exc:
        return [_abandon(plan.pool, workers, result, exc)]
    if setup.uses_etcd:
        result.requests_create = creation.requests
        if setup.conf.get("etcd_api") == "v3":
            result.sent_bytes_create = creation.sent_bytes
    results = [result]
    if again and result.status == "ok":
        second = RoundResult(setup.name, nodes, round_index, workers=count, re_rendezvous=True)
        second.nodes_per_worker = per_worker
        if setup.uses_etcd:
            second.requests_create = 0
            if setup.conf.get("etcd_api") == "v3":
                second.sent_bytes_create = 0
        results.append(second)
        try:
            _rendezvous(plan, setup, workers, second, _served(plan, setup))
        except WorkerError as exc:
            _abandon(plan.pool, workers, second, exc)
            result.round_seconds = time.monotonic() - started
            return results
    result.pool_memory_bytes = plan.pool.memory()
    result.system_memory_bytes = system_memory_used()
    result.threads_left = _finish(plan, workers)
    result.round_seconds = time.monotonic() - started
    return results


def _served(plan: Plan, setup: Setup) -> EtcdServed:
    return etcd_served(plan.etcd) if setup.uses_etcd else EtcdServed()


def _rendezvous(
    plan: Plan, setup: Setup, workers: Sequence[Worker], result: RoundResult, before: EtcdServed
) -> None:
    """Release every worker's nodes together and measure until the last returns, into
    `result`: times, CPU, etcd's requests and bytes since `before` (etcd's counts just before)
    and its CPU over that span, and the membership."""
    etcd_pid = plan.etcd.pid if setup.uses_etcd else None
    etcd_cpu = None if etcd_pid is None else process_cpu_seconds(etcd_pid)
    go = plan.pool.go(workers, plan.ready_timeout)
    done = collect(workers, Done, go + plan.round_timeout)
    if etcd_pid is not None and etcd_cpu is not None:
        result.etcd_cpu_seconds = process_cpu_seconds(etcd_pid) - etcd_cpu
    if setup.uses_etcd:
        rendezvous = _served(plan, setup) - before
        result.requests_rendezvous = rendezvous.requests
        if setup.conf.get("etcd_api") == "v3":
            result.sent_bytes_rendezvous = rendezvous.sent_bytes
    results = [node for answer in done.values() for node in answer.nodes]
    returns = sorted(node.returned_at - go for node in results)
    woken = [node.released_at - go for node in results]
    result.wall_seconds, result.first_seconds = returns[-1], returns[0]
    result.node_seconds = returns
    result.last_woken_seconds = max(woken)
    result.thread_cpu_seconds = sorted(node.thread_cpu_seconds for node in results)
    result.cpu_seconds_per_node = sum(a.process_cpu_seconds for a in done.values()) / result.nodes
    _check(result, results)


def run_recovery(plan: Plan, setup: Setup, nodes: int, round_index: int) -> RecoveryResult:
    """All `nodes` rendezvous (min nodes - 1), one is SIGKILLed, the survivors go again.

    Each node is alone in its worker, so the kill kills only that node. The one killed holds
    the highest rank: not rank 0, whose death also moves the master address (a different
    fault), and never node 0, which hosts c10d's store.
    """
    result = RecoveryResult(setup.name, nodes, round_index)
    workers: list[Worker] = []
    try:
        workers = plan.pool.take(nodes)
        prepared = _prepare(plan, setup, workers, nodes, min_nodes=nodes - 1)
        _create(plan, workers, prepared)
        go = plan.pool.go(workers, plan.ready_timeout)
        done = collect(workers, Done, go + plan.round_timeout)
        if not _check(result, [node for answer in done.values() for node in answer.nodes]):
            _finish(plan, workers)
            return result
        victim = max(
            (w for w in workers if w is not workers[0]), key=lambda w: done[w].nodes[0].rank
        )
        survivors = [worker for worker in workers if worker is not victim]
        # The survivors are armed first, so that they go again right after the kill (time
        # zero), as their agents would once their local workers failed.
        killed_at = plan.pool.go(survivors, plan.ready_timeout, before_release=victim.process.kill)
        again = collect(survivors, Done, killed_at + plan.recovery_timeout)
    except WorkerError as exc:
        return _abandon(plan.pool, workers, result, exc)
    plan.pool.replace([victim])
    results = [node for answer in again.values() for node in answer.nodes]
    returns = sorted(node.returned_at - killed_at for node in results)
    result.recovery_seconds, result.first_seconds = returns[-1], returns[0]
    _check(result, results)
    _finish(plan, survivors)
    return result


def _create(plan: Plan, workers: Sequence[Worker], prepared: Mapping[Worker, Prepare]) -> None:
    """Every worker's handlers, node 0's first: it hosts c10d's store, and the others' store
    clients, made before it listens, retry with a backoff that takes seconds."""
    exchange(workers[:1], prepared, Ready, plan.ready_timeout)
    exchange(workers[1:], prepared, Ready, plan.ready_timeout)


def _prepare(
    plan: Plan, setup: Setup, workers: Sequence[Worker], nodes: int, min_nodes: int
) -> dict[Worker, Prepare]:
    """Each worker's share of the nodes, in order: node 0 in the first worker."""
    run_id = f"bench-{uuid.uuid4().hex[:12]}"
    endpoint = plan.etcd.endpoint
    if not setup.uses_etcd:
        endpoint = f"127.0.0.1:{free_loopback_ports(1)[0]}"
    confs = setup.node_confs(nodes, run_id, plan.trace_dir)
    specs = [
        NodeSpec(index, {**conf, "last_call_timeout": str(plan.last_call_timeout)})
        for index, conf in enumerate(confs)
    ]
    per_worker = -(-nodes // len(workers))
    return {
        worker: Prepare(
            setup.backend, endpoint, run_id, min_nodes, nodes,
            tuple(specs[slot * per_worker : (slot + 1) * per_worker]),
        )
        for slot, worker in enumerate(workers)
    }  # fmt: skip


def _check(result: Outcome, nodes: Sequence[NodeResult]) -> bool:
    """One membership: ranks exactly 0..N-1 and one world size N (the tests' invariant)."""
    records = [
        {
            "participant": f"node{node.index}",
            "rank": node.rank,
            "world_size": node.world_size,
            "version": None,
            "master_addr": node.master_addr,
            "master_port": node.master_port,
        }
        for node in nodes
    ]
    try:
        check_membership(records)
    except AssertionError as exc:
        result.status, result.error = "failed", f"membership check: {exc}"
        return False
    result.membership_checked = True
    return True


def _finish(plan: Plan, workers: Sequence[Worker]) -> list[str]:
    """Shut every handler down, node 0's worker last: it may host c10d's store.

    Returns the threads a shut-down handler left running. A worker that does not finish in
    time is replaced: nothing of this round may linger into the next.
    """
    left: list[str] = []
    for group in (workers[1:], workers[:1]):
        try:
            finished = exchange(group, Finish(), Finished, plan.finish_timeout)
        except WorkerError as exc:
            print(f"warning: replacing workers that did not finish: {exc}")
            plan.pool.replace(group)
            continue
        for worker, answer in finished.items():
            left += [f"{worker.pid}: {name}" for name in answer.threads_left]
            for error in answer.errors:
                print(f"warning: shutdown of a handler in {worker} failed: {error}")
    return left


ResultType = TypeVar("ResultType", bound=Outcome)


def _abandon(
    pool: WorkerPool, workers: Sequence[Worker], result: ResultType, exc: WorkerError
) -> ResultType:
    """A round that failed or ran out of time: its workers are killed and replaced."""
    pool.replace(workers)
    result.status = "timeout" if isinstance(exc, WorkerTimeout) else "failed"
    result.error = str(exc)
    return result
