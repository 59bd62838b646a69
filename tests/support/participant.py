"""One node's agent-side rendezvous client in its own process, driven by JSON lines.

Run as `python tests/support/participant.py --backend etcd --endpoint 127.0.0.1:2379 ...`.
The handler is created exactly as torchrun's agent creates it. Then each line on stdin is one
command (`{"cmd": "rendezvous"}`) and each gets exactly one JSON line on stdout in answer:
`{"event": <cmd>, ...}` or `{"event": "error", "type", "message", "where", "cmd"}`.
See tests/support/harness.py for the driving side.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, TextIO

# The store prefix of both torch's EtcdStore and ours: `<prefix>/run_<id>/rdzv/v_<N>/kv/`.
_VERSION_IN_PREFIX = re.compile(r"/v_(\d+)/kv/")
_PARENT_POLL_SECONDS = 0.5

JsonDict = dict[str, Any]


def main(argv: list[str] | None = None) -> int:
    protocol = _take_over_stdout()

    def emit(event: JsonDict) -> None:
        protocol.write(json.dumps(event) + "\n")
        protocol.flush()

    stage = "args"
    try:
        args = _parse_args(argv)
        _exit_when_orphaned()
        stage = "create"
        handler = _create_handler(args)
        emit({"event": "ready", "pid": os.getpid()})
        stage = "serve"
        return _serve(_Session(handler), sys.stdin, emit)
    except BaseException as exc:
        # Even SystemExit from argparse or a KeyboardInterrupt gets an answer: never die silently.
        emit(_error_event(exc, where=stage))
        return 1


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
    return parser.parse_args(argv)


def _parse_conf(entries: list[str]) -> dict[str, str]:
    conf = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise ValueError(f"--conf expects KEY=VALUE, got {entry!r}")
        conf[key] = value
    return conf


def _create_handler(args: argparse.Namespace) -> Any:
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
    return get_rendezvous_handler(params)


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
