"""One node's agent-side rendezvous client in its own process, driven by JSON lines.

Run as `python tests/support/participant.py --backend etcd --endpoint 127.0.0.1:2379 ...`.
The handler is created exactly as torchrun's agent creates it. Then each line on stdin is one
command (`{"cmd": "rendezvous"}`) and each gets exactly one JSON line on stdout in answer:
`{"event": <cmd>, ...}` or `{"event": "error", "type", "message", "where", "cmd"}`.
See tests/support/harness.py for the driving side.

Fault injection (etcd-rdzv backend only; test code, not product code): `--die-at POINT` makes
the participant, on reaching POINT of the protocol, print `{"event": "held", "point": POINT,
"version": V, "rank": R}` and block forever, so that a test kills it exactly there.
`--gate-at POINT` prints the same line (with `"gate": true`) and blocks until SIGUSR1, then
carries on. Both hook in through the product's observer seam; each fires once. The points:

    setup      this node wrote the setup placeholder (it is opening the next version)
    join       its own join compare-and-swap applied (it holds a rank; the version may still
               be joinable, or this join froze it)
    last_call  it entered the last call, as the node that holds it
    frozen     the participant set froze; this node has not confirmed yet
    confirm    its own confirmation applied (its keep-alive key exists)
    final      the version it is a member of went final; next_rendezvous has not returned
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

# The store prefix of both torch's EtcdStore and ours: `<prefix>/run_<id>/rdzv/v_<N>/kv/`.
_VERSION_IN_PREFIX = re.compile(r"/v_(\d+)/kv/")
_PARENT_POLL_SECONDS = 0.5
HOLD_POINTS = ("setup", "join", "last_call", "frozen", "confirm", "final")
_OUR_BACKEND = "etcd-rdzv"
# The only argument of a participant started ahead of need; `_stand_by` tells the rest.
STANDBY = "--standby"

JsonDict = dict[str, Any]


def main(argv: list[str] | None = None) -> int:
    protocol = _take_over_stdout()
    # SIGUSR2 writes every thread's stack to stderr: where a participant hangs, for tests.
    faulthandler.register(signal.SIGUSR2, file=sys.stderr, all_threads=True)
    # The fault hook writes from inside the protocol; keep each line whole.
    emitting = threading.Lock()

    def emit(event: JsonDict) -> None:
        with emitting:
            protocol.write(json.dumps(event) + "\n")
            protocol.flush()

    stage = "args"
    try:
        _exit_when_orphaned()
        argv = sys.argv[1:] if argv is None else argv
        if argv == [STANDBY]:
            stage = "standby"
            configured = _stand_by(sys.stdin)
            if configured is None:
                return 0
            argv = configured
            stage = "args"
        args = _parse_args(argv)
        stage = "create"
        handler = _create_handler(args, emit)
        emit({"event": "ready", "pid": os.getpid()})
        stage = "serve"
        return _serve(_Session(handler), sys.stdin, emit)
    except BaseException as exc:
        # Even SystemExit from argparse or a KeyboardInterrupt gets an answer: never die silently.
        emit(_error_event(exc, where=stage))
        return 1


def _stand_by(commands_in: TextIO) -> list[str] | None:
    """Import the expensive modules now, then wait, silently, for the arguments to run with.

    A test keeps a few participants on standby (see `StandbyPool` in harness.py) so that
    starting one costs no torch import. The one line expected is `{"cmd": "configure",
    "argv": [...], "env": {...}}`; the environment becomes exactly `env`, as if the process
    had just been spawned with it. End of input (the pool closing) ends the process.
    """
    import torch.distributed.elastic.rendezvous.registry  # noqa: F401

    import etcd_rdzv.handler  # noqa: F401

    line = commands_in.readline()
    if not line:
        return None
    command = json.loads(line)
    if command.get("cmd") != "configure":
        raise ValueError(f"a standby participant expects `configure` first, got {command}")
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in command["env"].items()})
    return [str(arg) for arg in command["argv"]]


def _take_over_stdout() -> TextIO:
    """Keep the real stdout for protocol lines only and send everything else to stderr.

    Anything a library prints (Python or C level) would otherwise corrupt the JSON stream.
    """
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    return protocol


def _exit_when_orphaned() -> None:
    # A participant blocked in next_rendezvous must not outlive a test run that was killed.
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_SECONDS)
        os._exit(3)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--min-nodes", type=int, required=True)
    parser.add_argument("--max-nodes", type=int, required=True)
    parser.add_argument(
        "--conf",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a rendezvous config entry, as torchrun's --rdzv-conf (repeatable)",
    )
    parser.add_argument("--local-addr", default=None)
    hold = parser.add_mutually_exclusive_group()
    hold.add_argument(
        "--die-at",
        choices=HOLD_POINTS,
        default=None,
        help="on reaching this protocol point, print a `held` line and block forever",
    )
    hold.add_argument(
        "--gate-at",
        choices=HOLD_POINTS,
        default=None,
        help="on reaching this protocol point, print a `held` line and block until SIGUSR1",
    )
    args = parser.parse_args(argv)
    if (args.die_at or args.gate_at) and args.backend != _OUR_BACKEND:
        parser.error(f"--die-at and --gate-at need --backend={_OUR_BACKEND}")
    return args


def _parse_conf(entries: list[str]) -> dict[str, str]:
    conf = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise ValueError(f"--conf expects KEY=VALUE, got {entry!r}")
        conf[key] = value
    return conf


def _create_handler(args: argparse.Namespace, emit: Callable[[JsonDict], None]) -> Any:
    # Imported here so a failing torch import is reported as a `create` error event.
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

    params = RendezvousParameters(
        backend=args.backend,
        endpoint=args.endpoint,
        run_id=args.run_id,
        min_nodes=args.min_nodes,
        max_nodes=args.max_nodes,
        local_addr=args.local_addr,
        **_parse_conf(args.conf),
    )
    point = args.die_at or args.gate_at
    if point is None:
        return get_rendezvous_handler(params)
    # The same handler torchrun would get, with one more observer next to its telemetry.
    from etcd_rdzv.config import RendezvousConfig
    from etcd_rdzv.handler import create_handler
    from etcd_rdzv.telemetry import FanOut
    from etcd_rdzv.telemetry.agent import build_telemetry

    released = None
    if args.gate_at is not None:
        released = threading.Event()
        signal.signal(signal.SIGUSR1, lambda *_: released.set())
    hook = _make_hold_hook(point, emit, released)
    telemetry = build_telemetry(RendezvousConfig.from_parameters(params))
    return create_handler(params, observer=FanOut([telemetry, hook]))


def _make_hold_hook(
    point: str, emit: Callable[[JsonDict], None], released: threading.Event | None
) -> Any:
    """An `Observer` that holds the protocol at `point` (see the module docstring)."""
    from etcd_rdzv.telemetry import Observer, Phase, PhaseScope

    class HoldAt(Observer):
        def __init__(self) -> None:
            self.fired = False
            self.phases: list[Phase] = []
            self.version: int | None = None
            self.rank: int | None = None

        def hold(self, at: str) -> None:
            if at != point or self.fired:
                return
            self.fired = True
            held = {"event": "held", "point": at, "version": self.version, "rank": self.rank}
            emit({**held, "gate": released is not None})
            if released is None:
                threading.Event().wait()  # until the test kills this process
            else:
                released.wait()

        @contextmanager
        def phase(self, phase: Phase, **attributes: Any) -> Iterator[PhaseScope]:
            self.phases.append(phase)
            self.version = attributes.get("version", self.version)
            self.rank = attributes.get("rank", self.rank)
            entering = {
                Phase.LAST_CALL: "last_call",
                Phase.CONFIRM: "frozen",
                Phase.FINAL_WAIT: "confirm",
            }.get(phase)
            try:
                if entering is not None:
                    self.hold(entering)
                yield Scope(self, phase)
            finally:
                self.phases.pop()

        def transition(
            self, version: int | None, before: str | None, after: str, participants: int,
            made: bool,
        ) -> None:  # fmt: skip
            self.version = version
            if after == "setup" and made:
                self.hold("setup")
            # Only as a member: a node that finds a final version in setup is not in it.
            elif after == "final" and {Phase.CONFIRM, Phase.FINAL_WAIT} & set(self.phases):
                self.hold("final")

    class Scope(PhaseScope):
        def __init__(self, hook: HoldAt, phase: Phase) -> None:
            self.hook = hook
            self.phase = phase

        def annotate(self, **attributes: Any) -> None:
            # The join phase annotates the rank right after its compare-and-swap applied.
            if self.phase is Phase.JOIN and "rank" in attributes:
                self.hook.rank = attributes["rank"]
                self.hook.hold("join")

    return HoldAt()


class _Session:
    """The handler and the store of the last completed rendezvous, one method per command."""

    def __init__(self, handler: Any) -> None:
        self.handler = handler
        self.store: Any = None

    def commands(self) -> dict[str, Callable[[JsonDict], JsonDict]]:
        return {
            "rendezvous": self.rendezvous,
            "num_nodes_waiting": lambda _: {"value": self.handler.num_nodes_waiting()},
            "is_closed": lambda _: {"value": self.handler.is_closed()},
            "set_closed": lambda _: {"value": self.handler.set_closed()},
            "shutdown": lambda _: {"value": self.handler.shutdown()},
            "store_set": self.store_set,
            "store_get": self.store_get,
            "store_add": self.store_add,
            "store_wait": self.store_wait,
            "store_check": self.store_check,
            "threads": lambda _: {"value": sorted(t.name for t in threading.enumerate())},
        }

    def rendezvous(self, _: JsonDict) -> JsonDict:
        started = time.monotonic()
        info = self.handler.next_rendezvous()
        seconds = time.monotonic() - started
        self.store = info.store
        bootstrap = info.bootstrap_store_info
        return {
            "rank": info.rank,
            "world_size": info.world_size,
            "version": _version_of(info.store),
            "seconds": seconds,
            "master_addr": bootstrap.master_addr,
            "master_port": bootstrap.master_port,
        }

    def _last_store(self) -> Any:
        if self.store is None:
            raise RuntimeError("no store yet: send `rendezvous` first")
        return self.store

    def store_set(self, cmd: JsonDict) -> JsonDict:
        self._last_store().set(cmd["key"], cmd["value"].encode("utf-8"))
        return {"value": None}

    def store_get(self, cmd: JsonDict) -> JsonDict:
        value: bytes = self._last_store().get(cmd["key"])
        return {"value": value.decode("utf-8", errors="backslashreplace")}

    def store_add(self, cmd: JsonDict) -> JsonDict:
        return {"value": int(self._last_store().add(cmd["key"], int(cmd["amount"])))}

    def store_wait(self, cmd: JsonDict) -> JsonDict:
        timeout = datetime.timedelta(seconds=float(cmd["timeout_seconds"]))
        # Positional: torch's EtcdStore names the parameter differently from c10d's Store.
        self._last_store().wait(list(cmd["keys"]), timeout)
        return {"value": None}

    def store_check(self, cmd: JsonDict) -> JsonDict:
        return {"value": bool(self._last_store().check(list(cmd["keys"])))}


def _version_of(store: Any) -> int | None:
    match = _VERSION_IN_PREFIX.search(str(getattr(store, "prefix", "")))
    return int(match.group(1)) if match else None


def _serve(session: _Session, commands_in: TextIO, emit: Callable[[JsonDict], None]) -> int:
    commands = session.commands()
    for line in commands_in:
        if not line.strip():
            continue
        name = None
        try:
            command = json.loads(line)
            name = command["cmd"]
            if name == "exit":
                emit({"event": "exit"})
                return 0
            if name not in commands:
                raise ValueError(f"unknown command {name!r}; known: exit, {', '.join(commands)}")
            emit({"event": name, **commands[name](command)})
        except Exception as exc:
            emit(_error_event(exc, where=name or "protocol", cmd=name))
    # stdin closed: the driver is gone, so nobody could read any further answer.
    return 0


def _error_event(exc: BaseException, *, where: str, cmd: str | None = None) -> JsonDict:
    trace = "".join(traceback.format_exception(exc))
    print(trace, file=sys.stderr, flush=True)
    return {
        "event": "error",
        "type": type(exc).__name__,
        "message": str(exc),
        "where": where,
        "cmd": cmd,
        "traceback": trace,
    }


if __name__ == "__main__":
    sys.exit(main())
