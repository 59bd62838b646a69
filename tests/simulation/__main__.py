"""`python -m tests.simulation SEEDS [--nodes N] [--trace]`: run schedules of the simulator.

SEEDS is a seed (`17`), a range (`0-1999`, inclusive) or a comma-separated list of either.
Each failing seed prints its scenario, its violations and its last steps; `--trace` prints
them for passing seeds too. Exit code 1 when any seed fails. `make simulate SEEDS=...` runs it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from tests.simulation.scenario import run


def parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        seeds.extend(range(int(low), int(high or low) + 1))
    return seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.simulation", description=__doc__)
    parser.add_argument("seeds", type=parse_seeds, help="e.g. 17, 0-1999 or 3,5-9")
    parser.add_argument("--nodes", type=int, help="nodes in every schedule (default: drawn)")
    parser.add_argument("--trace", action="store_true", help="print passing seeds' traces too")
    parser.add_argument(
        "--rank-policies",
        action="store_true",
        help="draw a rank policy other than join order for claims-layout schedules",
    )
    args = parser.parse_args(argv)
    # The protocol's warnings (retries, re-created keys) are the faults doing their job.
    logging.getLogger("etcd_rdzv").setLevel(logging.ERROR)
    started = time.monotonic()
    failed = []
    steps = 0
    for seed in args.seeds:
        outcome = run(seed, nodes=args.nodes, rank_policies=args.rank_policies)
        steps += outcome.steps
        if not outcome.ok or args.trace:
            print(outcome.report(), end="\n\n", flush=True)
        if not outcome.ok:
            failed.append(seed)
    elapsed = time.monotonic() - started
    print(
        f"{len(args.seeds)} schedules, {steps} steps in {elapsed:.1f}s: "
        f"{len(failed)} failed" + (f" (seeds {', '.join(map(str, failed))})" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
