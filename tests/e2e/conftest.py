"""Fixtures for end-to-end tests: real torchrun agents, always stopped with all their workers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from etcd_rdzv_devtools.demo import AgentSpec, TorchrunAgent, kill_agents
from tests.e2e.agents import LaunchAgent


@pytest.fixture
def launch_agent(tmp_path: Path) -> Iterator[LaunchAgent]:
    """Start a torchrun agent logging to `tmp_path/logs/<name>.log`; all are killed at teardown.

    Killing at teardown, not terminating: a test that got here is done with its agents, and
    SIGKILL cannot be delayed by an agent stuck in a rendezvous.
    """
    agents: list[TorchrunAgent] = []

    def launch(name: str, spec: AgentSpec) -> TorchrunAgent:
        agent = TorchrunAgent.start(name, spec, tmp_path / "logs" / f"{name}.log")
        agents.append(agent)
        return agent

    try:
        yield launch
    finally:
        try:
            kill_agents(agents)
        except RuntimeError as error:
            pytest.fail(str(error), pytrace=False)
