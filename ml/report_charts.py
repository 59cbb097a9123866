"""PNG charts of the journal report, drawn with matplotlib's object API on the Agg canvas.

Every function takes plain arrays (times as naive UTC ``datetime64``) and
returns the PNG bytes. matplotlib is imported inside the functions: the daemon
imports neither this module nor matplotlib, and no pyplot global state is used
(each chart is its own ``Figure`` on its own ``FigureCanvasAgg``).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 110
WIDTH_IN = 10.0

GREEN = "#16a34a"
RED = "#dc2626"
BLUE = "#2563eb"
GREY = "#6b7280"
INK = "#1f2937"
# One colour per line of a per-model chart, in a fixed order (deterministic output).
PALETTE: tuple[str, ...] = (
    "#2563eb",
    "#ea580c",
    "#16a34a",
    "#9333ea",
    "#0891b2",
    "#ca8a04",
    "#db2777",
    "#4b5563",
)


@dataclass(frozen=True)
class Series:
    """One line of a time chart: x (naive UTC datetime64), y, and the samples behind each point."""

    times: np.ndarray
    values: np.ndarray
    counts: np.ndarray
    dashed: bool = False


@dataclass(frozen=True)
class Marker:
    """One model event on the timeline."""

    time: np.datetime64
    lane: str
    category: str
    version: str = ""


@dataclass(frozen=True)
class Run:
    """One training run on the timeline (``end`` None: still running or interrupted)."""

    start: np.datetime64
    end: np.datetime64 | None
    lane: str
    status: str


# category -> (marker, colour, label), in legend order.
EVENT_STYLES: Mapping[str, tuple[str, str, str]] = {
    "trained": ("o", GREY, "trained"),
    "validated": ("P", "#0d9488", "validated"),
    "rejected": ("X", RED, "rejected"),
    "shadow": ("s", "#9333ea", "shadow"),
    "promoted": ("^", GREEN, "promoted"),
    "swapped": ("d", BLUE, "swapped in"),
    "rolled_back": ("v", "#ea580c", "rolled back"),
    "drift": ("D", "#b91c1c", "drift alarm"),
    "integrity": ("*", "#111827", "integrity / fallback"),
    "other": (".", GREY, "other"),
}
# Events whose version is written beside the marker (the ones an operator looks for).
LABELLED_CATEGORIES: frozenset[str] = frozenset({"promoted", "rolled_back", "rejected"})
LABELS_MAX = 40
RUN_COLOURS: Mapping[str, str] = {
    "done": "#9ca3af",
    "passed": "#86efac",
    "rejected": "#fca5a5",
    "failed": "#f87171",
    "cancelled": "#d1d5db",
}


def _figure(height_in: float, width_in: float = WIDTH_IN) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # No "Software" text chunk: the bytes depend only on the drawing.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _style(ax: Axes, title: str | None = None) -> None:
    ax.grid(True, color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color("#9ca3af")
    ax.tick_params(colors=INK, labelsize=8)
    if title:
        ax.set_title(title, loc="left", fontsize=10, color=INK, fontweight="bold")


def _date_axis(ax: Axes) -> None:
    import matplotlib.dates as mdates

    locator = mdates.AutoDateLocator(minticks=3, maxticks=9)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))


def equity_chart(
    times: np.ndarray, equity: np.ndarray, balance: np.ndarray | None, *, equity_label: str
) -> bytes:
    """Equity (and balance) on top, drawdown from the running peak (percent) below."""
    fig = _figure(4.8)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1.3))
    if balance is not None:
        top.plot(times, balance, color=GREY, linewidth=1.0, label="balance", drawstyle="steps-post")
    top.plot(times, equity, color=BLUE, linewidth=1.4, label=equity_label)
    top.legend(loc="best", fontsize=8, framealpha=0.85, edgecolor="none")
    _style(top, "Equity")
    top.set_ylabel("account currency", fontsize=8, color=INK)
    peaks = np.maximum.accumulate(equity)
    drawdown = (equity / peaks - 1.0) * 100.0
    bottom.fill_between(times, drawdown, 0.0, color=RED, alpha=0.35, linewidth=0)
    bottom.plot(times, drawdown, color=RED, linewidth=0.8)
    _style(bottom, "Drawdown from the running peak")
    bottom.set_ylabel("%", fontsize=8, color=INK)
    _date_axis(bottom)
    return _png(fig)


def trades_chart(
    net_pnl: np.ndarray,
    holding_minutes: np.ndarray,
    by_side: Mapping[str, float],
    by_reason: Mapping[str, float],
) -> bytes:
    """Net P&L histogram, holding-time histogram, net P&L by side and by close reason."""
    fig = _figure(6.4)
    (hist, hold), (side, reason) = fig.subplots(2, 2)
    bins = np.histogram_bin_edges(net_pnl, bins=min(40, max(5, net_pnl.size // 3)))
    hist.hist(net_pnl[net_pnl > 0], bins=bins, color=GREEN, alpha=0.85, label="wins")
    hist.hist(net_pnl[net_pnl <= 0], bins=bins, color=RED, alpha=0.85, label="losses / flat")
    hist.axvline(0.0, color=INK, linewidth=0.8)
    hist.legend(fontsize=8, frameon=False)
    _style(hist, "Net P&L per trade")
    hist.set_ylabel("trades", fontsize=8, color=INK)

    finite = holding_minutes[np.isfinite(holding_minutes)]
    if finite.size:
        hold.hist(finite, bins=min(40, max(5, finite.size // 3)), color=BLUE, alpha=0.85)
    _style(hold, "Holding time (minutes)")
    hold.set_ylabel("trades", fontsize=8, color=INK)

    for ax, data, title in (
        (side, by_side, "Net P&L by side"),
        (reason, by_reason, "Net P&L by close reason"),
    ):
        names = list(data)
        values = np.array([data[n] for n in names], dtype=np.float64)
        colours = [GREEN if v > 0 else RED for v in values]
        positions = np.arange(len(names))
        ax.barh(positions, values, color=colours, alpha=0.85)
        ax.set_yticks(positions, labels=names, fontsize=8)
        ax.axvline(0.0, color=INK, linewidth=0.8)
        ax.invert_yaxis()
        _style(ax, title)
    return _png(fig)


def hit_rate_chart(
    lines: Mapping[str, Series],
    *,
    period_label: str,
    version_marks: Sequence[tuple[np.datetime64, str]] = (),
) -> bytes:
    """Hit rate (share of bars whose most likely class was the outcome) per model over time."""
    fig = _figure(4.2)
    ax = fig.subplots()
    for index, (name, line) in enumerate(lines.items()):
        colour = PALETTE[index % len(PALETTE)]
        ax.plot(
            line.times,
            line.values * 100.0,
            color=colour,
            linewidth=1.3,
            linestyle="--" if line.dashed else "-",
            marker="o",
            markersize=3,
            label=name,
        )
    import matplotlib.dates as mdates

    for when, text in version_marks:
        ax.axvline(float(mdates.date2num(when)), color=GREY, linewidth=0.7, linestyle=":")
        ax.annotate(
            text,
            (when, 1.0),
            xycoords=("data", "axes fraction"),
            rotation=90,
            fontsize=6,
            color=GREY,
            va="top",
            ha="right",
        )
    ax.axhline(100.0 / 3.0, color=GREY, linewidth=0.8, linestyle="--", label="1/3 (chance)")
    ax.set_ylim(0, 100)
    ax.set_ylabel(f"hit rate per {period_label}, %", fontsize=8, color=INK)
    ax.legend(fontsize=8, frameon=False, ncols=min(4, len(lines) + 1), loc="lower left")
    _style(ax, "Prediction hit rate over time")
    _date_axis(ax)
    return _png(fig)


def calibration_chart(curves: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> bytes:
    """Reliability diagram: mean predicted max-probability vs observed hit frequency per bin."""
    fig = _figure(4.6, 6.4)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color=GREY, linewidth=0.9, linestyle="--", label="perfectly calibrated")
    for index, (name, (confidence, frequency, counts)) in enumerate(curves.items()):
        colour = PALETTE[index % len(PALETTE)]
        sizes = 12.0 + 60.0 * counts / max(1.0, float(counts.max(initial=1)))
        ax.plot(confidence, frequency, color=colour, linewidth=1.2, label=name)
        ax.scatter(confidence, frequency, s=sizes, color=colour, alpha=0.8, zorder=3)
    ax.set_xlim(0.3, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("predicted probability of the most likely class", fontsize=8, color=INK)
    ax.set_ylabel("observed frequency it happened", fontsize=8, color=INK)
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    _style(ax, "Calibration (marker size: predictions in the bin)")
    return _png(fig)


def timeline_chart(markers: Sequence[Marker], runs: Sequence[Run], lanes: Sequence[str]) -> bytes:
    """Model lifecycle per symbol/kind lane: training runs as bars, events as markers."""
    import matplotlib.dates as mdates

    fig = _figure(1.4 + 0.45 * len(lanes))
    ax = fig.subplots()
    row = {lane: i for i, lane in enumerate(lanes)}
    for run in runs:
        start = mdates.date2num(run.start)
        end = mdates.date2num(run.end) if run.end is not None else start
        ax.barh(
            row[run.lane],
            max(end - start, 1e-5),
            left=start,
            height=0.5,
            color=RUN_COLOURS.get(run.status, "#d1d5db"),
            edgecolor="none",
            alpha=0.9,
        )
    for category, (marker, colour, label) in EVENT_STYLES.items():
        picked = [m for m in markers if m.category == category]
        if not picked:
            continue
        ax.scatter(
            np.array([m.time for m in picked]),
            [row[m.lane] for m in picked],
            marker=marker,
            s=46,
            color=colour,
            label=label,
            zorder=3,
            edgecolors="white",
            linewidths=0.5,
        )
    # One label per version and instant (a rollback is journaled by the store and the trainer).
    labelled = {
        (m.lane, m.time, m.version): m
        for m in markers
        if m.version and m.category in LABELLED_CATEGORIES
    }
    for m in list(labelled.values())[-LABELS_MAX:]:
        ax.annotate(
            m.version,
            (float(mdates.date2num(m.time)), row[m.lane]),
            xytext=(0, 7),
            textcoords="offset points",
            fontsize=6,
            color=EVENT_STYLES[m.category][1],
            ha="center",
        )
    from matplotlib.patches import Patch

    handles, _labels = ax.get_legend_handles_labels()
    statuses = sorted({run.status for run in runs})
    handles += [
        Patch(color=RUN_COLOURS.get(status, "#d1d5db"), label=f"run {status}")
        for status in statuses
    ]
    ax.set_yticks(range(len(lanes)), labels=list(lanes), fontsize=8)
    ax.set_ylim(len(lanes) - 0.5, -0.5)
    ax.legend(
        handles=handles,
        fontsize=7,
        frameon=False,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        borderaxespad=0,
    )
    _style(ax, "Model versions (bars: training runs)")
    _date_axis(ax)
    return _png(fig)


__all__ = [
    "EVENT_STYLES",
    "Marker",
    "Run",
    "Series",
    "calibration_chart",
    "equity_chart",
    "hit_rate_chart",
    "timeline_chart",
    "trades_chart",
]
