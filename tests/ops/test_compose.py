"""The ops stack (docker-compose.yml and what it mounts and builds), checked without Docker.

`docker-compose config` (Compose 1.29, Debian's package) validates the file, interpolates the
environment and prints the result normalized: absolute mount sources, long-form ports,
`depends_on` conditions. The tests read that output, so they check what Compose would run,
and then follow each reference into the repository: every mounted file exists, the Dockerfile
copies only what the build context (after .dockerignore) holds, every address one service
uses to reach another names a service and a port that service listens on, and the trainer's
entrypoint builds a command line that torchrun's own argument parser accepts.

No Docker engine is needed, and nothing leaves the machine.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from etcd_rdzv.config import DEFAULT_METRICS_PORT, parse_etcd_api

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
SERVICES = {"etcd", "prometheus", "grafana", "otel-collector", "tempo", "trainer"}
PASSWORD_VARIABLE = "GRAFANA_ADMIN_PASSWORD"
# Variables the compose file interpolates: unset for every run, so a developer's shell or
# .env file cannot change what is checked.
INTERPOLATED = (PASSWORD_VARIABLE, "OPS_BIND_ADDR")
TEST_PASSWORD = "test-password-not-a-secret"
# A release tag: `v3.6.16`, `2.6.1`, `11.3.1`, `3.11-slim-bookworm`; never `latest`.
PINNED_TAG = re.compile(r"^v?\d+\.\d+(\.\d+)?")
COMMAND_TIMEOUT = 60.0

JsonDict = dict[str, Any]


@pytest.fixture(autouse=True, scope="module")
def _require_docker_compose() -> None:
    # Missing tooling fails loudly, like a missing etcd (tests/conftest.py): a skip would hide it.
    if shutil.which("docker-compose") is None:
        pytest.fail(
            "docker-compose is not installed: `make setup` installs Debian's docker-compose "
            "(1.29; it checks the file without a Docker engine).",
            pytrace=False,
        )


# --- running docker-compose and reading YAML --------------------------------------------------


def _run(
    command: list[str], *, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=dict(env) if env is not None else None,
        cwd=REPO,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def compose_config(tmp_dir: Path, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` on the repository's file with exactly `env` interpolated."""
    empty_env_file = tmp_dir / "empty.env"
    empty_env_file.write_text("", encoding="utf-8")
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in INTERPOLATED and not key.startswith("COMPOSE_")
    }
    environment.update(env)
    command = ["docker-compose", "--env-file", str(empty_env_file)]
    command += ["--project-directory", str(REPO), "-f", str(COMPOSE_FILE), "config"]
    return _run(command, env=environment)


@cache
def compose_python() -> str:
    """The interpreter docker-compose runs on; it has PyYAML and docker-py (its dependencies)."""
    executable = shutil.which("docker-compose")
    assert executable is not None
    first_line = Path(executable).read_text(encoding="utf-8", errors="replace").split("\n", 1)[0]
    if not first_line.startswith("#!"):
        pytest.fail(f"{executable} is not a Python script: cannot find its interpreter")
    words = shlex.split(first_line[2:])
    return words[-1] if Path(words[0]).name == "env" else words[0]


def load_yaml(text: str) -> Any:
    return yaml.safe_load(text)


def load_yaml_file(path: Path) -> Any:
    return load_yaml(path.read_text(encoding="utf-8"))


# --- the normalized stack ----------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool

    @property
    def is_bind(self) -> bool:
        return self.source.startswith("/")


@dataclass(frozen=True)
class Stack:
    config: JsonDict

    @property
    def services(self) -> dict[str, JsonDict]:
        services: dict[str, JsonDict] = self.config["services"]
        return services

    def service(self, name: str) -> JsonDict:
        return self.services[name]

    def mounts(self, name: str) -> list[Mount]:
        mounts = []
        for volume in self.service(name).get("volumes", []):
            # Compose 1.29 prints every volume in the short form: SOURCE:TARGET[:MODE].
            assert isinstance(volume, str), f"{name}: unexpected volume syntax {volume!r}"
            source, target, *mode = volume.split(":")
            mounts.append(Mount(source, target, read_only="ro" in mode))
        return mounts

    def mount_of(self, name: str, repo_path: str) -> Mount:
        wanted = str(REPO / repo_path)
        found = [mount for mount in self.mounts(name) if mount.source == wanted]
        assert len(found) == 1, f"{name} should mount {repo_path} once: {self.mounts(name)}"
        return found[0]

    def repo_file_at(self, name: str, container_path: str) -> Path:
        """The repository file that service `name` sees at `container_path`."""
        target = PurePosixPath(container_path)
        for mount in self.mounts(name):
            if not mount.is_bind:
                continue
            mounted = PurePosixPath(mount.target)
            if target == mounted or mounted in target.parents:
                return Path(mount.source, *target.relative_to(mounted).parts)
        raise AssertionError(f"{name}: nothing from the repository is mounted at {container_path}")

    def environment(self, name: str) -> dict[str, str]:
        environment: dict[str, str] = self.service(name).get("environment", {})
        return environment

    def command(self, name: str) -> list[str]:
        command = self.service(name).get("command", [])
        assert isinstance(command, list), f"{name}: give the command as a list"
        return [str(word) for word in command]


