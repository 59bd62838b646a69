"""Drive rendezvous participants, each a real separate process (see participant.py).

A `Participant` is one node's rendezvous client; a `ParticipantGroup` starts several, possibly
on different backends, releases their rendezvous together and always stops them all.
`check_membership` is the invariant every rendezvous scenario must satisfy.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from etcd_rdzv.kv import KeyNotFound, KeyValue
from etcd_rdzv.layouts import RunPaths, layout_of_client
from etcd_rdzv.protocol import RendezvousState
from etcd_rdzv_devtools.logfiles import log_tail

# Every participant serves its metrics, as a real agent does, but only on loopback and on a
# free port; a test that scrapes them sets its own port through `conf`.
LOOPBACK_METRICS = {"ETCD_RDZV_METRICS_ADDR": "127.0.0.1", "ETCD_RDZV_METRICS_PORT": "0"}

PARTICIPANT_SCRIPT = Path(__file__).with_name("participant.py")
STANDBY = "--standby"  # participant.py's argument for a process started ahead of need
# Each participant imports torch; on a 2-core machine several doing so at once take a while.
DEFAULT_READY_TIMEOUT = 60.0
DEFAULT_STOP_TIMEOUT = 10.0
_REAP_TIMEOUT = 5.0
_STDERR_TAIL_LINES = 30

JsonDict = dict[str, Any]


class ParticipantError(AssertionError):
    """A participant died, timed out, or answered with something other than expected."""


class _EndOfOutput:
    """Put on the queue by the reader thread when the participant's stdout closes."""


_END = _EndOfOutput()


class _Process:
    """A participant process and the thread that reads its stdout into a queue of answers."""

    def __init__(self, argv: list[str], log_path: Path, env: Mapping[str, str]) -> None:
        self.log_path = log_path
        self.ignored_lines: list[str] = []
        # Each answer with the monotonic time it was read, so a test can order events.
        self.answers: queue.Queue[tuple[JsonDict, float] | _EndOfOutput] = queue.Queue()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as stderr_log:
            self.popen = subprocess.Popen(
                [sys.executable, str(PARTICIPANT_SCRIPT), *argv],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr_log,
                text=True,
                encoding="utf-8",
                env=dict(env),
            )
        assert self.popen.stdout is not None
        self.reader = threading.Thread(
            target=self._read_answers,
            args=(self.popen.stdout,),
            name=f"{log_path.stem}-stdout",
            daemon=True,
        )
        self.reader.start()

    def _read_answers(self, stdout: IO[str]) -> None:
        for line in stdout:
            try:
                answer = json.loads(line)
            except ValueError:
                answer = None
            if isinstance(answer, dict):
                self.answers.put((answer, time.monotonic()))
            else:
                # participant.py keeps stdout for protocol lines; anything else is a bug there.
                self.ignored_lines.append(line.rstrip("\n"))
        self.answers.put(_END)


