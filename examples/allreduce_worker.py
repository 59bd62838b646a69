"""A minimal torchrun worker: join the process group, all-reduce, check, report.

Run it under torchrun with the etcd-rdzv backend, one command per node:

    torchrun --nnodes 2 --nproc-per-node 2 \\
        --rdzv-backend etcd-rdzv --rdzv-endpoint 127.0.0.1:2379 --rdzv-id my-job \\
        examples/allreduce_worker.py --out results/

torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, ... from the rendezvous, so the process group
needs no arguments. Each rank contributes `rank + 1`; the sum over the group must be
`world_size * (world_size + 1) / 2`. Every worker writes its outcome as one JSON line to
`<out>/result-g<group rank>-l<local rank>-r<restart count>-p<pid>.json` and, once the first
all-reduce succeeded (the whole group is up), a `started-...` file with the same fields.

`--steps N --step-seconds S` repeat the all-reduce N times with a pause between steps: a
stand-in for a training loop that runs long enough to lose a node in the middle. With
`--stop-file PATH` the loop ends, on every rank at the same step, once that file exists: a test
decides when training ends instead of guessing how long a fault takes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for result files")
    parser.add_argument("--steps", type=int, default=1, help="all-reduce steps (default 1)")
    parser.add_argument(
        "--step-seconds", type=float, default=0.0, help="pause between steps (default 0)"
    )
    parser.add_argument(
        "--stop-file",
        type=Path,
        default=None,
        help="end the loop (on every rank at once) when this file exists",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds a collective may take before failing (default 60; torch's is 30 min)",
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def identity() -> dict[str, Any]:
    """Who this worker is, as torchrun told it through the environment."""
    return {
        "rank": int(os.environ["RANK"]),
        "world_size": int(os.environ["WORLD_SIZE"]),
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "group_rank": int(os.environ["GROUP_RANK"]),
        "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        "run_id": os.environ.get("TORCHELASTIC_RUN_ID"),
        "pid": os.getpid(),
    }


def all_reduce_step(rank: int, world_size: int) -> tuple[int, int]:
    """One all-reduce of `rank + 1` over the group: (sum received, sum expected)."""
    tensor = torch.tensor([rank + 1], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return int(tensor.item()), world_size * (world_size + 1) // 2


def asked_to_stop(stop_file: Path | None) -> bool:
    """Whether any rank saw the stop file: decided together, so every rank stops at one step."""
    if stop_file is None:
        return False
    seen = torch.tensor([1 if stop_file.exists() else 0], dtype=torch.int64)
    dist.all_reduce(seen, op=dist.ReduceOp.MAX)
    return bool(seen.item())


def write_record(out: Path, kind: str, record: dict[str, Any]) -> Path:
    """Write one JSON line atomically, so a reader never sees half a file."""
    name = (
        f"{kind}-g{record['group_rank']}-l{record['local_rank']}"
        f"-r{record['restart_count']}-p{record['pid']}.json"
    )
    path = out / name
    partial = out / f".{name}.partial"
    partial.write_text(json.dumps(record, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(partial, path)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    me = identity()

    # env:// — torchrun exported MASTER_ADDR/MASTER_PORT, RANK and WORLD_SIZE.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    try:
        ok = True
        for step in range(args.steps):
            total, expected = all_reduce_step(me["rank"], me["world_size"])
            ok = ok and total == expected
            record = {**me, "step": step + 1, "sum": total, "expected": expected, "ok": ok}
            if step == 0:
                write_record(args.out, "started", record)
            if asked_to_stop(args.stop_file):
                break
            if step + 1 < args.steps:
                # The workload's pace, not a synchronization: the all-reduce is the barrier.
                time.sleep(args.step_seconds)
        write_record(args.out, "result", record)
    finally:
        dist.destroy_process_group()

    if not ok:
        print(f"rank {me['rank']}: all-reduce sum {total} != {expected}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
