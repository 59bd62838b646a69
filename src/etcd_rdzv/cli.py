"""`etcd-rdzv`: the command for people. Each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from etcd_rdzv import __version__


class _Parser(argparse.ArgumentParser):
    """argparse, careful with what it echoes: no abbreviated options (`--pass` must not be
    taken for `--password-file`, whose value an error then shows), and arguments it does not
    know are named by their option alone, never with a value (it may be a password)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            options = sorted({item.split("=", 1)[0] for item in unknown if item.startswith("-")})
            named = f"unknown options {', '.join(options)}" if options else "unexpected values"
            self.error(f"{named} (values not shown: they may be secrets); see --help")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    from etcd_rdzv import status
    from etcd_rdzv.analysis import command as analyze

    parser = _Parser(
        prog="etcd-rdzv", description="Inspect etcd-rdzv rendezvous: live, or from traces."
    )
    parser.add_argument("--version", action="version", version=f"etcd-rdzv {__version__}")
    # Subcommands' parsers are of the same careful kind.
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
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
