"""`python -m etcd_rdzv_devtools.demo`: a small torchrun job over a throwaway local etcd.

Starts etcd on loopback, then one torchrun agent per simulated node (all on this machine),
each with `--rdzv-backend etcd-rdzv`, running `examples/allreduce_worker.py`. When the job
ends it prints which node got which ranks, whether every all-reduce sum was right and how
long each node's rendezvous took. Logs and results stay in `runs/demo-<timestamp>/`.

Everything the demo starts is stopped when it ends, fails or is interrupted (Ctrl-C,
SIGTERM). Exit code 0 means every node finished with a correct sum.

`TorchrunAgent` and `AgentSpec` are also what the end-to-end tests use to run agents.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from etcd_rdzv_devtools.local_etcd import LocalEtcdError, free_loopback_ports, start_local_etcd
from etcd_rdzv_devtools.logfiles import log_tail

# etcd_rdzv.handler.BACKEND_NAME, not imported: this process needs no torch (slow to import),
# and importing the handler before torch's rendezvous package trips a circular import there.
BACKEND_NAME = "etcd-rdzv"
WORKER_SCRIPT = Path("examples") / "allreduce_worker.py"
# The checkout this module lives in, for an editable install run from another directory.
_CHECKOUT = Path(__file__).resolve().parents[2]
# Every process of one node carries this variable, with a value unique to the node.
NODE_TAG_VARIABLE = "RDZV_NODE_TAG"
RENDEZVOUS_EVENT = "torchelastic.worker.status.RENDEZVOUS"
LOOPBACK = "127.0.0.1"
TRACE_FILE_NAME = "traces.jsonl"
TIMELINE_FILE_NAME = "timeline.png"

DEFAULT_NODES = 3
DEFAULT_NPROC_PER_NODE = 1
DEFAULT_JOB_TIMEOUT_SECONDS = 120.0
# Agents die on their own if the rendezvous cannot complete, well before the job timeout.
DEFAULT_RENDEZVOUS_TIMEOUT_SECONDS = 60.0

_POLL_SECONDS = 0.1
_KILL_TIMEOUT_SECONDS = 10.0
_LOG_TAIL_LINES = 20


class DemoError(Exception):
    """The demo cannot run as asked; the message says what to change."""


# --- torchrun agents ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentSpec:
    """One `torchrun` invocation: a node of an etcd-rdzv job."""

    endpoint: str
    run_id: str
    nnodes: str
    nproc_per_node: int
    worker: Path
    worker_args: tuple[str, ...] = ()
    rdzv_conf: Mapping[str, str] = field(default_factory=dict)
    max_restarts: int = 0

    def command(self) -> list[str]:
        # `-m torch.distributed.run` is torchrun, from this interpreter's environment.
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={self.nnodes}",
            f"--nproc-per-node={self.nproc_per_node}",
            f"--rdzv-backend={BACKEND_NAME}",
            f"--rdzv-endpoint={self.endpoint}",
            f"--rdzv-id={self.run_id}",
            f"--max-restarts={self.max_restarts}",
            # The address other nodes reach this one at (rank 0's becomes MASTER_ADDR).
            f"--local-addr={LOOPBACK}",
            # Makes the agent log its rendezvous duration, as JSON, to its stderr.
            "--event-log-handler=console",
        ]
        if self.rdzv_conf:
            conf = ",".join(f"{key}={value}" for key, value in self.rdzv_conf.items())
            command.append(f"--rdzv-conf={conf}")
        return [*command, str(self.worker), *self.worker_args]


class TorchrunAgent:
    """A running torchrun agent, the workers it starts, and its log.

    torchrun puts each worker in a session of its own, so signalling the agent's process
    group does not reach them. Every process of the node therefore carries a tag in its
    environment (`RDZV_NODE_TAG`), by which `kill` finds them all, even orphaned ones.
    """

    def __init__(
        self, name: str, process: subprocess.Popen[bytes], log_path: Path, tag: str
    ) -> None:
        self.name = name
        self.process = process
        self.log_path = log_path
        self.tag = tag

    @classmethod
    def start(
        cls,
        name: str,
        spec: AgentSpec,
        log_path: Path,
        env: Mapping[str, str] | None = None,
    ) -> TorchrunAgent:
        """Launch the agent in a new session; its stdout and stderr go to `log_path`."""
        tag = f"{name}-{uuid.uuid4().hex}"
        environment = {**os.environ, **(env or {}), NODE_TAG_VARIABLE: tag}
        # Agents on one machine: metrics on loopback, each on its own free port, unless asked.
        environment.setdefault("ETCD_RDZV_METRICS_ADDR", LOOPBACK)
        environment.setdefault("ETCD_RDZV_METRICS_PORT", "0")
        if sys.platform.startswith("linux"):
            # gloo otherwise picks the interface the host name resolves to, not loopback.
            environment.setdefault("GLOO_SOCKET_IFNAME", "lo")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                spec.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                start_new_session=True,
            )
        return cls(name, process, log_path, tag)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout: float) -> int:
        """The agent's exit code; raises `subprocess.TimeoutExpired` if it runs on."""
        return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the agent and all its workers, as a crashing node; wait until all are gone."""
        if self.process.poll() is None:
            # Not reaped yet, so the pid is still this agent's and not a recycled one.
            _signal_group(self.process.pid, signal.SIGKILL)
        try:
            self.process.wait(_KILL_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            pass  # reported below with any other survivor
        deadline = time.monotonic() + _KILL_TIMEOUT_SECONDS
        while True:
            remaining = node_processes(self.tag)
            if not remaining and self.process.poll() is not None:
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"{self.name}: processes {sorted(remaining | {self.pid})} survived SIGKILL "
                    f"for {_KILL_TIMEOUT_SECONDS:g}s"
                )
            for pid in remaining:
                _signal_process(pid, signal.SIGKILL)
            time.sleep(_POLL_SECONDS)

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        return log_tail(self.log_path, lines)

    def __repr__(self) -> str:
        return f"TorchrunAgent({self.name!r}, pid={self.pid}, returncode={self.returncode})"


def node_processes(tag: str) -> set[int]:
    """Pids of the live processes of the node with this tag."""
    return processes_with_env(NODE_TAG_VARIABLE, tag)


def processes_with_env(name: str, value: str) -> set[int]:
    """Pids of the live processes whose environment has `name=value` (Linux: from /proc).

    Exited processes not reaped yet show an empty environment, so they are not counted.
    """
    needle = f"{name}={value}".encode()
    found = set()
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return set()
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            environment = (entry / "environ").read_bytes()
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if needle in environment.split(b"\0"):
            found.add(int(entry.name))
    return found


def wait_for_agents(
    agents: Sequence[TorchrunAgent], timeout: float, fail_fast: bool = True
) -> dict[str, int | None]:
    """Exit codes by agent name once all exited, or at `timeout` (None: still running).

    With `fail_fast`, stops waiting as soon as one agent fails: the others would only wait
    for it until their rendezvous timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        codes = {agent.name: agent.returncode for agent in agents}
        failed = any(code not in (None, 0) for code in codes.values())
        if all(code is not None for code in codes.values()) or (fail_fast and failed):
            return codes
        if time.monotonic() >= deadline:
            return codes
        time.sleep(_POLL_SECONDS)


