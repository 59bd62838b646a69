"""A real Prometheus server on loopback, for tests that query what it scraped.

`start_local_prometheus` writes `prometheus.yml` into a data directory, starts the `prometheus`
binary on a free 127.0.0.1 port with its own TSDB and log file, and waits until it is ready.
The returned `LocalPrometheus` answers PromQL through the HTTP API (`query`, `query_range`,
`query_exemplars`), waits for a query to satisfy a condition (`wait_for`) or for a job's
targets to be scraped after a moment (`wait_for_scrape_after`), and shows targets,
rules and alerts; `reload` re-reads the (optionally rewritten) configuration and rule files.
Always stop it: use it as a context manager or call `stop()`.

Things to know about Prometheus 2.42 that shape the tests:
- The scrape manager applies discovered targets on a 5 s tick, so the first scrape happens
  about 5 s after start-up, whatever `scrape_interval` says. Start Prometheus early.
- Scrapes negotiate OpenMetrics, so counters also show up as `<name>_created` series.
- The configuration may be JSON: JSON is YAML, and the standard library writes it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from etcd_rdzv_devtools.local_etcd import free_loopback_ports
from etcd_rdzv_devtools.logfiles import log_tail

__all__ = [
    "LocalPrometheus",
    "PrometheusError",
    "PrometheusQueryError",
    "PrometheusTimeout",
    "find_prometheus_binary",
    "render_config",
    "sample_value",
    "scrape_config",
    "start_local_prometheus",
    "values_by",
]

LOOPBACK = "127.0.0.1"
# In-memory exemplar storage: lets later tests follow a histogram's exemplar to its trace.
FEATURES = ("exemplar-storage",)
# Used when a config given as a dict sets neither: scrape and evaluate rules every second, so
# tests see data and alerts fire in seconds, not minutes.
DEFAULT_INTERVAL = "1s"
_PORT_ATTEMPTS = 3
_ADDRESS_IN_USE = "address already in use"
_READY_POLL_SECONDS = 0.05
_WAIT_POLL_SECONDS = 0.25
_HTTP_TIMEOUT_SECONDS = 5.0
_STOP_TIMEOUT_SECONDS = 10.0
_REAP_TIMEOUT_SECONDS = 5.0
_LOG_TAIL_LINES = 40
_RESULT_EXCERPT_CHARS = 2000
# Prometheus may record a scrape up to 2 ms before it really started (it aligns timestamps to
# the scrape schedule); asking for a scrape this much later than a moment rules that out.
_SCRAPE_TIMESTAMP_MARGIN = 0.05

JsonDict = dict[str, Any]
Predicate = Callable[[list[JsonDict]], bool]

# Servers still running when the interpreter exits are stopped (an aborted session must not
# leave Prometheus behind). Weak, so this never keeps a server alive.
_live_servers: weakref.WeakSet[LocalPrometheus] = weakref.WeakSet()
# Loopback requests must never go through an HTTP proxy set in the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class PrometheusError(RuntimeError):
    """Prometheus could not be started, reloaded or reached."""


class PrometheusQueryError(PrometheusError):
    """Prometheus rejected a query; the message is Prometheus's own."""


class PrometheusTimeout(PrometheusError):
    """A query did not satisfy its condition in time."""


def find_prometheus_binary() -> str:
    """Return the path of the `prometheus` executable, or raise saying how to install it."""
    path = shutil.which("prometheus")
    if path is None:
        raise PrometheusError(
            "prometheus executable not found on PATH. Install it with "
            "`apt-get install prometheus` (Debian/Ubuntu) or put a Prometheus 2.x binary on PATH."
        )
    return path


def scrape_config(
    job: str,
    targets: Sequence[str],
    interval: str = DEFAULT_INTERVAL,
    *,
    metrics_path: str = "/metrics",
    labels: Mapping[str, str] | None = None,
) -> JsonDict:
    """One `scrape_configs` entry: scrape `targets` (`host:port`) every `interval`."""
    static: JsonDict = {"targets": list(targets)}
    if labels:
        static["labels"] = dict(labels)
    return {
        "job_name": job,
        "scrape_interval": interval,
        # Never longer than the interval (Prometheus refuses that); a scrape of a test target
        # that takes longer has failed anyway.
        "scrape_timeout": interval,
        "metrics_path": metrics_path,
        "static_configs": [static],
    }


def sample_value(sample: Mapping[str, Any]) -> float:
    """The value of one instant-vector sample (Prometheus sends it as a string)."""
    return float(sample["value"][1])


def values_by(results: Sequence[Mapping[str, Any]], label: str) -> dict[str, float]:
    """Sample values keyed by `label` (e.g. `instance`); raise if a key is missing or repeats."""
    values: dict[str, float] = {}
    for sample in results:
        key = sample["metric"].get(label)
        if key is None:
            raise KeyError(f"sample without label {label!r}: {sample}")
        if key in values:
            raise ValueError(f"several samples with {label}={key!r}: {list(results)}")
        values[key] = sample_value(sample)
    return values


