"""`python -m benchmarks.recovery`: how long real torchrun jobs take to recover from a lost node.

Three torchrun agents (`--nnodes 2:3`, one worker each, `examples/allreduce_worker.py` in a
loop) over a local etcd. Once all three workers run, the node hosting group rank 0 is killed
whole (agent and worker, SIGKILL), the hardest node to lose. Measured from the kill, from the
survivors' own logs and files:

- **failure detected**: the first survivor starts its next rendezvous (its workers failed:
  their all-reduce with the dead worker errored, and torchrun restarts them);
- **rendezvous**: from then until both survivors completed the new version (it includes the
  last call: with 2 of max 3 nodes, the holder waits `last_call_timeout` for a third);
- **workers up**: until both survivors' new workers completed their first all-reduce together.

The total is what a job loses. Run: `python -m benchmarks.recovery [--last-call-timeout S]
[--keep-alive-ttl S] [--rounds N]`; it prints one line per round and the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from etcd_rdzv_devtools.demo import AgentSpec, TorchrunAgent
from etcd_rdzv_devtools.local_etcd import start_local_etcd

WORKER = Path(__file__).resolve().parent.parent / "examples" / "allreduce_worker.py"
NAMES = ("node-a", "node-b", "node-c")
WAIT_SECONDS = 180.0
T = TypeVar("T")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--last-call-timeout", type=float, default=30.0)
    parser.add_argument("--keep-alive-ttl", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = [measure(args.last_call_timeout, args.keep_alive_ttl) for _ in range(args.rounds)]
    for row in rows:
        print(json.dumps(row))
    medians = {key: round(statistics.median(r[key] for r in rows), 2) for key in rows[0]}
    print("median", json.dumps(medians))


def measure(last_call_timeout: float, keep_alive_ttl: float) -> dict[str, float]:
    with (
        tempfile.TemporaryDirectory(prefix="recovery-") as scratch,
        start_local_etcd(enable_v2=False) as etcd,
    ):
        root = Path(scratch)
        out = root / "results"
        run_id = f"recovery-{int(time.time())}"
        conf = {
            "last_call_timeout": f"{last_call_timeout:g}",
            "keep_alive_ttl": f"{keep_alive_ttl:g}",
            "timeout": "300",
        }
        agents = {
            name: TorchrunAgent.start(
                name,
                AgentSpec(
                    endpoint=etcd.endpoint,
                    run_id=run_id,
                    nnodes="2:3",
                    nproc_per_node=1,
                    worker=WORKER,
                    worker_args=(
                        *("--out", str(out / name)),
                        *("--steps", "100000", "--step-seconds", "0.1"),
                        *("--timeout", "30"),
                    ),
                    rdzv_conf=conf,
                    max_restarts=3,
                ),
                root / f"{name}.log",
            )
            for name in NAMES
        }
        try:
            first = _wait(lambda: _started(out, world_size=3), "all three workers")
            victim = next(name for name, record in first.items() if record["group_rank"] == 0)
            killed = time.time()
            agents[victim].kill()
            survivors = [name for name in NAMES if name != victim]
            again = _wait(
                lambda: _started(out, world_size=2, names=survivors, after=killed),
                "the survivors' new workers",
            )
            workers_up = max(record["at"] for record in again.values())
            completions = [_completed_after(root / f"{name}.log", killed) for name in survivors]
        finally:
            for agent in agents.values():
                agent.kill()
    began = min(start for start, _ in completions)
    done = max(end for _, end in completions)
    return {
        "detected_s": round(began - killed, 2),
        "rendezvous_s": round(done - began, 2),
        "workers_up_s": round(workers_up - done, 2),
        "total_s": round(workers_up - killed, 2),
    }


def _started(
    out: Path, *, world_size: int, names: list[str] | None = None, after: float = 0.0
) -> dict[str, dict[str, Any]] | None:
    """Per node, its worker's `started` record in a world of `world_size`, once all have one."""
    found = {}
    for name in names or NAMES:
        for path in sorted((out / name).glob("started-*.json")):
            record = json.loads(path.read_text())
            at = path.stat().st_mtime
            if record["world_size"] == world_size and at > after:
                found[name] = {**record, "at": at}
    return found if len(found) == len(names or NAMES) else None


def _completed_after(log: Path, after: float) -> tuple[float, float]:
    """(start, end) unix times of the node's first rendezvous completed after `after`."""
    for line in log.read_text(errors="replace").splitlines():
        if '"rendezvous_completed"' not in line:
            continue
        event = json.loads(line)
        end = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
        if end > after:
            return end - float(event["seconds"]), end
    raise RuntimeError(f"no rendezvous completed after the kill in {log}")


def _wait(probe: Callable[[], T | None], what: str) -> T:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        found = probe()
        if found is not None:
            return found
        time.sleep(0.2)
    raise RuntimeError(f"not within {WAIT_SECONDS:g} s: {what}")


if __name__ == "__main__":
    main()