def kill_agents(agents: Sequence[TorchrunAgent]) -> None:
    """Kill every agent and its workers; a failure to kill one does not spare the others."""
    errors = []
    for agent in agents:
        try:
            agent.kill()
        except (OSError, RuntimeError) as error:
            errors.append(f"{agent.name}: {error}")
    if errors:
        raise RuntimeError("could not stop every agent: " + "; ".join(errors))


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


def _signal_process(pid: int, signum: signal.Signals) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


# --- reading what the job left -----------------------------------------------------------------


def read_records(directory: Path, kind: str = "result") -> list[dict[str, Any]]:
    """The JSON records the allreduce worker wrote: `result` or `started`."""
    records = []
    for path in sorted(directory.glob(f"{kind}-*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise DemoError(f"{path} does not hold a JSON object")
        records.append(record)
    return records


def rendezvous_durations(log_path: Path) -> list[float]:
    """Seconds each rendezvous of an agent took, from its console event log, in order."""
    durations = []
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        if RENDEZVOUS_EVENT not in line or not line.startswith("{"):
            continue
        try:
            milliseconds = json.loads(line)["metadata"]["duration_ms"]
        except (ValueError, KeyError, TypeError):
            continue  # a line interleaved with a worker's output
        if isinstance(milliseconds, int | float):
            durations.append(milliseconds / 1000.0)
    return durations


# --- the demo ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoOptions:
    nodes: int
    nproc_per_node: int
    out: Path | None
    worker: Path | None
    timeout: float
    # v3 against an etcd without the v2 API, as etcd 3.6 and later are; v2 shows torch's layout.
    etcd_api: str = "v3"


@dataclass(frozen=True)
class Node:
    """One simulated node: its agent, where its workers write results, its metrics port."""

    agent: TorchrunAgent
    results_dir: Path
    metrics_port: int


@dataclass(frozen=True)
class NodeOutcome:
    name: str
    exit_code: int | None
    results: tuple[dict[str, Any], ...]
    rendezvous_seconds: float | None
    log_path: Path


@dataclass(frozen=True)
class JobOutcome:
    nodes: tuple[NodeOutcome, ...]
    world_size: int
    seconds: float
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def parse_args(argv: Sequence[str] | None = None) -> DemoOptions:
    parser = argparse.ArgumentParser(
        prog="python -m etcd_rdzv_devtools.demo",
        description="Run a small torchrun job with the etcd-rdzv backend on this machine.",
    )
    parser.add_argument(
        "--nodes", type=int, default=DEFAULT_NODES, help="simulated nodes (default 3)"
    )
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        default=DEFAULT_NPROC_PER_NODE,
        help="workers per node (default 1)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for logs and results; must not exist yet or be empty "
        "(default runs/demo-<timestamp>)",
    )
    parser.add_argument(
        "--worker",
        type=Path,
        default=None,
        help=f"worker script (default {WORKER_SCRIPT} in the current directory)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_JOB_TIMEOUT_SECONDS,
        help="seconds before the job is stopped as hung (default 120)",
    )
    parser.add_argument(
        "--etcd-api",
        choices=("v3", "v2"),
        default="v3",
        help="etcd API the agents speak (default v3; v2 starts etcd with --enable-v2)",
    )
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error("--nodes must be at least 1")
    if args.nproc_per_node < 1:
        parser.error("--nproc-per-node must be at least 1")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    return DemoOptions(
        args.nodes, args.nproc_per_node, args.out, args.worker, args.timeout, args.etcd_api
    )


def find_worker_script(explicit: Path | None, cwd: Path) -> Path:
    """The worker to run: the one asked for, else examples/ here, else in this checkout."""
    if explicit is not None:
        if not explicit.is_file():
            raise DemoError(f"--worker {explicit}: no such file.")
        return explicit.resolve()
    for base in (cwd, _CHECKOUT):
        candidate = base / WORKER_SCRIPT
        if candidate.is_file():
            return candidate.resolve()
    raise DemoError(
        f"{WORKER_SCRIPT} not found in {cwd}: run the demo from the etcd-rdzv repository's "
        "root, or pass --worker PATH."
    )


def create_run_dir(out: Path | None, cwd: Path, now: datetime | None = None) -> Path:
    """`out`, or a new `runs/demo-<timestamp>` under `cwd`; created, and empty."""
    if out is None:
        stamp = f"demo-{(now or datetime.now()):%Y%m%d-%H%M%S}"
        runs = cwd / "runs"
        # Two demos started within the same second each get their own directory.
        for suffix in ("", *(f"-{n}" for n in range(2, 100))):
            candidate = runs / f"{stamp}{suffix}"
            try:
                candidate.mkdir(parents=True)
            except FileExistsError:
                continue
            return candidate
        raise DemoError(f"{runs}: too many demo runs named {stamp}-*; remove some.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DemoError(f"--out {out}: not an empty directory; results would mix. Pick another.")
    out.mkdir(parents=True, exist_ok=True)
    return out


def start_node(
    index: int,
    options: DemoOptions,
    *,
    endpoint: str,
    worker: Path,
    run_dir: Path,
    run_id: str,
    metrics_port: int,
) -> Node:
    name = f"node-{index}"
    results_dir = run_dir / name
    spec = AgentSpec(
        endpoint=endpoint,
        run_id=run_id,
        # A fixed size: the rendezvous completes as soon as every node joined.
        nnodes=str(options.nodes),
        nproc_per_node=options.nproc_per_node,
        worker=worker,
        worker_args=("--out", str(results_dir)),
        rdzv_conf={
            "timeout": f"{DEFAULT_RENDEZVOUS_TIMEOUT_SECONDS:g}",
            "etcd_api": options.etcd_api,
            "metrics_addr": LOOPBACK,
            "metrics_port": str(metrics_port),
            # Every agent appends its spans to one file: the run's traces, side by side.
            "trace_file": str(run_dir / TRACE_FILE_NAME),
        },
    )
    agent = TorchrunAgent.start(name, spec, run_dir / f"{name}.log")
    return Node(agent, results_dir, metrics_port)


def collect_outcome(
    nodes: Sequence[Node], codes: Mapping[str, int | None], options: DemoOptions, seconds: float
) -> JobOutcome:
    world_size = options.nodes * options.nproc_per_node
    outcomes = []
    for node in nodes:
        results = read_records(node.results_dir) if node.results_dir.is_dir() else []
        durations = rendezvous_durations(node.agent.log_path)
        outcomes.append(
            NodeOutcome(
                name=node.agent.name,
                exit_code=codes.get(node.agent.name),
                results=tuple(sorted(results, key=lambda record: int(record["rank"]))),
                rendezvous_seconds=durations[-1] if durations else None,
                log_path=node.agent.log_path,
            )
        )
    problems = find_problems(outcomes, options, timed_out=seconds >= options.timeout)
    return JobOutcome(tuple(outcomes), world_size, seconds, tuple(problems))


def find_problems(
    nodes: Sequence[NodeOutcome], options: DemoOptions, *, timed_out: bool
) -> list[str]:
    """Everything that says the job did not do what it should; empty when all is well."""
    world_size = options.nodes * options.nproc_per_node
    problems = []
    for node in nodes:
        if node.exit_code is None:
            why = f"after {options.timeout:g}s" if timed_out else "when another node failed"
            problems.append(f"{node.name}: still running {why}; stopped")
        elif node.exit_code != 0:
            problems.append(f"{node.name}: torchrun exited with code {node.exit_code}")
        if len(node.results) != options.nproc_per_node:
            problems.append(
                f"{node.name}: {len(node.results)} worker results, "
                f"expected {options.nproc_per_node}"
            )
        for record in node.results:
            if not record.get("ok"):
                problems.append(
                    f"{node.name}: rank {record.get('rank')} summed {record.get('sum')}, "
                    f"expected {record.get('expected')}"
                )
            if record.get("world_size") != world_size:
                problems.append(
                    f"{node.name}: rank {record.get('rank')} saw world size "
                    f"{record.get('world_size')}, expected {world_size}"
                )
    ranks = sorted(int(record["rank"]) for node in nodes for record in node.results)
    if ranks and ranks != list(range(world_size)):
        problems.append(f"ranks {ranks} are not 0..{world_size - 1}, each once")
    return problems


def format_report(outcome: JobOutcome, run_dir: Path) -> str:
    lines = []
    for node in outcome.nodes:
        lines.append("  " + _describe_node(node))
    if outcome.ok:
        lines.append(
            f"OK: {len(outcome.nodes)} nodes formed one world of {outcome.world_size} workers; "
            f"every all-reduce sum is right. The job took {outcome.seconds:.1f} s."
        )
    else:
        lines.append("FAILED:")
        lines.extend(f"  - {problem}" for problem in outcome.problems)
        failing = [node for node in outcome.nodes if node.exit_code != 0]
        for node in failing[:1]:
            lines.append(f"Last lines of {_shown(node.log_path)}:")
            lines.extend(
                f"  | {line}" for line in log_tail(node.log_path, _LOG_TAIL_LINES).splitlines()
            )
    lines.append(
        f"Logs and results in {run_dir}/: <node>.log per torchrun agent (JSON log events), "
        f"<node>/ its workers' results, {TRACE_FILE_NAME} (every agent's spans, OTLP JSON "
        "lines), etcd.log"
    )
    return "\n".join(lines)


def _describe_node(node: NodeOutcome) -> str:
    if not node.results:
        status = "no results" if node.exit_code is not None else "did not finish"
        return f"{node.name}: {status} (torchrun exit code {node.exit_code})"
    first = node.results[0]
    ranks = ",".join(str(record["rank"]) for record in node.results)
    sums = "OK" if all(record.get("ok") for record in node.results) else "WRONG"
    rendezvous = (
        f"{node.rendezvous_seconds:.2f} s" if node.rendezvous_seconds is not None else "unknown"
    )
    return (
        f"{node.name}: group rank {first['group_rank']}, rank {ranks}, "
        f"world size {first['world_size']}, sum {first['sum']} (expected {first['expected']}) "
        f"{sums}, rendezvous {rendezvous}"
    )


def _shown(path: Path, cwd: Path | None = None) -> Path:
    """`path` relative to the working directory when inside it: shorter to read and copy."""
    try:
        return path.relative_to(cwd or Path.cwd())
    except ValueError:
        return path


def run_demo(options: DemoOptions, cwd: Path) -> int:
    worker = find_worker_script(options.worker, cwd)
    run_dir = create_run_dir(options.out, cwd).resolve()
    run_id = f"demo-{uuid.uuid4().hex[:8]}"
    etcd_log = run_dir / "etcd.log"
    # No data_dir: etcd's data (tens of MB of preallocated WAL) goes to a temporary
    # directory that close() removes; only its log is kept with the run.
    with start_local_etcd(
        name="etcd-rdzv-demo", log_path=etcd_log, enable_v2=options.etcd_api == "v2"
    ) as etcd:
        print(
            f"etcd-rdzv demo: {options.nodes} nodes x {options.nproc_per_node} worker(s), "
            f"etcd at {etcd.endpoint} (API {options.etcd_api}), run id {run_id}",
            flush=True,
        )
        nodes: list[Node] = []
        started = time.monotonic()
        try:
            for index, port in enumerate(free_loopback_ports(options.nodes)):
                nodes.append(
                    start_node(
                        index,
                        options,
                        endpoint=etcd.endpoint,
                        worker=worker,
                        run_dir=run_dir,
                        run_id=run_id,
                        metrics_port=port,
                    )
                )
            print(
                "While the job runs, each agent serves Prometheus metrics: "
                + ", ".join(
                    f"{n.agent.name} http://{LOOPBACK}:{n.metrics_port}/metrics" for n in nodes
                ),
                flush=True,
            )
            codes = wait_for_agents([node.agent for node in nodes], options.timeout)
        finally:
            # SIGKILL, not a graceful stop: etcd is thrown away next, so there is no
            # rendezvous worth closing; and after Ctrl-C, which reaches etcd too (same process
            # group), a graceful torchrun would retry the dead etcd for seconds.
            kill_agents([node.agent for node in nodes])
        seconds = time.monotonic() - started
    outcome = collect_outcome(nodes, codes, options, seconds)
    print(format_report(outcome, _shown(run_dir, cwd)), flush=True)
    analyze_run(run_dir, run_id, cwd)
    return 0 if outcome.ok else 1


def analyze_run(run_dir: Path, run_id: str, cwd: Path) -> None:
    """What `etcd-rdzv analyze` says of this run's traces, and its timeline picture."""
    trace_file = run_dir / TRACE_FILE_NAME
    if not trace_file.is_file():
        print(f"No traces were written to {_shown(trace_file, cwd)}: nothing to analyze.")
        return
    from etcd_rdzv.cli import main as etcd_rdzv_command

    timeline = run_dir / TIMELINE_FILE_NAME
    shown = f"{_shown(trace_file, cwd)} --run-id {run_id} --plot {_shown(timeline, cwd)}"
    print(f"\n$ etcd-rdzv analyze {shown}", flush=True)
    etcd_rdzv_command(["analyze", str(trace_file), "--run-id", run_id, "--plot", str(timeline)])


class _SigtermAsInterrupt:
    """While active, SIGTERM raises KeyboardInterrupt, so cleanup runs as for Ctrl-C."""

    def __enter__(self) -> None:
        self._previous = signal.signal(signal.SIGTERM, self._raise)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    @staticmethod
    def _raise(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        with _SigtermAsInterrupt():
            return run_demo(options, Path.cwd())
    except (DemoError, LocalEtcdError) as error:
        print(f"etcd-rdzv demo: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("etcd-rdzv demo: interrupted; every process it started is stopped.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