@dataclass(eq=False)
class LocalPrometheus:
    """One Prometheus process on loopback. Create it with `start_local_prometheus`."""

    port: int
    data_dir: Path
    config_path: Path
    log_path: Path
    command: tuple[str, ...]
    rule_files: tuple[Path, ...] = ()
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # --- lifecycle ---------------------------------------------------------------------------

    def launch(self) -> None:
        """Start the process without waiting for it; see `wait_ready`."""
        if self.is_running():
            raise PrometheusError(f"Prometheus is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # A file, never a pipe: an unread pipe fills up and blocks Prometheus.
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                # Its own session: a Ctrl-C meant for the test run does not reach it first.
                start_new_session=True,
            )
        _live_servers.add(self)

    def wait_ready(self, timeout: float) -> None:
        """Block until `/-/ready` answers 200; raise `PrometheusError` with the log tail."""
        deadline = time.monotonic() + timeout
        while True:
            self._require_alive("becoming ready")
            if self._is_ready():
                return
            if time.monotonic() >= deadline:
                raise PrometheusError(
                    f"Prometheus at {self.url} not ready after {timeout:.1f}s.\n{self._log_note()}"
                )
            time.sleep(_READY_POLL_SECONDS)

    def _is_ready(self) -> bool:
        try:
            with _DIRECT.open(f"{self.url}/-/ready", timeout=_HTTP_TIMEOUT_SECONDS) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def stop(self, timeout: float = _STOP_TIMEOUT_SECONDS) -> None:
        """Terminate, killing the process if it does not exit in time. Idempotent."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        # A paused (SIGSTOPped) process only acts on SIGTERM once it is continued.
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(_REAP_TIMEOUT_SECONDS)

    def reload(self, config: str | Mapping[str, Any] | None = None) -> None:
        """Re-read the configuration and rule files; with `config`, rewrite the file first
        (the rule files given at start stay referenced).

        Returns once Prometheus has applied them; raises with its message if it rejects them
        (it then keeps running with the configuration it had).
        """
        if config is not None:
            self.config_path.write_text(render_config(config, self.rule_files), encoding="utf-8")
        self._require_alive("reload")
        request = urllib.request.Request(f"{self.url}/-/reload", data=b"", method="POST")
        try:
            with _DIRECT.open(request, timeout=_HTTP_TIMEOUT_SECONDS):
                return
        except urllib.error.HTTPError as error:
            body = error.read().decode("utf-8", errors="replace").strip()
            raise PrometheusError(f"Prometheus rejected the reload: {body}") from None
        except (OSError, urllib.error.URLError) as error:
            raise PrometheusError(f"cannot reach {self.url}: {error}\n{self._log_note()}") from None

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        return log_tail(self.log_path, lines)

    def __enter__(self) -> LocalPrometheus:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- HTTP API ----------------------------------------------------------------------------

    def query(self, promql: str, *, at: float | None = None) -> list[JsonDict]:
        """Evaluate `promql` now (or at Unix time `at`): a list of `{"metric", "value"}`.

        A scalar or string result comes back as one entry with empty `metric`; a range
        vector selector (`up[1m]`) as entries with `values`.
        """
        params = {"query": promql}
        if at is not None:
            params["time"] = _timestamp(at)
        data = self._api("query", params, what=promql)
        return _as_list(data)

    def query_range(self, promql: str, start: float, end: float, step: float) -> list[JsonDict]:
        """Evaluate `promql` from `start` to `end` (Unix times): `{"metric", "values"}` each."""
        params = {"query": promql, "start": _timestamp(start), "end": _timestamp(end)}
        params["step"] = f"{step:g}"
        return _as_list(self._api("query_range", params, what=promql))

    def query_exemplars(self, promql: str, start: float, end: float) -> list[JsonDict]:
        """Exemplars of the series `promql` selects: `{"seriesLabels", "exemplars"}` each."""
        params = {"query": promql, "start": _timestamp(start), "end": _timestamp(end)}
        result: list[JsonDict] = self._api("query_exemplars", params, what=promql) or []
        return result

    def wait_for(
        self,
        promql: str,
        predicate: Predicate,
        timeout: float,
        *,
        description: str | None = None,
        interval: float = _WAIT_POLL_SECONDS,
    ) -> list[JsonDict]:
        """Query until `predicate(result)` holds and return that result; bounded by `timeout`.

        On timeout raise `PrometheusTimeout` with the last result, the targets' health and
        the log tail. A query Prometheus rejects fails at once: it will never succeed.
        """
        deadline = time.monotonic() + timeout
        attempts = 0
        while True:
            self._require_alive(f"waiting for {promql!r}")
            result = self.query(promql)
            attempts += 1
            if predicate(result):
                return result
            if time.monotonic() >= deadline:
                raise PrometheusTimeout(
                    f"{description or 'condition'} not met within {timeout:.1f}s "
                    f"({attempts} queries)\nquery: {promql}\nlast result: {_excerpt(result)}\n"
                    f"targets:\n{self._targets_note()}\n{self._log_note()}"
                )
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))

    def wait_for_scrape_after(self, job: str, moment: float, timeout: float) -> list[JsonDict]:
        """Wait until every target of `job` was scraped, successfully or not, by a scrape
        that started after `moment` (Unix time): from then on a query sees each target as of
        `moment` or later."""
        count = sum(1 for t in self.targets()["activeTargets"] if t.get("scrapePool") == job)
        if count == 0:
            # Before discovery (see the module's notes) nothing would be waited for.
            raise PrometheusError(f"job {job!r} has no targets yet: wait_for_up first")
        return self.wait_for(
            f'timestamp(up{{job="{job}"}}) > {moment + _SCRAPE_TIMESTAMP_MARGIN:.3f}',
            lambda result: len(result) >= count,
            timeout,
            description=f"a scrape of all {count} target(s) of job {job!r} after {moment:.3f}",
        )

    def wait_for_up(self, job: str, count: int, timeout: float) -> list[JsonDict]:
        """Wait until `count` targets of `job` were scraped successfully (`up == 1`)."""
        return self.wait_for(
            f'up{{job="{job}"}} == 1',
            lambda result: len(result) >= count,
            timeout,
            description=f"{count} target(s) of job {job!r} up",
        )

    def targets(self) -> JsonDict:
        """`/api/v1/targets`: `{"activeTargets": [...], "droppedTargets": [...]}`."""
        data: JsonDict = self._api("targets", {}, what="targets")
        return data

    def rules(self) -> list[JsonDict]:
        """`/api/v1/rules`: the loaded rule groups with each rule's health and state."""
        data: JsonDict = self._api("rules", {}, what="rules")
        groups: list[JsonDict] = data.get("groups", [])
        return groups

    def alerts(self) -> list[JsonDict]:
        """`/api/v1/alerts`: alerts pending or firing now, with labels and annotations."""
        data: JsonDict = self._api("alerts", {}, what="alerts")
        alerts: list[JsonDict] = data.get("alerts", [])
        return alerts

    def _api(self, endpoint: str, params: Mapping[str, str], *, what: str) -> Any:
        """Call `/api/v1/<endpoint>` and return its `data`, raising with Prometheus's error."""
        url = f"{self.url}/api/v1/{endpoint}"
        # POST as a form: the API accepts it everywhere a query goes, and long dashboard
        # queries never hit URL length limits.
        request = (
            urllib.request.Request(url, data=urllib.parse.urlencode(params).encode(), method="POST")
            if params
            else urllib.request.Request(url)
        )
        try:
            with _DIRECT.open(request, timeout=_HTTP_TIMEOUT_SECONDS) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            # 400 (bad query), 422 (cannot execute), 503 (timeout or overload): JSON says why.
            body = error.read()
            try:
                answer = json.loads(body)
            except ValueError:
                answer = {}
            if isinstance(answer, dict) and answer.get("status") == "error":
                raise PrometheusQueryError(
                    f"Prometheus rejected {what!r}: {answer.get('errorType')}: "
                    f"{answer.get('error')}"
                ) from None
            raise PrometheusError(
                f"{url} answered HTTP {error.code}: {body[:500]!r}\n{self._log_note()}"
            ) from None
        except (OSError, urllib.error.URLError) as error:
            raise PrometheusError(f"cannot reach {url}: {error}\n{self._log_note()}") from None
        answer = json.loads(body)
        if answer.get("status") != "success":
            raise PrometheusQueryError(
                f"Prometheus failed {what!r}: {answer.get('errorType')}: {answer.get('error')}"
            )
        return answer.get("data")

    # --- diagnostics -------------------------------------------------------------------------

    def _require_alive(self, doing: str) -> None:
        if not self.is_running():
            code = None if self.process is None else self.process.returncode
            raise PrometheusError(
                f"Prometheus is not running (exit code {code}) while {doing}.\n{self._log_note()}"
            )

    def _log_note(self) -> str:
        return f"--- Prometheus log tail ({self.log_path}) ---\n{self.log_tail()}"

    def _targets_note(self) -> str:
        try:
            active = self.targets().get("activeTargets", [])
        except PrometheusError as error:
            return f"  <targets unavailable: {error}>"
        if not active:
            return "  <no active targets>"
        return "\n".join(
            f"  {t.get('scrapePool')} {t.get('scrapeUrl')}: {t.get('health')}"
            f" (last scrape {t.get('lastScrape')}, error {t.get('lastError')!r})"
            for t in active
        )


