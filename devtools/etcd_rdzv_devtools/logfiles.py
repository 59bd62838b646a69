"""Reading the log files of processes we started (etcd, agents, test participants)."""

from __future__ import annotations

from pathlib import Path


def log_tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of `path`, or a note saying why it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        return f"<log {path} unreadable: {error}>"
    return "\n".join(text.splitlines()[-lines:])