class StandbyPool:
    """Participant processes started ahead of need, each waiting for its arguments.

    Starting a participant imports torch, seconds of CPU on a 2-core machine. A test module
    that starts many gives its groups a pool: each start then takes a process that already
    imported everything. The pool starts a replacement once the one taken is ready, so the
    replacements warm up while the test waits on etcd, not while its own participants start.
    Call `close` (or use as a context manager) to end the idle ones.
    """

    def __init__(self, log_dir: Path, size: int = 4) -> None:
        self.log_dir = log_dir
        self.size = size
        self._idle: list[_Process] = []
        self._spawned = 0
        self.fill()

    def take(self) -> _Process:
        return self._idle.pop(0) if self._idle else self._spawn()

    def fill(self) -> None:
        while len(self._idle) < self.size:
            self._idle.append(self._spawn())

    def _spawn(self) -> _Process:
        self._spawned += 1
        log_path = self.log_dir / f"standby-{self._spawned}.stderr.log"
        return _Process([STANDBY], log_path, os.environ)

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for process in idle:
            # End of input ends a standby participant.
            with contextlib.suppress(OSError):
                assert process.popen.stdin is not None
                process.popen.stdin.close()
        for process in idle:
            try:
                process.popen.wait(DEFAULT_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait(_REAP_TIMEOUT)
            process.reader.join(_REAP_TIMEOUT)
            with contextlib.suppress(OSError):
                assert process.popen.stdout is not None
                process.popen.stdout.close()

    def __enter__(self) -> StandbyPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Participant:
    """One rendezvous participant process, spoken to in JSON lines.

    Construction spawns the process (or configures one of `standby`);
    `wait_ready` waits for its handler to exist.
    """

    def __init__(
        self,
        name: str,
        *,
        backend: str,
        endpoint: str,
        run_id: str,
        min_nodes: int,
        max_nodes: int,
        log_dir: Path,
        conf: Mapping[str, str] | None = None,
        local_addr: str | None = None,
        env: Mapping[str, str] | None = None,
        die_at: str | None = None,
        gate_at: str | None = None,
        standby: StandbyPool | None = None,
    ) -> None:
        """`env` entries are added to this process's environment for the participant.

        `die_at` / `gate_at` hold it at a protocol point (see participant.py): answer the
        `held` line with `expect_held`, then `kill` it, or `release` it from the gate.
        """
        self.name = name
        self.backend = backend
        self._exit_requested = False
        self.last_answer_at: float | None = None
        # The version of the last rendezvous this participant completed.
        self.member_of: int | None = None
        argv = [
            f"--backend={backend}",
            f"--endpoint={endpoint}",
            f"--run-id={run_id}",
            f"--min-nodes={min_nodes}",
            f"--max-nodes={max_nodes}",
        ]
        argv += [f"--conf={key}={value}" for key, value in (conf or {}).items()]
        if local_addr is not None:
            argv.append(f"--local-addr={local_addr}")
        if die_at is not None:
            argv.append(f"--die-at={die_at}")
        if gate_at is not None:
            argv.append(f"--gate-at={gate_at}")
        environment = {**os.environ, **LOOPBACK_METRICS, **(env or {})}
        if standby is None:
            self._process = _Process(argv, log_dir / f"{name}.stderr.log", environment)
        else:
            self._process = standby.take()
        self.process = self._process.popen
        self.log_path = self._process.log_path
        self.ignored_lines = self._process.ignored_lines
        self._answers = self._process.answers
        self._reader = self._process.reader
        self._standby = standby
        if standby is not None:
            self.send({"cmd": "configure", "argv": argv, "env": environment})

    @property
    def pid(self) -> int:
        return self.process.pid

    def __repr__(self) -> str:
        return f"Participant({self.name!r}, backend={self.backend!r}, pid={self.pid})"

    def wait_ready(self, timeout: float = DEFAULT_READY_TIMEOUT) -> JsonDict:
        ready = self.expect("ready", timeout)
        if self._standby is not None:
            self._standby.fill()  # replace the process this participant took
        return ready

    def send(self, cmd: Mapping[str, Any]) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps(dict(cmd)) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise self._failure(f"cannot send {dict(cmd)}: {exc!r}") from exc

    def expect(self, event: str, timeout: float) -> JsonDict:
        """The next answer, which must be `event`; raise `ParticipantError` otherwise."""
        try:
            item = self._answers.get(timeout=timeout)
        except queue.Empty:
            raise self._failure(f"no {event!r} answer within {timeout:.1f}s") from None
        if isinstance(item, _EndOfOutput):
            # Put back so later calls fail the same way instead of waiting out their timeout.
            self._answers.put(item)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(_REAP_TIMEOUT)
            raise self._failure(
                f"exited (code {self.process.returncode}) while {event!r} was expected"
            )
        answer, self.last_answer_at = item
        if answer.get("event") != event:
            if answer.get("event") == "error":
                raise self._failure(
                    f"error while {event!r} was expected: {answer.get('type')} in "
                    f"{answer.get('where')}: {answer.get('message')}\n"
                    f"{answer.get('traceback', '')}"
                )
            raise self._failure(f"answered {answer} while {event!r} was expected")
        return answer

    def expect_answer(self, timeout: float) -> JsonDict:
        """The next answer, whatever it is (an error too); `ParticipantError` if none comes."""
        try:
            item = self._answers.get(timeout=timeout)
        except queue.Empty:
            raise self._failure(f"no answer within {timeout:.1f}s") from None
        if isinstance(item, _EndOfOutput):
            self._answers.put(item)
            raise self._failure("exited while an answer was expected")
        answer, self.last_answer_at = item
        return answer

    def request(self, cmd: Mapping[str, Any], timeout: float) -> JsonDict:
        self.send(cmd)
        return self.expect(str(cmd["cmd"]), timeout)

    def rendezvous(self, timeout: float) -> JsonDict:
        return self._label(self.request({"cmd": "rendezvous"}, timeout))

    def expect_rendezvous(self, timeout: float) -> JsonDict:
        """The answer to a `rendezvous` sent earlier, labelled with this participant."""
        return self._label(self.expect("rendezvous", timeout))

    def _label(self, result: JsonDict) -> JsonDict:
        if result.get("event") == "rendezvous":
            self.member_of = result.get("version")
        return {
            **result,
            "participant": self.name,
            "pid": self.pid,
            "received_at": self.last_answer_at,
        }

    def expect_held(self, point: str, timeout: float) -> JsonDict:
        """The `held` line of a `die_at` / `gate_at` participant, which must be at `point`.

        Labelled like a rendezvous result, so `check_membership` can count a member that
        died after confirming.
        """
        held = self._label(self.expect("held", timeout))
        if held.get("point") != point:
            raise self._failure(f"held at {held.get('point')!r} instead of {point!r}: {held}")
        return held

    def release(self) -> None:
        """Let a participant held by `gate_at` carry on."""
        self.process.send_signal(signal.SIGUSR1)

    def stacks(self, timeout: float = 5.0) -> str:
        """Every thread's stack (participant.py dumps them to stderr on SIGUSR2)."""
        before = self.log_path.stat().st_size
        self.process.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.log_path.open("rb") as log:
                log.seek(before)
                dumped = log.read().decode("utf-8", errors="replace")
            # faulthandler writes the current thread last, in one go.
            if "Current thread" in dumped and dumped.endswith("\n"):
                return dumped
            time.sleep(0.05)
        raise self._failure(f"no stack dump within {timeout:.1f}s")

    def num_nodes_waiting(self, timeout: float) -> JsonDict:
        """Ask `num_nodes_waiting`: a record of what this participant would act on.

        It carries `member_of` (the version of its last rendezvous) and `sent_at`, so that
        `check_membership` can tell a stale member that would carry on (value 0) in a version
        that another completed version replaced.
        """
        member_of, sent_at = self.member_of, time.monotonic()
        answer = self.request({"cmd": "num_nodes_waiting"}, timeout)
        return {**self._label(answer), "member_of": member_of, "sent_at": sent_at}

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send `sig`; for SIGKILL also reap, so the process is surely gone on return."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        if sig == signal.SIGKILL:
            self.process.wait(_REAP_TIMEOUT)

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> int:
        """Ask to exit, kill if that does not work in time; return the exit code. Idempotent."""
        self.request_exit()
        return self.finish_exit(time.monotonic() + timeout)

    def request_exit(self) -> None:
        """First half of `stop`: ask to exit without waiting (lets a group stop in parallel)."""
        if self._exit_requested:
            return
        self._exit_requested = True
        if self.process.poll() is None:
            # A paused participant could never read `exit`.
            self.process.send_signal(signal.SIGCONT)
            # One busy in a rendezvous reads `exit` only after it; `finish_exit` then kills it.
            with contextlib.suppress(ParticipantError):
                self.send({"cmd": "exit"})

    def finish_exit(self, deadline: float) -> int:
        """Second half of `stop`: wait until `deadline`, then kill; release pipes and thread."""
        if self.process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(max(0.0, deadline - time.monotonic()))
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(_REAP_TIMEOUT)
        # The process is gone, so the reader meets end of output; join it before closing the
        # pipe under it.
        self._reader.join(_REAP_TIMEOUT)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        return self.process.returncode

    def stderr_tail(self, lines: int = _STDERR_TAIL_LINES) -> str:
        return log_tail(self.log_path, lines)

    def _failure(self, what: str) -> ParticipantError:
        ignored = f"\nnon-protocol stdout lines: {self.ignored_lines}" if self.ignored_lines else ""
        return ParticipantError(
            f"{self!r} {what}{ignored}\n--- stderr tail ({self.log_path}) ---\n{self.stderr_tail()}"
        )


class ParticipantGroup:
    """Participants of one run; `start` may be called repeatedly, e.g. once per backend.

    Use as a context manager: every process is stopped on exit, also when a test fails.
    """

    def __init__(
        self,
        log_dir: Path,
        *,
        endpoint: str,
        run_id: str,
        min_nodes: int,
        max_nodes: int,
        conf: Mapping[str, str] | None = None,
        local_addr: str | None = None,
        env: Mapping[str, str] | None = None,
        standby: StandbyPool | None = None,
    ) -> None:
        """With `standby`, participants are taken from that pool instead of spawned."""
        self.log_dir = log_dir
        self.standby = standby
        self.endpoint = endpoint
        self.run_id = run_id
        self.min_nodes = min_nodes
        self.max_nodes = max_nodes
        self.conf = dict(conf or {})
        self.local_addr = local_addr
        self.env = dict(env or {})
        self.members: list[Participant] = []

    def start(
        self,
        count: int = 1,
        *,
        backend: str,
        conf: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        ready_timeout: float = DEFAULT_READY_TIMEOUT,
        die_at: str | None = None,
        gate_at: str | None = None,
    ) -> list[Participant]:
        """Spawn `count` participants on `backend` and wait until all are ready.

        `conf` and `env` entries are added to (and override) the group's; `die_at` and
        `gate_at` are passed to each participant.
        """
        started = self.spawn(
            count, backend=backend, conf=conf, env=env, die_at=die_at, gate_at=gate_at
        )
        wait_ready(started, ready_timeout)
        return started

    def spawn(
        self,
        count: int = 1,
        *,
        backend: str,
        conf: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        die_at: str | None = None,
        gate_at: str | None = None,
    ) -> list[Participant]:
        """`start` without waiting: spawn several kinds, then `wait_ready` for all at once."""
        spawned = []
        for _ in range(count):
            participant = Participant(
                f"p{len(self.members)}-{backend}",
                backend=backend,
                endpoint=self.endpoint,
                run_id=self.run_id,
                min_nodes=self.min_nodes,
                max_nodes=self.max_nodes,
                log_dir=self.log_dir,
                conf={**self.conf, **(conf or {})},
                local_addr=self.local_addr,
                env={**self.env, **(env or {})},
                die_at=die_at,
                gate_at=gate_at,
                standby=self.standby,
            )
            # Registered at once, so a failure later still stops it.
            self.members.append(participant)
            spawned.append(participant)
        return spawned

    def rendezvous_all(
        self, timeout: float, participants: Iterable[Participant] | None = None
    ) -> list[JsonDict]:
        """Send `rendezvous` to all first, so they join together, then collect every answer."""
        return rendezvous_together(self.members if participants is None else participants, timeout)

    def stop_all(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> dict[str, int]:
        """Stop every participant (in parallel, within `timeout`); exit codes by name."""
        for participant in self.members:
            participant.request_exit()
        deadline = time.monotonic() + timeout
        return {p.name: p.finish_exit(deadline) for p in self.members}

    def __enter__(self) -> ParticipantGroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()


@contextlib.contextmanager
def participants(
    n: int,
    *,
    backend: str,
    endpoint: str,
    run_id: str,
    min_nodes: int,
    max_nodes: int,
    tmp_dir: Path,
    conf: Mapping[str, str] | None = None,
    local_addr: str | None = None,
) -> Iterator[list[Participant]]:
    """`n` ready participants on one backend, all stopped on exit."""
    with ParticipantGroup(
        tmp_dir,
        endpoint=endpoint,
        run_id=run_id,
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        conf=conf,
        local_addr=local_addr,
    ) as group:
        yield group.start(n, backend=backend)


def wait_ready(participants: Iterable[Participant], timeout: float = DEFAULT_READY_TIMEOUT) -> None:
    """Wait until every participant's handler exists, within one shared `timeout`."""
    deadline = time.monotonic() + timeout
    for participant in participants:
        participant.wait_ready(max(0.0, deadline - time.monotonic()))


def rendezvous_together(participants: Iterable[Participant], timeout: float) -> list[JsonDict]:
    """Send `rendezvous` to all first, so they join together, then collect every answer."""
    chosen = list(participants)
    for participant in chosen:
        participant.send({"cmd": "rendezvous"})
    deadline = time.monotonic() + timeout
    return [p.expect_rendezvous(max(0.0, deadline - time.monotonic())) for p in chosen]


def logged_events(node: Participant, name: str | None = None) -> list[JsonDict]:
    """The structlog JSON events in a participant's stderr log (other lines skipped); with
    `name`, only the events of that name."""
    events = []
    for line in node.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and "event" in event and name in (None, event["event"]):
            events.append(event)
    return events


def joined_ranks(kv: KeyValue, run_id: str) -> list[int] | None:
    """The ranks taken in the run's current version, in either layout (under claims, over v3,
    the joinable document does not list them); None while there is no state."""
    paths = RunPaths(f"/torchelastic/p2p/run_{run_id}")
    try:
        entry = kv.get(paths.active_version)
    except KeyNotFound:
        return None
    state = RendezvousState.decode(entry.value, entry.key)
    return list(layout_of_client(kv, paths).with_participants(kv, state).participants)


def leave_stale_frozen_version(kv: KeyValue, run_id: str, ttl: float = 1.0) -> None:
    """A frozen version 1 that a dead run left behind: a node's first setup waits for its TTL
    to end, then starts over (one retry) and opens version 2."""
    base = f"/torchelastic/p2p/run_{run_id}/rdzv"
    kv.put(f"{base}/version_counter", "1")
    stale = {"status": "frozen", "version": "1", "participants": [0, 1], "keep_alives": []}
    kv.put(f"{base}/active_version", json.dumps(stale), ttl=ttl)


# A participant held (and killed) at one of these points had confirmed its rank: if its
# version completes, it is one of its members. Held at any earlier point, it is in none.
CONFIRMED_POINTS = frozenset({"confirm", "final"})


def check_membership(records: Iterable[Mapping[str, Any]]) -> None:
    """Assert the invariant over every record of one scenario, across all its versions.

    Records are labelled participant answers (`Participant` labels them): rendezvous results,
    `held` lines of participants held and killed at a protocol point (`expect_held`), and
    `num_nodes_waiting` records (`Participant.num_nodes_waiting`). For every version that
    completed (some participant got it from a rendezvous):

    1. One membership: its members agree on one world size and one master address and port,
       and the world size is the number of its members. A participant held after confirming
       (`confirm`, `final`) is a member with the rank it held; one held before confirming
       cannot be in a completed version at all.
    2. Ranks are exactly 0..world_size-1, each once.
    3. No participant of an older version still acts: each participant's versions only go up
       in the order it got them (never an older one, never one twice), and once a version
       completed, no member of an older one reads `num_nodes_waiting` 0, which tells torchrun
       to carry on with its old rank.

    Results whose version is None (a backend whose store has no version in its prefix) are
    checked as one group for 1 and 2.
    """
    results: list[Mapping[str, Any]] = []
    held: list[Mapping[str, Any]] = []
    observations: list[Mapping[str, Any]] = []
    for record in records:
        kind = record.get("event", "rendezvous")
        if kind == "rendezvous":
            missing = {"rank", "world_size", "version"} - set(record)
            assert not missing, f"rendezvous result lacks {sorted(missing)}: {dict(record)}"
            results.append(record)
        elif kind == "held":
            held.append(record)
        elif kind == "num_nodes_waiting":
            observations.append(record)
        else:
            raise AssertionError(f"not a record check_membership knows: {dict(record)}")
    assert results, "no rendezvous results to check"

    by_version: dict[int | None, list[Mapping[str, Any]]] = defaultdict(list)
    for result in results:
        by_version[result["version"]].append(result)
    for record in held:
        version = record.get("version")
        if version is None or version not in by_version:
            continue  # held in a version that never completed: nothing to agree with
        assert record.get("point") in CONFIRMED_POINTS, (
            f"version {version} completed although {_who(record)} was held at "
            f"{record.get('point')!r}, before confirming it: a second membership of {version}"
        )
        by_version[version].append(record)
    for version, members in by_version.items():
        _check_one_version(version, members)
    _check_no_stale_member_acts(results, observations)


def _who(record: Mapping[str, Any]) -> str:
    return str(record.get("participant", "?"))


def _check_one_version(version: int | None, members: list[Mapping[str, Any]]) -> None:
    def who(record: Mapping[str, Any]) -> str:
        size = record.get("world_size", f"? (held at {record.get('point')})")
        return f"{_who(record)}: rank {record.get('rank')}/{size}"

    listing = "; ".join(who(record) for record in members)
    context = f"version {version} ({listing})"
    # Held members died before they could report a world size.
    reporting = [record for record in members if record.get("event", "rendezvous") != "held"]

    world_sizes = {result["world_size"] for result in reporting}
    assert len(world_sizes) == 1, f"{context}: members disagree on world size {world_sizes}"
    world_size = world_sizes.pop()
    assert world_size == len(members), (
        f"{context}: world size {world_size} but {len(members)} participants got this version"
    )

    ranks = sorted(record["rank"] for record in members)
    duplicates = sorted({rank for rank in ranks if ranks.count(rank) > 1})
    assert not duplicates, f"{context}: duplicate ranks {duplicates}"
    assert ranks == list(range(world_size)), (
        f"{context}: ranks {ranks} are not exactly 0..{world_size - 1}"
    )

    masters = {(result.get("master_addr"), result.get("master_port")) for result in reporting}
    assert len(masters) == 1, f"{context}: members disagree on master address/port {masters}"


def _check_no_stale_member_acts(
    results: list[Mapping[str, Any]], observations: list[Mapping[str, Any]]
) -> None:
    by_participant: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for result in results:
        if "participant" in result and result["version"] is not None:
            by_participant[result["participant"]].append(result)
    for name, got in by_participant.items():
        in_order = got
        if all(result.get("received_at") is not None for result in got):
            in_order = sorted(got, key=lambda result: float(result["received_at"]))
        versions = [result["version"] for result in in_order]
        assert all(a < b for a, b in itertools.pairwise(versions)), (
            f"{name} got versions {versions} in this order: a participant must only move on "
            "to newer versions"
        )

    completed_at: dict[int, float] = {}
    for result in results:
        version, at = result["version"], result.get("received_at")
        if version is not None and at is not None:
            completed_at[version] = min(float(at), completed_at.get(version, float(at)))
    for observation in observations:
        member_of, sent_at = observation.get("member_of"), observation.get("sent_at")
        if member_of is None or sent_at is None:
            continue
        newer = [v for v, at in completed_at.items() if v > member_of and at <= float(sent_at)]
        assert not newer or observation["value"] > 0, (
            f"{_who(observation)}, a member of version {member_of}, read num_nodes_waiting "
            f"{observation['value']} (carry on with its rank) after version {max(newer)} "
            "had completed"
        )