def render_config(config: str | Mapping[str, Any], rule_files: Sequence[Path]) -> str:
    """The text of `prometheus.yml`: `config` with `rule_files` referenced, as JSON or YAML.

    A dict gets `global.scrape_interval` and `global.evaluation_interval` of 1 s unless it
    sets them. Text is used as is, apart from the rule files: merged into JSON text, or
    appended as a top-level `rule_files` list to YAML text that has none.
    """
    rules = [str(path.resolve()) for path in rule_files]
    if isinstance(config, str):
        try:
            parsed = json.loads(config)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            return _yaml_with_rule_files(config, rules)
        document: JsonDict = parsed
    else:
        document = json.loads(json.dumps(dict(config)))  # a deep copy, JSON-clean
        settings = document.setdefault("global", {})
        settings.setdefault("scrape_interval", DEFAULT_INTERVAL)
        settings.setdefault("evaluation_interval", DEFAULT_INTERVAL)
    if rules:
        document["rule_files"] = [*document.get("rule_files", []), *rules]
    return json.dumps(document, indent=2) + "\n"


def _yaml_with_rule_files(text: str, rules: list[str]) -> str:
    if not rules:
        return text
    if any(line.startswith("rule_files:") for line in text.splitlines()):
        raise ValueError(
            "the configuration text already has `rule_files`: list them there, or pass the "
            "configuration as a dict"
        )
    # JSON strings are YAML double-quoted scalars: paths with any character stay intact.
    listing = "".join(f"  - {json.dumps(rule)}\n" for rule in rules)
    return f"{text.rstrip()}\nrule_files:\n{listing}"


