"""Read the Grafana dashboards in `dashboards/` the way Grafana does.

Panels (also those nested in collapsed rows), their query targets, the template variables,
and the PromQL a target sends once Grafana has replaced its variables. Also what the
dashboards are checked against: the metrics documented in docs/telemetry.md and the data
sources Grafana provisions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JsonDict = dict[str, Any]

REPO = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = REPO / "dashboards"
CONTRACT = REPO / "docs" / "telemetry.md"
DATASOURCE_DIR = REPO / "grafana" / "provisioning" / "datasources"
RULES_DIR = REPO / "prometheus" / "rules"

# The fixed interface between the dashboards and Grafana's provisioning: uid -> type.
PROVISIONED_DATASOURCES = {"prometheus": "prometheus", "tempo": "tempo"}
# Dashboards are provisioned from files, each with a stable uid.
DASHBOARD_UIDS = {
    "rendezvous-overview.json": "etcd-rdzv-overview",
    "etcd.json": "etcd-rdzv-etcd",
}
SCHEMA_VERSION = 39  # Grafana 11
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
# OpenMetrics adds `<name>_created` (when the labelled series was created) to every counter
# and histogram; Prometheus stores it as a series of its own.
CREATED = "_created"

# Variables Grafana's Prometheus data source sets itself, for each query.
GRAFANA_BUILTINS = (
    "__interval",
    "__interval_ms",
    "__rate_interval",
    "__rate_interval_ms",
    "__range",
    "__range_s",
    "__range_ms",
)
# Grafana's variable syntaxes: $name, ${name}, ${name:format}, [[name]].
_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)|\[\[(\w+)(?::[^\]]*)?\]\]")
_OUR_METRIC = re.compile(r"\betcd_rdzv_[A-Za-z0-9_]*[A-Za-z0-9]")
# Grafana escapes these in the values of a multi-value variable used in a regex matcher.
_REGEX_SPECIAL = re.compile(r"([\\^$.|?*+()\[\]{}])")


@dataclass(frozen=True)
class Target:
    """One query of one panel."""

    dashboard: str  # the dashboard's uid
    panel_id: int
    panel: str  # the panel's title
    ref_id: str
    expr: str
    instant: bool
    exemplar: bool

    def where(self) -> str:
        return f"{self.dashboard} / panel {self.panel_id} {self.panel!r} / target {self.ref_id}"


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARD_DIR.glob("*.json"))


def load(path: Path) -> JsonDict:
    board: JsonDict = json.loads(path.read_text(encoding="utf-8"))
    return board


def panels(dashboard: Mapping[str, Any]) -> Iterator[JsonDict]:
    """Every panel, rows included, and the panels a collapsed row keeps inside it."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def data_panels(dashboard: Mapping[str, Any]) -> Iterator[JsonDict]:
    """The panels that show data: every panel but rows."""
    return (panel for panel in panels(dashboard) if panel.get("type") != "row")


def targets(dashboard: Mapping[str, Any]) -> list[Target]:
    found = []
    for panel in data_panels(dashboard):
        for target in panel.get("targets", []):
            found.append(
                Target(
                    dashboard=str(dashboard["uid"]),
                    panel_id=int(panel["id"]),
                    panel=str(panel.get("title", "")),
                    ref_id=str(target.get("refId", "")),
                    expr=str(target.get("expr", "")),
                    instant=bool(target.get("instant")) and not target.get("range"),
                    exemplar=bool(target.get("exemplar")),
                )
            )
    return found


def variables(dashboard: Mapping[str, Any]) -> dict[str, JsonDict]:
    return {var["name"]: var for var in dashboard.get("templating", {}).get("list", [])}


def variable_query(variable: Mapping[str, Any]) -> str:
    """The query of a query variable, in either of the forms Grafana stores."""
    query = variable.get("query")
    if isinstance(query, dict):
        return str(query.get("query", ""))
    return str(query or variable.get("definition", ""))


def label_values_as_promql(query: str) -> tuple[str, str]:
    """`label_values(selector, label)` as a PromQL query listing the values, and the label."""
    match = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query)
    if match is None:
        raise ValueError(f"not a label_values(selector, label) query: {query!r}")
    selector, label = match.groups()
    return f"group by ({label}) ({selector})", label


def grafana_regex(values: Sequence[str]) -> str:
    """What Grafana puts in a query for a multi-value variable used with `=~`."""
    escaped = [_REGEX_SPECIAL.sub(r"\\\\\1", value) for value in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def interpolate(expr: str, values: Mapping[str, str]) -> str:
    """`expr` with every variable replaced; an unknown variable raises `KeyError`."""

    def replace(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group is not None)
        if name not in values:
            raise KeyError(f"variable ${name} has no value in {sorted(values)}: {expr}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def our_metrics(expr: str) -> set[str]:
    """The etcd-rdzv metric names an expression reads."""
    return set(_OUR_METRIC.findall(expr))


def documented_metrics() -> dict[str, str]:
    """Metric name -> type, from the metrics table of docs/telemetry.md."""
    text = CONTRACT.read_text(encoding="utf-8")
    body = text.split("## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(etcd_rdzv_\w+)` \| (\w+) \|", body, flags=re.MULTILINE)
    return dict(rows)


def is_documented(name: str, documented: Mapping[str, str]) -> bool:
    """Whether `name` is a documented metric, a series of a documented histogram, or the
    OpenMetrics `_created` series of a documented counter or histogram."""
    if name in documented:
        return True
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and documented.get(base) == "histogram":
            return True
    if name.endswith(CREATED):
        base = name.removesuffix(CREATED)
        return documented.get(f"{base}_total") == "counter" or documented.get(base) == "histogram"
    return False


def provisioned_datasource_files() -> list[Path]:
    return sorted([*DATASOURCE_DIR.glob("*.yml"), *DATASOURCE_DIR.glob("*.yaml")])


def provisioned_datasources(text: str) -> dict[str, str]:
    """uid -> type of the data sources a Grafana provisioning file declares.

    The file is YAML and PyYAML is not a dependency: the items of the top-level
    `datasources:` list are read for their own `uid:` and `type:` keys (nested lists, such
    as `exemplarTraceIdDestinations`, are skipped), which is all this needs.
    """
    found: dict[str, str] = {}
    in_list = False
    item_column: int | None = None
    fields: dict[str, str] = {}

    def close_item() -> None:
        if "uid" in fields:
            found[fields["uid"]] = fields.get("type", "")
        fields.clear()

    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace() and not line.startswith("-"):
            close_item()
            in_list = line.startswith("datasources:")
            item_column = None
            continue
        if not in_list:
            continue
        item = re.match(r"^(\s*)-\s+(\w+):\s*(.*?)\s*$", line)
        if item is not None and (item_column is None or len(item.group(1)) + 2 == item_column):
            close_item()
            item_column = line.index(item.group(2))
            fields[item.group(2)] = _scalar(item.group(3))
            continue
        key = re.match(r"^(\s*)(\w+):\s*(.*?)\s*$", line)
        if key is not None and len(key.group(1)) == item_column:
            fields.setdefault(key.group(2), _scalar(key.group(3)))
    close_item()
    return found


def _scalar(text: str) -> str:
    return text.split(" #", 1)[0].strip().strip("'\"")


def rule_files() -> list[Path]:
    return sorted([*RULES_DIR.glob("*.yml"), *RULES_DIR.glob("*.yaml")])
