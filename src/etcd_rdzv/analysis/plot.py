"""Gantt charts of versions: one row per node, one bar per phase, stragglers in red, and a
hatched row for each rank or node that left no spans. `chart` decides what; this draws it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from etcd_rdzv.analysis.chart import (
    ABSENCES,
    ERROR,
    NEVER_ARRIVED,
    RETRY,
    STRAGGLER,
    UNCONFIRMED,
    UNTRACED,
    Panel,
    Row,
    Segment,
    legend_labels,
    panels,
)
from etcd_rdzv.analysis.spans import AnalysisError
from etcd_rdzv.analysis.timeline import RunReport

PHASE_COLORS = {
    "setup": "#9e9e9e",
    "join": "#1f77b4",
    "last_call": "#9467bd",
    "frozen_wait": "#ff7f0e",
    "confirm": "#2ca02c",
    "final_wait": "#bcbd22",
    "wait_next_version": "#17becf",
}
OTHER_PHASE_COLOR = "#444444"
STRAGGLER_COLOR = "#d62728"
ABSENT_COLOR = "#7f7f7f"
# Each mark's look, shared by the bars and the legend so that the two cannot disagree.
OUTCOME_HATCHES = {RETRY: "//", ERROR: "xx"}
ABSENCE_STYLES: dict[str, dict[str, Any]] = {
    UNCONFIRMED: {"edgecolor": STRAGGLER_COLOR, "hatch": "--"},
    UNTRACED: {"edgecolor": ABSENT_COLOR, "hatch": ".."},
    NEVER_ARRIVED: {"edgecolor": ABSENT_COLOR, "hatch": "\\\\"},
}
_ROW_INCHES = 0.45
_HEADER_INCHES = 1.2
_LEGEND_COLUMNS = 7
_LEGEND_ROW_INCHES = 0.3
_BAR_HEIGHT = 0.6


def plot(reports: Sequence[RunReport], path: Path) -> None:
    """Write one Gantt panel per version, stacked, to `path` (PNG by its suffix)."""
    try:
        import matplotlib
    except ImportError:
        raise AnalysisError(
            "--plot needs matplotlib: pip install etcd-rdzv[plot]  (or: pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")  # never a display
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    drawn = panels(reports)
    if not drawn:
        raise AnalysisError("nothing to plot: no version has phase spans")
    labels = legend_labels(drawn)
    # Rows as even as they can be: matplotlib fills a legend's columns top to bottom.
    legend_rows = math.ceil(len(labels) / _LEGEND_COLUMNS)
    columns = math.ceil(len(labels) / legend_rows)
    legend_inches = _LEGEND_ROW_INCHES * legend_rows + 0.15
    rows = sum(len(panel.rows) for panel in drawn)
    height = _HEADER_INCHES * len(drawn) + _ROW_INCHES * rows + legend_inches
    figure, axes = plt.subplots(
        len(drawn),
        1,
        figsize=(11, height),
        squeeze=False,
        gridspec_kw={"height_ratios": [len(panel.rows) + 1.5 for panel in drawn]},
    )
    for panel, ax in zip(drawn, axes[:, 0], strict=True):
        _draw_panel(ax, panel)
    handles = [Patch(label=label, **_legend_style(label)) for label in labels]
    figure.legend(handles=handles, loc="upper center", ncol=columns, frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 1 - legend_inches / height))
    try:
        figure.savefig(path, dpi=100)
    except OSError as error:
        raise AnalysisError(f"cannot write {path}: {error}") from None
    finally:
        plt.close(figure)


def _draw_panel(ax: object, panel: Panel) -> None:
    from matplotlib.axes import Axes

    assert isinstance(ax, Axes)
    for index, row in enumerate(panel.rows):
        for segment in row.segments:
            ax.barh(
                index,
                segment.seconds,
                left=segment.start,
                height=_BAR_HEIGHT,
                **_segment_style(segment, row),
            )
    ax.set_yticks(range(len(panel.rows)))
    ax.set_yticklabels([row.label for row in panel.rows])
    for label, row in zip(ax.get_yticklabels(), panel.rows, strict=True):
        if row.straggler:
            label.set_color(STRAGGLER_COLOR)
            label.set_fontweight("bold")
        elif row.absent:
            label.set_color(ABSENT_COLOR)
            label.set_fontstyle("italic")
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the version's first phase")
    ax.set_title(panel.title, loc="left")
    ax.grid(axis="x", alpha=0.3)


def _segment_style(segment: Segment, row: Row) -> dict[str, Any]:
    if segment.kind in ABSENCES:
        return _absence_style(segment.kind)
    return {
        "color": PHASE_COLORS.get(segment.kind, OTHER_PHASE_COLOR),
        "edgecolor": STRAGGLER_COLOR if row.straggler else "black",
        "linewidth": 2.0 if row.straggler else 0.4,
        "hatch": None if segment.outcome_mark is None else OUTCOME_HATCHES[segment.outcome_mark],
    }


def _absence_style(kind: str) -> dict[str, Any]:
    return {"facecolor": "white", "linestyle": "--", "linewidth": 0.8, **ABSENCE_STYLES[kind]}


def _legend_style(label: str) -> dict[str, Any]:
    if label in ABSENCES:
        return _absence_style(label)
    if label in OUTCOME_HATCHES:
        return {"facecolor": "white", "edgecolor": "black", "hatch": OUTCOME_HATCHES[label]}
    if label == STRAGGLER:
        return {"facecolor": "white", "edgecolor": STRAGGLER_COLOR, "linewidth": 2.0}
    return {"color": PHASE_COLORS.get(label, OTHER_PHASE_COLOR)}