def start_local_prometheus(
    config_text: str | Mapping[str, Any],
    *,
    data_dir: Path,
    rule_files: Sequence[Path] = (),
    extra_args: Sequence[str] = (),
    ready_timeout: float = 30.0,
) -> LocalPrometheus:
    """Start Prometheus on a free loopback port with `config_text` and wait until it is ready.

    `config_text` is YAML or JSON text, or a dict (see `render_config`, also for how
    `rule_files` are referenced). `data_dir` receives `prometheus.yml`, the TSDB (`tsdb/`) and
    the log (`prometheus.log`). The lifecycle API is on, for `reload()`. `extra_args` are
    added to the command line; flags set here (except `--enable-feature`) cannot be repeated.
    """
    binary = find_prometheus_binary()
    data_dir.mkdir(parents=True, exist_ok=True)
    config_path = data_dir / "prometheus.yml"
    config_path.write_text(render_config(config_text, rule_files), encoding="utf-8")
    log_path = data_dir / "prometheus.log"

    for attempt in range(1, _PORT_ATTEMPTS + 1):
        port = free_loopback_ports(1)[0]
        server = LocalPrometheus(
            port=port,
            data_dir=data_dir,
            config_path=config_path,
            log_path=log_path,
            rule_files=tuple(rule_files),
            command=(
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={data_dir / 'tsdb'}",
                f"--web.listen-address={LOOPBACK}:{port}",
                f"--enable-feature={','.join(FEATURES)}",
                "--web.enable-lifecycle",
                *extra_args,
            ),
        )
        log_start = log_path.stat().st_size if log_path.exists() else 0
        try:
            server.launch()
            server.wait_ready(ready_timeout)
        except PrometheusError:
            server.stop()
            if attempt < _PORT_ATTEMPTS and _ADDRESS_IN_USE in _read_from(log_path, log_start):
                continue
            raise
        except BaseException:
            server.stop()
            raise
        return server
    raise AssertionError("unreachable: the last attempt returns or raises")


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as log:
            log.seek(offset)
            return log.read().decode("utf-8", errors="replace").lower()
    except OSError:
        return ""


def _timestamp(seconds: float) -> str:
    if not math.isfinite(seconds):
        raise ValueError(f"not a time: {seconds}")
    return f"{seconds:.3f}"


def _as_list(data: Any) -> list[JsonDict]:
    result = data["result"]
    if data["resultType"] in ("scalar", "string"):
        return [{"metric": {}, "value": result}]
    rows: list[JsonDict] = result
    return rows


def _excerpt(result: list[JsonDict]) -> str:
    text = json.dumps(result, sort_keys=True)
    if len(text) <= _RESULT_EXCERPT_CHARS:
        return text
    return f"{text[:_RESULT_EXCERPT_CHARS]}... ({len(text)} characters)"


@atexit.register
def _stop_leftover_servers() -> None:
    for server in list(_live_servers):
        server.stop(timeout=_REAP_TIMEOUT_SECONDS)
