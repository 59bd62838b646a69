"""Gantt charts of versions: one row per node, one bar per phase, stragglers in red."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from etcd_rdzv.analysis.spans import AnalysisError
from etcd_rdzv.analysis.timeline import PHASES, RunReport, VersionReport

PHASE_COLORS = {
    "setup": "#9e9e9e",
    "join": "#1f77b4",
    "last_call": "#9467bd",
    "frozen_wait": "#ff7f0e",
    "confirm": "#2ca02c",
    "final_wait": "#bcbd22",
    "wait_next_version": "#17becf",
}
STRAGGLER_COLOR = "#d62728"
_ROW_INCHES = 0.45
_HEADER_INCHES = 1.2


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

    panels = [(report.run_id, version) for report in reports for version in report.versions]
    if not panels:
        raise AnalysisError("nothing to plot: no version has phase spans")
    rows = sum(len(version.nodes) for _, version in panels)
    height = _HEADER_INCHES * len(panels) + _ROW_INCHES * rows
    figure, axes = plt.subplots(
        len(panels),
        1,
        figsize=(11, height),
        squeeze=False,
        gridspec_kw={"height_ratios": [len(v.nodes) + 1.5 for _, v in panels]},
    )
    used: set[str] = set()
    for (run_id, version), ax in zip(panels, axes[:, 0], strict=True):
        used |= _draw_version(ax, run_id, version)
    handles = [Patch(color=PHASE_COLORS.get(p, "#444444"), label=p) for p in PHASES if p in used]
    handles.append(Patch(facecolor="white", edgecolor=STRAGGLER_COLOR, label="straggler"))
    figure.legend(handles=handles, loc="upper center", ncol=len(handles), frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.5 / height))
    try:
        figure.savefig(path, dpi=100)
    except OSError as error:
        raise AnalysisError(f"cannot write {path}: {error}") from None
    finally:
        plt.close(figure)


def _draw_version(ax: object, run_id: str, version: VersionReport) -> set[str]:
    from matplotlib.axes import Axes

    assert isinstance(ax, Axes)
    origin = version.start_ns
    stragglers = {s.node for s in version.stragglers}
    used: set[str] = set()
    for row, node in enumerate(version.nodes):
        late = node.node in stragglers
        for bar in node.bars:
            used.add(bar.phase)
            ax.barh(
                row,
                bar.seconds,
                left=(bar.start_ns - origin) / 1e9,
                height=0.6,
                color=PHASE_COLORS.get(bar.phase, "#444444"),
                edgecolor=STRAGGLER_COLOR if late else "black",
                linewidth=2.0 if late else 0.4,
                hatch="//" if bar.outcome != "ok" else None,
            )
    ax.set_yticks(range(len(version.nodes)))
    ax.set_yticklabels([_label(n.node, n.rank) for n in version.nodes])
    for label, node in zip(ax.get_yticklabels(), version.nodes, strict=True):
        if node.node in stragglers:
            label.set_color(STRAGGLER_COLOR)
            label.set_fontweight("bold")
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the version's first phase")
    state = "complete" if version.complete else "incomplete"
    ax.set_title(
        f"run {run_id}, version {version.version}: {version.seconds:.3f} s, {state}", loc="left"
    )
    ax.grid(axis="x", alpha=0.3)
    return used


def _label(node: str, rank: int | None) -> str:
    return node if rank is None else f"{node} (rank {rank})"
