"""`python -m etcd_rdzv_devtools.demo` runs a real job, reports it, and leaves no process behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from etcd_rdzv_devtools.demo import processes_with_env
from tests.e2e.agents import REPO_ROOT, wait_until

pytestmark = pytest.mark.e2e

DEMO_TIMEOUT = 120.0
_STOP_TIMEOUT = 15.0
# Inherited by the demo and everything it starts (etcd, agents, workers): how the test finds
# them all, whatever session they put themselves in.
TEST_TAG_VARIABLE = "ETCD_RDZV_DEMO_TEST"


@dataclass(frozen=True)
class DemoRun:
    returncode: int
    stdout: str
    stderr: str
    tag: str

    def __str__(self) -> str:
        return (
            f"exit code {self.returncode}\n--- stdout:\n{self.stdout}\n--- stderr:\n{self.stderr}"
        )


class DemoRunner:
    def __init__(self) -> None:
        self.tags: list[str] = []

    def start(self, *args: str, cwd: Path = REPO_ROOT) -> tuple[subprocess.Popen[str], str]:
        """Start the demo in a session of its own, as a shell runs a foreground command."""
        tag = uuid.uuid4().hex
        self.tags.append(tag)
        process = subprocess.Popen(
            [sys.executable, "-m", "etcd_rdzv_devtools.demo", *args],
            cwd=cwd,
            env={**os.environ, TEST_TAG_VARIABLE: tag},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        return process, tag

    def finish(self, process: subprocess.Popen[str], tag: str) -> DemoRun:
        try:
            stdout, stderr = process.communicate(timeout=DEMO_TIMEOUT)
        except subprocess.TimeoutExpired:
            # SIGTERM first: the demo's own cleanup is part of what is under test.
            os.killpg(process.pid, signal.SIGTERM)
            try:
                stdout, stderr = process.communicate(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                stdout, stderr = process.communicate()
            pytest.fail(f"demo ran over {DEMO_TIMEOUT:g}s\n{stdout}\n{stderr}", pytrace=False)
        return DemoRun(process.returncode, stdout, stderr, tag)

    def run(self, *args: str, cwd: Path = REPO_ROOT) -> DemoRun:
        return self.finish(*self.start(*args, cwd=cwd))

    def leftovers(self) -> set[int]:
        return {pid for tag in self.tags for pid in processes_with_env(TEST_TAG_VARIABLE, tag)}


def is_running(pid: int) -> bool:
    """Alive, not a zombie: orphans killed here may wait a while for init to reap them."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the command name, which is in parentheses and may contain spaces.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def demo() -> Iterator[DemoRunner]:
    runner = DemoRunner()
    try:
        yield runner
    finally:
        # Only a demo that failed its own cleanup leaves these; the test reports that itself.
        for pid in runner.leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_demo_runs_a_two_node_job_and_reports_every_node(demo: DemoRunner, tmp_path: Path) -> None:
    out = tmp_path / "demo"

    run = demo.run("--nodes", "2", "--out", str(out))

    assert run.returncode == 0, run
    assert "OK: 2 nodes formed one world of 2 workers" in run.stdout, run
    assert "(API v3)" in run.stdout, run  # the default
    node_lines = {
        name: re.search(rf"^  {name}: group rank (\d), rank (\d), world size (\d+), (.*)$",
                        run.stdout, re.MULTILINE)
        for name in ("node-0", "node-1")
    }  # fmt: skip
    assert all(node_lines.values()), run
    assert sorted(m.group(2) for m in node_lines.values() if m) == ["0", "1"], run
    for match in node_lines.values():
        assert match is not None
        assert match.group(3) == "2", run
        assert re.match(r"sum 3 \(expected 3\) OK, rendezvous \d+\.\d\d s$", match.group(4)), run
    for name in ("node-0.log", "node-1.log", "etcd.log", "traces.jsonl"):
        assert (out / name).is_file(), f"{name} missing in {sorted(os.listdir(out))}"
    assert str(out) in run.stdout, run
    # The metrics of every agent were announced, and the run ends with its own analysis.
    assert len(re.findall(r"http://127\.0\.0\.1:\d+/metrics", run.stdout)) == 2, run
    assert "$ etcd-rdzv analyze" in run.stdout, run
    assert re.search(r"version 1: \d+\.\d+ s, complete, 2 node\(s\)", run.stdout), run
    assert (out / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert demo.leftovers() == set(), f"processes left running by the demo\n{run}"


def test_demo_fails_with_the_workers_error_when_the_job_fails(
    demo: DemoRunner, tmp_path: Path
) -> None:
    failing = tmp_path / "failing_worker.py"
    failing.write_text(
        "import sys\nprint('worker gives up on purpose', file=sys.stderr)\nsys.exit(3)\n"
    )

    out = tmp_path / "demo"

    run = demo.run("--nodes", "1", "--worker", str(failing), "--out", str(out))

    assert run.returncode == 1, run
    assert "FAILED:" in run.stdout, run
    assert "node-0: torchrun exited with code 1" in run.stdout, run
    log = (out / "node-0.log").read_text()
    assert "worker gives up on purpose" in log
    # The report quotes the end of the failed agent's log, where torchrun names the cause.
    last_line = log.rstrip().splitlines()[-1]
    assert f"  | {last_line}" in run.stdout, run
    assert demo.leftovers() == set(), f"processes left running by the demo\n{run}"


def test_demo_refuses_a_missing_worker_script_clearly(demo: DemoRunner, tmp_path: Path) -> None:
    run = demo.run("--worker", str(tmp_path / "nowhere.py"), "--out", str(tmp_path / "demo"))

    assert run.returncode == 2, run
    assert f"--worker {tmp_path / 'nowhere.py'}: no such file" in run.stderr, run


@pytest.mark.parametrize(
    ("signum", "whole_group"),
    [(signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["ctrl-c", "sigterm"],
)
def test_demo_interrupted_mid_job_stops_everything_it_started(
    demo: DemoRunner, tmp_path: Path, signum: signal.Signals, whole_group: bool
) -> None:
    out = tmp_path / "demo"
    markers = tmp_path / "running"
    markers.mkdir()
    # Announces itself, then outlives any test: the signal lands while the workers run.
    worker = tmp_path / "slow_worker.py"
    worker.write_text(
        "import os, time\n"
        f"open(os.path.join({str(markers)!r}, str(os.getpid())), 'w').close()\n"
        "time.sleep(300)\n"
    )
    process, tag = demo.start("--nodes", "2", "--worker", str(worker), "--out", str(out))

    def workers_running() -> list[int] | None:
        if process.poll() is not None:
            return []
        pids = [int(marker.name) for marker in markers.iterdir()]
        return pids if len(pids) == 2 else None

    workers = wait_until(workers_running, DEMO_TIMEOUT, what="the demo's workers")
    assert workers, demo.finish(process, tag)
    # Ctrl-C in a terminal signals the whole foreground process group: the demo and etcd.
    if whole_group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    run = demo.finish(process, tag)

    assert run.returncode == 130, run
    assert "interrupted" in run.stderr, run
    assert demo.leftovers() == set(), f"processes left running by the demo\n{run}"
    # torchrun runs each worker in a session of its own: the demo must have found them.
    assert not any(is_running(pid) for pid in workers), run
