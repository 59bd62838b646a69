"""`etcd-rdzv`: the command for people. Each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from etcd_rdzv import __version__


def build_parser() -> argparse.ArgumentParser:
    from etcd_rdzv import status
    from etcd_rdzv.analysis import command as analyze

    parser = argparse.ArgumentParser(
        prog="etcd-rdzv", description="Inspect etcd-rdzv rendezvous: live, or from traces."
    )
    parser.add_argument("--version", action="version", version=f"etcd-rdzv {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status.register(commands)
    analyze.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand; each registers `func(args) -> exit code` on its parser."""
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
