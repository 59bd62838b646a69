"""Helpers for end-to-end tests that run torchrun agents (see `launch_agent` in conftest)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from etcd_rdzv_devtools.demo import AgentSpec, TorchrunAgent

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_SCRIPT = REPO_ROOT / "examples" / "allreduce_worker.py"

_POLL_SECONDS = 0.1

T = TypeVar("T")


class LaunchAgent(Protocol):
    """The `launch_agent` fixture: start an agent that the test's teardown kills."""

    def __call__(self, name: str, spec: AgentSpec) -> TorchrunAgent: ...


def describe_agents(agents: Sequence[TorchrunAgent], lines: int = 25) -> str:
    """Each agent's exit code and log tail, for assertion messages."""
    parts = []
    for agent in agents:
        parts.append(
            f"--- {agent.name} (pid {agent.pid}, exit code {agent.returncode}), "
            f"last {lines} lines of {agent.log_path}:\n{agent.log_tail(lines)}"
        )
    return "\n".join(parts)


def wait_until(
    condition: Callable[[], T | None],
    timeout: float,
    *,
    what: str,
    agents: Sequence[TorchrunAgent] = (),
) -> T:
    """Poll `condition` until it returns a value, failing with the agents' logs at `timeout`.

    Fails early when an agent exits meanwhile: what the test waits for would never come.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value is not None:
            return value
        exited = [agent.name for agent in agents if agent.returncode is not None]
        if exited or time.monotonic() >= deadline:
            reason = f"agents {exited} exited" if exited else f"{timeout:g}s passed"
            raise AssertionError(f"Waiting for {what}: {reason}.\n{describe_agents(agents)}")
        time.sleep(_POLL_SECONDS)
