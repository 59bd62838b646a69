"""Drive rendezvous participants, each a real separate process (see participant.py).

A `Participant` is one node's rendezvous client; a `ParticipantGroup` starts several, possibly
on different backends, releases their rendezvous together and always stops them all.
`check_membership` is the invariant every rendezvous result must satisfy.
"""

from __future__ import annotations

import contextlib
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

from etcd_rdzv.kv import KeyValue
from etcd_rdzv.logfiles import log_tail

# Every participant serves its metrics, as a real agent does, but only on loopback and on a
# free port; a test that scrapes them sets its own port through `conf`.
LOOPBACK_METRICS = {"ETCD_RDZV_METRICS_ADDR": "127.0.0.1", "ETCD_RDZV_METRICS_PORT": "0"}

PARTICIPANT_SCRIPT = Path(__file__).with_name("participant.py")
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


class Participant:
    """One rendezvous participant process, spoken to in JSON lines.

    Construction spawns the process; `wait_ready` waits for its handler to exist.
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
    ) -> None:
        """`env` entries are added to this process's environment for the participant."""
        self.name = name
        self.backend = backend
        self.log_path = log_dir / f"{name}.stderr.log"
        self.ignored_lines: list[str] = []
        self._answers: queue.Queue[JsonDict | _EndOfOutput] = queue.Queue()
        self._exit_requested = False
        log_dir.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            str(PARTICIPANT_SCRIPT),
            f"--backend={backend}",
            f"--endpoint={endpoint}",
            f"--run-id={run_id}",
            f"--min-nodes={min_nodes}",
            f"--max-nodes={max_nodes}",
        ]
        command += [f"--conf={key}={value}" for key, value in (conf or {}).items()]
        if local_addr is not None:
            command.append(f"--local-addr={local_addr}")
        with self.log_path.open("wb") as stderr_log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr_log,
                text=True,
                encoding="utf-8",
                env={**os.environ, **LOOPBACK_METRICS, **(env or {})},
            )
        assert self.process.stdout is not None
        self._reader = threading.Thread(
            target=self._read_answers,
            args=(self.process.stdout,),
            name=f"{name}-stdout",
            daemon=True,
        )
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def __repr__(self) -> str:
        return f"Participant({self.name!r}, backend={self.backend!r}, pid={self.pid})"

    def _read_answers(self, stdout: IO[str]) -> None:
        for line in stdout:
            try:
                answer = json.loads(line)
            except ValueError:
                answer = None
            if isinstance(answer, dict):
                self._answers.put(answer)
            else:
                # participant.py keeps stdout for protocol lines; anything else is a bug there.
                self.ignored_lines.append(line.rstrip("\n"))
        self._answers.put(_END)

    def wait_ready(self, timeout: float = DEFAULT_READY_TIMEOUT) -> JsonDict:
        return self.expect("ready", timeout)

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
            answer = self._answers.get(timeout=timeout)
        except queue.Empty:
            raise self._failure(f"no {event!r} answer within {timeout:.1f}s") from None
        if isinstance(answer, _EndOfOutput):
            # Put back so later calls fail the same way instead of waiting out their timeout.
            self._answers.put(answer)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(_REAP_TIMEOUT)
            raise self._failure(
                f"exited (code {self.process.returncode}) while {event!r} was expected"
            )
        if answer.get("event") != event:
            if answer.get("event") == "error":
                raise self._failure(
                    f"error while {event!r} was expected: {answer.get('type')} in "
                    f"{answer.get('where')}: {answer.get('message')}\n"
                    f"{answer.get('traceback', '')}"
                )
            raise self._failure(f"answered {answer} while {event!r} was expected")
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
        return {**result, "participant": self.name, "pid": self.pid}

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
    ) -> None:
        self.log_dir = log_dir
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
    ) -> list[Participant]:
        """Spawn `count` participants on `backend` and wait until all are ready.

        `conf` and `env` entries are added to (and override) the group's.
        """
        started = []
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
            )
            # Registered before waiting, so a failure below still stops it.
            self.members.append(participant)
            started.append(participant)
        deadline = time.monotonic() + ready_timeout
        for participant in started:
            participant.wait_ready(max(0.0, deadline - time.monotonic()))
        return started

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


def rendezvous_together(participants: Iterable[Participant], timeout: float) -> list[JsonDict]:
    """Send `rendezvous` to all first, so they join together, then collect every answer."""
    chosen = list(participants)
    for participant in chosen:
        participant.send({"cmd": "rendezvous"})
    deadline = time.monotonic() + timeout
    return [p.expect_rendezvous(max(0.0, deadline - time.monotonic())) for p in chosen]


def leave_stale_frozen_version(kv: KeyValue, run_id: str, ttl: float = 1.0) -> None:
    """A frozen version 1 that a dead run left behind: a node's first setup waits for its TTL
    to end, then starts over (one retry) and opens version 2."""
    base = f"/torchelastic/p2p/run_{run_id}/rdzv"
    kv.put(f"{base}/version_counter", "1")
    stale = {"status": "frozen", "version": "1", "participants": [0, 1], "keep_alives": []}
    kv.put(f"{base}/active_version", json.dumps(stale), ttl=ttl)


def check_membership(results: Iterable[Mapping[str, Any]]) -> None:
    """Assert that rendezvous results form consistent memberships, one per version.

    Within each version: one world size, equal to the number of results; ranks exactly
    0..world_size-1, each once; one master address and port. Results whose version is
    None (a backend whose store has no version in its prefix) are checked as one group.
    """
    by_version: dict[int | None, list[Mapping[str, Any]]] = defaultdict(list)
    for result in results:
        missing = {"rank", "world_size", "version"} - set(result)
        assert not missing, f"rendezvous result lacks {sorted(missing)}: {dict(result)}"
        by_version[result["version"]].append(result)
    assert by_version, "no rendezvous results to check"
    for version, members in by_version.items():
        _check_one_version(version, members)


def _check_one_version(version: int | None, members: list[Mapping[str, Any]]) -> None:
    def who(result: Mapping[str, Any]) -> str:
        return f"{result.get('participant', '?')}: rank {result['rank']}/{result['world_size']}"

    listing = "; ".join(who(result) for result in members)
    context = f"version {version} ({listing})"

    world_sizes = {result["world_size"] for result in members}
    assert len(world_sizes) == 1, f"{context}: members disagree on world size {world_sizes}"
    world_size = world_sizes.pop()
    assert world_size == len(members), (
        f"{context}: world size {world_size} but {len(members)} participants got this version"
    )

    ranks = sorted(result["rank"] for result in members)
    duplicates = sorted({rank for rank in ranks if ranks.count(rank) > 1})
    assert not duplicates, f"{context}: duplicate ranks {duplicates}"
    assert ranks == list(range(world_size)), (
        f"{context}: ranks {ranks} are not exactly 0..{world_size - 1}"
    )

    masters = {(result.get("master_addr"), result.get("master_port")) for result in members}
    assert len(masters) == 1, f"{context}: members disagree on master address/port {masters}"