def flag_values(command: list[str], flag: str) -> list[str]:
    """Values of `--flag=value` (or `-flag=value`) in a command line."""
    prefix = f"{flag}="
    return [word[len(prefix) :] for word in command if word.startswith(prefix)]


def host_port(address: str) -> tuple[str, int]:
    """`http://host:port/...` or `host:port` split into its host and port."""
    parts = urlsplit(address if "//" in address else f"//{address}")
    assert parts.hostname is not None and parts.port is not None, f"no host:port in {address!r}"
    return parts.hostname, parts.port


@pytest.fixture(scope="module")
def compose_run(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    return compose_config(tmp_path_factory.mktemp("compose"), {PASSWORD_VARIABLE: TEST_PASSWORD})


@pytest.fixture(scope="module")
def stack(compose_run: subprocess.CompletedProcess[str]) -> Stack:
    assert compose_run.returncode == 0, f"docker-compose config failed:\n{compose_run.stderr}"
    return Stack(load_yaml(compose_run.stdout))


@pytest.fixture(scope="module")
def prometheus_config() -> JsonDict:
    config: JsonDict = load_yaml_file(REPO / "prometheus" / "prometheus.yml")
    return config


# --- the file as a whole ----------------------------------------------------------------------


def test_compose_accepts_the_file_with_the_password_set(stack: Stack) -> None:
    assert set(stack.services) == SERVICES


def test_there_is_no_default_grafana_admin_password(tmp_path: Path, stack: Stack) -> None:
    refused = compose_config(tmp_path, {})
    assert refused.returncode != 0, "docker-compose config must fail without the password"
    assert PASSWORD_VARIABLE in refused.stderr
    # With it set, Grafana gets exactly that value: it comes from the environment.
    grafana = stack.environment("grafana")
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == TEST_PASSWORD


def test_every_image_is_pinned_to_a_release_tag(stack: Stack) -> None:
    for name, service in stack.services.items():
        if "image" not in service:
            assert "build" in service, f"{name}: neither an image nor a build"
            continue
        image: str = service["image"]
        repository, _, tag = image.split("@", maxsplit=1)[0].rpartition(":")
        assert repository and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest" and PINNED_TAG.match(tag), f"{name}: {image!r} is not pinned"
    dockerfile = REPO / "docker" / "trainer.Dockerfile"
    bases = re.findall(r"^FROM\s+(?:--platform=\S+\s+)?(\S+)", dockerfile.read_text(), re.M)
    assert bases, f"{dockerfile}: no FROM line"
    for base in bases:
        _, _, tag = base.rpartition(":")
        assert tag != "latest" and PINNED_TAG.match(tag), f"{dockerfile}: {base!r} is not pinned"


def test_every_mounted_path_exists_in_the_repository(stack: Stack) -> None:
    named_volumes = set(stack.config.get("volumes") or {})
    for name in stack.services:
        for mount in stack.mounts(name):
            if mount.is_bind:
                source = Path(mount.source)
                assert source.exists(), f"{name} mounts {source}, which does not exist"
                assert source.is_relative_to(REPO), f"{name} mounts {source}, outside the repo"
                assert mount.read_only, f"{name}: mount {source} read-only"
            else:
                assert mount.source in named_volumes, f"{name}: undeclared volume {mount.source}"


# --- the trainer ------------------------------------------------------------------------------


def _dockerfile_copies(dockerfile: Path) -> list[str]:
    sources = []
    for line in dockerfile.read_text(encoding="utf-8").splitlines():
        words = line.split()
        if words and words[0].upper() in ("COPY", "ADD"):
            arguments = [word for word in words[1:] if not word.startswith("--")]
            sources += arguments[:-1]
    return sources


_CONTEXT_FILES = """
import json, sys
from docker.utils.build import exclude_paths
root, dockerfile = sys.argv[1], sys.argv[2]
lines = open(root + "/.dockerignore").read().splitlines()
patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
json.dump(sorted(exclude_paths(root, patterns, dockerfile=dockerfile)), sys.stdout)
"""


def test_the_trainer_builds_from_the_repository(stack: Stack) -> None:
    build = stack.service("trainer")["build"]
    context = Path(build["context"])
    dockerfile = context / build["dockerfile"]
    assert context == REPO, "the trainer is built from the repository root (`pip install .`)"
    assert dockerfile.is_file()
    # What the build sends to the engine, as docker-compose computes it (with docker-py).
    result = _run([compose_python(), "-c", _CONTEXT_FILES, str(context), build["dockerfile"]])
    assert result.returncode == 0, result.stderr
    sent = set(json.loads(result.stdout))
    for source in _dockerfile_copies(dockerfile):
        path = source.rstrip("/")
        assert (context / path).exists(), f"{dockerfile.name} copies {source}: missing"
        assert path in sent, f"{dockerfile.name} copies {source}, which .dockerignore leaves out"
    assert {"pyproject.toml", "README.md", "src/etcd_rdzv/handler.py"} <= sent
    leaked = sorted(path for path in sent if path.split("/")[0] in (".venv", ".git", "runs"))
    assert not leaked, f"the build context should not hold {leaked[:5]}"


def test_the_trainer_installs_the_torch_the_makefile_pins() -> None:
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    dockerfile = (REPO / "docker" / "trainer.Dockerfile").read_text(encoding="utf-8")
    pinned = re.findall(r"torch==(\d[\w.+]*)", makefile)
    assert pinned, "the Makefile pins torch"
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(pinned[0])}$", dockerfile, re.M)
    assert "download.pytorch.org/whl/cpu" in dockerfile, "the CPU build, not PyPI's CUDA one"


