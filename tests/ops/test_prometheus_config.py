"""prometheus/prometheus.yml: valid for promtool, with the scrape jobs the ops stack relies on.

In the stack the config names its rule files by their path in the container
(`/etc/prometheus/rules/*.yml`). promtool checks the file twice: as it is with `--syntax-only`,
and in full on a copy whose rule glob points at the repository's `prometheus/rules/`, so that
the rules the stack will load are checked against this config too.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from etcd_rdzv.config import DEFAULT_ETCD_PORT, DEFAULT_METRICS_PORT

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "prometheus" / "prometheus.yml"
RULES_DIR = REPO / "prometheus" / "rules"
CONTAINER_RULES_GLOB = "/etc/prometheus/rules/*.yml"
JOBS = {"etcd-rdzv", "etcd", "prometheus"}
COMMAND_TIMEOUT = 60.0

JsonDict = dict[str, Any]


@pytest.fixture(autouse=True, scope="module")
def _require_promtool() -> None:
    # Missing tooling fails loudly, like a missing etcd (tests/conftest.py): a skip would hide it.
    if shutil.which("promtool") is None:
        pytest.fail(
            "promtool is not installed: `make setup` installs Debian's prometheus package.",
            pytrace=False,
        )


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def load_yaml(text: str) -> Any:
    return yaml.safe_load(text)


@pytest.fixture(scope="module")
def config() -> JsonDict:
    document: JsonDict = load_yaml(CONFIG.read_text(encoding="utf-8"))
    return document


def _jobs(config: JsonDict) -> dict[str, JsonDict]:
    return {job["job_name"]: job for job in config["scrape_configs"]}


def test_promtool_accepts_the_config_as_mounted() -> None:
    result = _run(["promtool", "check", "config", "--syntax-only", str(CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_config_with_the_repository_rules(tmp_path: Path) -> None:
    text = CONFIG.read_text(encoding="utf-8")
    # The glob appears once, in rule_files; point it at the repository's rules directory.
    assert text.count(CONTAINER_RULES_GLOB) == 1
    local = tmp_path / "prometheus.yml"
    local.write_text(text.replace(CONTAINER_RULES_GLOB, f"{RULES_DIR}/*.yml"), encoding="utf-8")
    result = _run(["promtool", "check", "config", str(local)])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # promtool names each rule file it checked: all of the repository's, none other.
    checked = set(re.findall(r"Checking (\S+\.yml)", output)) - {str(local)}
    assert checked == {str(path) for path in RULES_DIR.glob("*.yml")}


def test_rules_are_loaded_from_the_mounted_rules_directory(config: JsonDict) -> None:
    assert config["rule_files"] == [CONTAINER_RULES_GLOB]


def test_scrapes_every_five_seconds(config: JsonDict) -> None:
    settings = config["global"]
    assert settings["scrape_interval"] == "5s"
    assert settings["evaluation_interval"] == "5s"
    for job in config["scrape_configs"]:
        assert job.get("scrape_interval", "5s") == "5s", job["job_name"]


def test_has_the_three_jobs(config: JsonDict) -> None:
    assert set(_jobs(config)) == JOBS


def test_finds_every_trainer_replica_through_dns(config: JsonDict) -> None:
    job = _jobs(config)["etcd-rdzv"]
    assert set(job) <= {"job_name", "dns_sd_configs", "scrape_interval", "scrape_timeout"}
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (discovery,) = job["dns_sd_configs"]
    assert discovery["names"] == ["trainer"]
    assert discovery["type"] == "A"
    assert discovery["port"] == DEFAULT_METRICS_PORT  # the agents' default, docs/telemetry.md
    assert discovery["refresh_interval"] == "5s"


def test_scrapes_etcd_and_itself(config: JsonDict) -> None:
    jobs = _jobs(config)
    assert jobs["etcd"]["static_configs"] == [{"targets": [f"etcd:{DEFAULT_ETCD_PORT}"]}]
    assert jobs["prometheus"]["static_configs"] == [{"targets": ["localhost:9090"]}]