def test_the_trainer_scales(stack: Stack, prometheus_config: JsonDict) -> None:
    trainer = stack.service("trainer")
    # Replicas need distinct names and cannot share a host port.
    for key in ("container_name", "ports", "hostname", "network_mode"):
        assert key not in trainer, f"trainer sets {key}: `--scale trainer=N` needs it unset"
    environment = stack.environment("trainer")
    port = int(environment["ETCD_RDZV_METRICS_PORT"])
    assert port == DEFAULT_METRICS_PORT
    assert str(port) in trainer["expose"]
    assert environment.get("ETCD_RDZV_METRICS_ADDR", "0.0.0.0") == "0.0.0.0"
    # Prometheus finds the replicas by the service's DNS name, on that same port.
    (job,) = [j for j in prometheus_config["scrape_configs"] if j["job_name"] == "etcd-rdzv"]
    (discovery,) = job["dns_sd_configs"]
    assert discovery["names"] == ["trainer"] and discovery["port"] == port
    assert trainer["depends_on"]["etcd"]["condition"] == "service_healthy"
    assert trainer.get("init") is True, "an init reaps the workers and forwards SIGTERM"


def test_the_trainer_reaches_etcd_and_the_collector(stack: Stack) -> None:
    environment = stack.environment("trainer")
    assert environment["OTEL_SERVICE_NAME"] == "etcd-rdzv-trainer"
    collector = host_port(environment["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert collector == ("otel-collector", 4318)  # etcd-rdzv exports OTLP over HTTP
    etcd = host_port(environment["RDZV_ENDPOINT"])
    assert etcd[0] in stack.services
    listen = flag_values(stack.command("etcd"), "--listen-client-urls")
    assert [host_port(url)[1] for url in listen[0].split(",")] == [etcd[1]]


def _entrypoint_command(stack: Stack, tmp_path: Path) -> list[str]:
    """Run docker/trainer-entrypoint.sh with the trainer's environment and a fake torchrun."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "torchrun"
    fake.write_text(
        f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], sys.stdout)\n",
        encoding="utf-8",
    )
    fake.chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)  # the image's `python`
    environment = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    environment.update(stack.environment("trainer"))
    result = _run(["sh", str(REPO / "docker" / "trainer-entrypoint.sh")], env=environment)
    assert result.returncode == 0, result.stderr
    command: list[str] = json.loads(result.stdout)
    return command


def test_the_trainer_entrypoint_runs_an_elastic_torchrun_job(stack: Stack, tmp_path: Path) -> None:
    from torch.distributed.run import get_args_parser  # slow import: only here

    sys.path.insert(0, str(REPO / "examples"))
    try:
        worker = importlib.import_module("allreduce_worker")
    finally:
        sys.path.remove(str(REPO / "examples"))

    command = _entrypoint_command(stack, tmp_path)
    args = get_args_parser().parse_args(command)
    assert args.rdzv_backend == "etcd-rdzv"
    assert args.rdzv_endpoint == "etcd:2379"
    assert args.rdzv_id == "demo"
    assert args.nnodes == "1:8"
    assert args.nproc_per_node == "1"
    assert args.max_restarts >= 100
    assert args.local_addr, "other nodes must reach this one by address, not by container id"
    assert args.training_script == "/opt/etcd-rdzv/examples/allreduce_worker.py"
    assert "COPY examples ./examples" in (REPO / "docker" / "trainer.Dockerfile").read_text()
    assert "WORKDIR /opt/etcd-rdzv" in (REPO / "docker" / "trainer.Dockerfile").read_text()
    worker_args = worker.parse_args(args.training_script_args)
    assert worker_args.steps * worker_args.step_seconds >= 24 * 3600, "runs for a day at least"


# --- Prometheus, Grafana, the collector and Tempo ---------------------------------------------


def test_prometheus_runs_the_repository_config(stack: Stack, prometheus_config: JsonDict) -> None:
    command = stack.command("prometheus")
    (config_path,) = flag_values(command, "--config.file")
    assert stack.repo_file_at("prometheus", config_path) == REPO / "prometheus" / "prometheus.yml"
    assert "exemplar-storage" in ",".join(flag_values(command, "--enable-feature"))
    # The rule files the config names are the repository's prometheus/rules/*.yml.
    rules_mount = stack.mount_of("prometheus", "prometheus/rules")
    for pattern in prometheus_config["rule_files"]:
        assert PurePosixPath(pattern).parent == PurePosixPath(rules_mount.target), pattern
        assert pattern.endswith("/*.yml")
    # The targets it scrapes by name are services of this stack.
    for job in prometheus_config["scrape_configs"]:
        for group in job.get("static_configs", []):
            for target in group["targets"]:
                host, port = host_port(target)
                if host == "localhost":  # itself, on its default port
                    assert port == 9090 and not flag_values(command, "--web.listen-address")
                else:
                    assert host in stack.services, target


def _datasources() -> dict[str, JsonDict]:
    path = REPO / "grafana" / "provisioning" / "datasources" / "datasources.yml"
    document = load_yaml_file(path)
    return {source["uid"]: source for source in document["datasources"]}


def test_grafana_is_provisioned_from_the_repository(stack: Stack) -> None:
    provisioning = stack.mount_of("grafana", "grafana/provisioning")
    assert provisioning.target == "/etc/grafana/provisioning"
    dashboards = stack.mount_of("grafana", "dashboards")
    provider_file = REPO / "grafana" / "provisioning" / "dashboards" / "etcd-rdzv.yml"
    (provider,) = load_yaml_file(provider_file)["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == dashboards.target == "/var/lib/grafana/dashboards"
    environment = stack.environment("grafana")
    assert environment["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert environment["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    home = environment.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home is not None:
        assert stack.repo_file_at("grafana", home).is_file(), f"home dashboard {home} is missing"
    assert any(port.endswith(":3000:3000/tcp") for port in stack.service("grafana")["ports"])


def test_grafana_datasources_reach_prometheus_and_tempo(stack: Stack) -> None:
    sources = _datasources()
    assert set(sources) == {"prometheus", "tempo"}
    prometheus, tempo = sources["prometheus"], sources["tempo"]
    assert (prometheus["name"], prometheus["type"]) == ("Prometheus", "prometheus")
    assert (tempo["name"], tempo["type"]) == ("Tempo", "tempo")
    assert host_port(prometheus["url"]) == ("prometheus", 9090)
    tempo_config = load_yaml_file(REPO / "otel" / "tempo.yaml")
    assert host_port(tempo["url"]) == ("tempo", tempo_config["server"]["http_listen_port"])
    # A latency panel's exemplar (label `trace_id`, etcd-rdzv's) opens the trace in Tempo.
    destinations = prometheus["jsonData"]["exemplarTraceIdDestinations"]
    assert {"name": "trace_id", "datasourceUid": "tempo"}.items() <= destinations[0].items()


def _receiver_port(protocols: JsonDict, protocol: str) -> int:
    host, port = host_port(protocols[protocol]["endpoint"])
    # Since collector 0.104 a receiver without an endpoint listens on localhost only.
    assert host == "0.0.0.0", f"{protocol} receiver must listen beyond localhost"
    return port


def test_spans_flow_from_the_trainers_through_the_collector_to_tempo(stack: Stack) -> None:
    (config_path,) = flag_values(stack.command("otel-collector"), "--config")
    collector = load_yaml_file(stack.repo_file_at("otel-collector", config_path))
    assert stack.repo_file_at("otel-collector", config_path) == REPO / "otel" / "collector.yaml"
    protocols = collector["receivers"]["otlp"]["protocols"]
    _, trainer_port = host_port(stack.environment("trainer")["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert _receiver_port(protocols, "http") == trainer_port
    assert _receiver_port(protocols, "grpc") == 4317
    (pipeline,) = collector["service"]["pipelines"].values()
    assert pipeline["receivers"] == ["otlp"]
    assert "batch" in pipeline["processors"]
    (exporter_name,) = pipeline["exporters"]
    assert exporter_name.split("/")[0] == "otlp", "to Tempo over OTLP gRPC"
    exporter = collector["exporters"][exporter_name]
    tempo_host, tempo_port = host_port(exporter["endpoint"])
    assert tempo_host == "tempo"

    (tempo_config_path,) = flag_values(stack.command("tempo"), "-config.file")
    tempo = load_yaml_file(stack.repo_file_at("tempo", tempo_config_path))
    assert stack.repo_file_at("tempo", tempo_config_path) == REPO / "otel" / "tempo.yaml"
    tempo_protocols = tempo["distributor"]["receivers"]["otlp"]["protocols"]
    assert _receiver_port(tempo_protocols, "grpc") == tempo_port


def test_etcd_is_a_v3_only_release_with_extensive_metrics(stack: Stack) -> None:
    etcd = stack.service("etcd")
    command = stack.command("etcd")
    repository, _, tag = etcd["image"].rpartition(":")
    assert repository == "quay.io/coreos/etcd", etcd["image"]
    # 3.6 has no v2 API: etcd-rdzv speaks v3, and the demo must show that it needs nothing else.
    assert re.fullmatch(r"v3\.6\.\d+", tag), f"etcd {tag}: the demo runs a 3.6 release"
    v2_flags = [word for word in command if word.lstrip("-").startswith("enable-v2")]
    assert not v2_flags, f"etcd 3.6 has no v2 API (and refuses the flag): {v2_flags}"
    assert "ETCD_ENABLE_V2" not in stack.environment("etcd")
    # The etcd dashboard's gRPC latency panel reads grpc_server_handling_seconds.
    assert flag_values(command, "--metrics") == ["extensive"]
    test = etcd["healthcheck"]["test"]
    # Distroless image: no shell, so exec form; 3.6's etcdctl is v3-only (no ETCDCTL_API=2).
    assert test[:2] == ["CMD", "/usr/local/bin/etcdctl"], test
    assert test[-2:] == ["endpoint", "health"], test
    assert not any("ETCDCTL_API" in word for word in test)
    advertised = flag_values(command, "--advertise-client-urls")
    assert [host_port(url)[0] for url in advertised] == ["etcd"]


def test_the_trainer_speaks_the_v3_api(stack: Stack) -> None:
    environment = stack.environment("trainer")
    # As etcd-rdzv's config reads it: an `etcd_api` key in --rdzv-conf wins over the variable.
    conf = dict(item.split("=", 1) for item in environment.get("RDZV_CONF", "").split(",") if item)
    chosen = conf.get("etcd_api", environment.get("ETCD_RDZV_ETCD_API"))
    assert parse_etcd_api(chosen) == "v3", f"the trainer would speak {chosen}"


def test_every_service_restarts_and_rotates_its_logs(stack: Stack) -> None:
    for name, service in stack.services.items():
        assert service.get("restart") == "unless-stopped", name
        assert service["logging"]["options"]["max-size"], name
