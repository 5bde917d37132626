"""The report's charts, drawn with matplotlib from summary.json: which plots a report has and how they look.

Owns the figures (overall histogram and CDF, per-group percentile ranges, CDFs and histograms), the choice
of groups that are plotted, the SSIM-map colormap with its colour bar, and the PNG encoding shared by the
page and `plots/*.png`. The numbers come from the histogram arithmetic in `ssim_ray.report.bins`.

Figures are `matplotlib.figure.Figure` objects on their own `FigureCanvasAgg`: pyplot is never imported,
so the backend, the figure registry and the rcParams of the process that calls the report stay as they were.
"""

from __future__ import annotations

import functools
import io
import re
from dataclasses import dataclass
from typing import Any, List, Mapping, Sequence, Tuple

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ssim_ray.config import METRIC_LABELS, METRIC_UNITS
from ssim_ray.report.bins import cdf_points, dense_histogram, display_range, rebin

MAX_GROUP_PLOTS = 12  # groups beyond this are in the table, not plotted (the largest by ok pairs are)
# Charts are drawn at twice their size on the page, so that text and lines stay sharp on high-density screens.
PIXEL_SCALE = 2
# Perceptually uniform and reversed: SSIM 1 (structure kept) is black, SSIM 0 and below (lost) bright yellow.
SSIM_CMAP = "magma_r"
SSIM_NORM = (0.0, 1.0)
MAIN_COLOR = "#1f5ea8"
GATE_COLOR = "#b00020"
GROUP_COLORS = "tab10"


# ------------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Chart:
    """One figure before encoding: its file name under plots/, a caption, and the matplotlib Figure."""

    name: str
    caption: str
    figure: Figure


@dataclass(frozen=True)
class Plot:
    """One chart as written: file name under plots/, caption, PNG bytes, and its size on the page (CSS px)."""

    name: str
    caption: str
    png: bytes
    width: int
    height: int


def new_figure(width: int, height: int) -> Figure:
    """A figure of width x height CSS pixels on its own Agg canvas (pyplot and its global state untouched).

    Args:
        width: width on the page, in CSS pixels.
        height: height on the page.

    Returns:
        The figure, with constrained layout so labels are never clipped.

    Example:
        >>> new_figure(300, 200).get_size_inches().tolist()
        [3.0, 2.0]
    """
    figure = Figure(figsize=(width / 100, height / 100), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def render(chart: Chart) -> Plot:
    """Encode a chart as PNG at PIXEL_SCALE times its page size.

    The PNG carries no creation time or software version, so the same summary gives the same bytes.

    Args:
        chart: the figure and its names.

    Returns:
        The Plot to embed and to write.

    Example:
        >>> plot = render(Chart("x.png", "x", new_figure(100, 50)))
        >>> plot.png[:4], (plot.width, plot.height)
        (b'\\x89PNG', (100, 50))
    """
    buffer = io.BytesIO()
    chart.figure.savefig(buffer, format="png", dpi=100 * PIXEL_SCALE, metadata={"Software": None})
    width, height = (int(round(v * 100)) for v in chart.figure.get_size_inches())
    return Plot(chart.name, chart.caption, buffer.getvalue(), width, height)


def _gate_lines(axes: Any, thresholds: Sequence[float]) -> None:
    """Dashed lines at the quality gates' thresholds, so a reader sees what falls below them."""
    for threshold in thresholds:
        axes.axvline(threshold, color=GATE_COLOR, linestyle="--", linewidth=1.2, label=f"gate {threshold:g}")


def histogram_figure(edges: np.ndarray, counts: np.ndarray, *, title: str, color: str = MAIN_COLOR,
                     thresholds: Sequence[float] = (), size: Tuple[int, int] = (560, 300),
                     legend: bool = True, xlabel: str = "SSIM") -> Figure:
    """Bars of display-bin counts over their SSIM edges (one bar per bin, in bin order).

    Args:
        edges: display bin edges (n + 1), from `rebin`.
        counts: pairs per display bin (n).
        title: the figure's title.
        color: the bars' colour.
        thresholds: quality-gate thresholds drawn as dashed lines.
        size: (width, height) on the page in CSS pixels.
        legend: name the gate lines in a legend (small multiples leave it out: it would cover bars).
        xlabel: the metric (and unit) on the x axis.

    Returns:
        The figure; its one axes holds the bars as patches.

    Example:
        >>> figure = histogram_figure(np.array([0.0, 0.5, 1.0]), np.array([1, 3]), title="t")
        >>> [float(p.get_height()) for p in figure.axes[0].patches]
        [1.0, 3.0]
    """
    figure = new_figure(*size)
    axes = figure.add_subplot()
    axes.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=color, linewidth=0)
    _gate_lines(axes, thresholds)
    axes.set(title=title, xlabel=xlabel, ylabel="pairs", xlim=(edges[0], edges[-1]))
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(axis="y", color="#e4e4e4")
    axes.set_axisbelow(True)
    if thresholds and legend:
        axes.legend(loc="best", frameon=False)
    return figure


def cdf_figure(series: Sequence[Tuple[str, np.ndarray, np.ndarray]], *, title: str,
               thresholds: Sequence[float] = (), size: Tuple[int, int] = (560, 300), xlabel: str = "SSIM") -> Figure:
    """CDF lines (fraction of ok pairs below each SSIM), one per (label, xs, ys) series.

    Args:
        series: (label, edges, fractions) per line, from `cdf_points`; more than one gets a legend.
        title: the figure's title.
        thresholds: quality-gate thresholds drawn as dashed lines.
        size: (width, height) on the page in CSS pixels.
        xlabel: the metric (and unit) on the x axis.

    Returns:
        The figure; its axes holds one line per series, in order, then the gate lines.

    Example:
        >>> xs = np.array([0.0, 1.0]); cdf_figure([("all", xs, xs)], title="t").axes[0].lines[0].get_label()
        'all'
    """
    figure = new_figure(*size)
    axes = figure.add_subplot()
    colors = colormaps[GROUP_COLORS] if len(series) > 1 else None
    for index, (label, xs, ys) in enumerate(series):
        axes.plot(xs, ys, label=label, linewidth=1.6, color=colors(index % 10) if colors else MAIN_COLOR)
    _gate_lines(axes, thresholds)
    lo = min(float(xs[0]) for _, xs, _ in series)
    hi = max(float(xs[-1]) for _, xs, _ in series)
    axes.set(title=title, xlabel=xlabel, ylabel="fraction of pairs below", ylim=(0, 1.02),
             xlim=(lo, hi if hi > lo else lo + 0.05))
    axes.grid(color="#e4e4e4")
    if len(series) > 1 or thresholds:
        axes.legend(loc="upper left", frameon=False, fontsize="small")
    return figure


def percentile_figure(groups: Mapping[str, Mapping[str, Any]], names: Sequence[str], *, by: str,
                      thresholds: Sequence[float] = (), metric: str = "ssim") -> Figure:
    """One row per group, lowest mean on top: a line p5..p95, a box p25..p75, a dot at p50, a cross at min.

    Args:
        groups: the summary's `groups`.
        names: the groups to draw (each with ok pairs).
        by: the group column's name (axis label).
        thresholds: quality-gate thresholds drawn as dashed lines.
        metric: whose block of each group (`ssim`, `psnr`, `ms_ssim`).

    Returns:
        The figure; rows are in `ordered_by_mean(groups, names, metric)` order from the top.

    Example:
        >>> g = {"a": {"ssim": {"mean": 0.9, "min": 0.5, "percentiles": {"p5": 0.8, "p25": 0.85, "p50": 0.9,
        ...      "p75": 0.95, "p95": 0.99}}}}
        >>> percentile_figure(g, ["a"], by="codec").axes[0].get_yticklabels()[0].get_text()
        'a'
    """
    ordered = ordered_by_mean(groups, names, metric)
    figure = new_figure(760, 90 + 26 * len(ordered))
    axes = figure.add_subplot()
    rows = np.arange(len(ordered))
    stats = [groups[name][metric] for name in ordered]
    pct = {key: np.array([s["percentiles"][key] for s in stats], dtype=float)
           for key in ("p5", "p25", "p50", "p75", "p95")}
    axes.hlines(rows, pct["p5"], pct["p95"], color="#6b8fbf", linewidth=1.5, label="p5 – p95")
    axes.barh(rows, pct["p75"] - pct["p25"], left=pct["p25"], height=0.5, color="#a9c4e6", label="p25 – p75")
    axes.plot(pct["p50"], rows, "o", color=MAIN_COLOR, markersize=5, label="median")
    axes.plot([s["min"] for s in stats], rows, "x", color="#444444", markersize=5, label="min")
    _gate_lines(axes, thresholds)
    axes.set_yticks(rows, [name[:30] for name in ordered])
    axes.invert_yaxis()
    label = METRIC_LABELS[metric]
    axes.set(title=f"{label} percentiles by {by}, lowest mean on top", xlabel=label + METRIC_UNITS[metric])
    axes.grid(axis="x", color="#e4e4e4")
    axes.set_axisbelow(True)
    figure.legend(loc="outside lower center", frameon=False, fontsize="small", ncols=5)
    return figure


def ordered_by_mean(groups: Mapping[str, Mapping[str, Any]], names: Sequence[str], metric: str = "ssim") -> List[str]:
    """The names sorted by their group's mean of `metric` (default SSIM), lowest first (ties by name).

    Example:
        >>> ordered_by_mean({"a": {"ssim": {"mean": 0.9}}, "b": {"ssim": {"mean": 0.5}}}, ["a", "b"])
        ['b', 'a']
    """
    return sorted(names, key=lambda name: (groups[name][metric]["mean"], name))


def message_figure(message: str, *, size: Tuple[int, int] = (560, 120)) -> Figure:
    """A placeholder figure with a message (e.g. no ok pairs to plot).

    Example:
        >>> message_figure("nothing").texts[0].get_text()
        'nothing'
    """
    figure = new_figure(*size)
    figure.text(0.5, 0.5, message, ha="center", va="center", color="#555555")
    return figure


# ------------------------------------------------------------------------------------------------------
# The charts of a summary
# ------------------------------------------------------------------------------------------------------

def plotted_groups(summary: Mapping[str, Any]) -> List[str]:
    """The groups that get their own plots: the MAX_GROUP_PLOTS with most ok pairs (ties by name).

    Args:
        summary: summary.json.

    Returns:
        Group names, most ok pairs first; groups without an ok pair have nothing to plot and are left out.

    Example:
        >>> plotted_groups({"groups": {"a": {"ssim": {"count": 1}}, "b": {"ssim": {"count": 3}}}})
        ['b', 'a']
    """
    groups = summary.get("groups") or {}
    ranked = sorted(groups, key=lambda g: (-groups[g]["ssim"]["count"], g))
    return [g for g in ranked if groups[g]["ssim"]["count"]][:MAX_GROUP_PLOTS]


def gate_thresholds(summary: Mapping[str, Any], *, per_group: bool) -> Tuple[float, ...]:
    """The SSIM thresholds of the gates the summary was merged with: `min_ssim` for the whole run, or
    `group_min_ssim` for per-group plots (none when unset).

    Example:
        >>> gate_thresholds({"audit": {"min_ssim": 0.5, "group_min_ssim": None}}, per_group=False)
        (0.5,)
    """
    value = (summary.get("audit") or {}).get("group_min_ssim" if per_group else "min_ssim")
    return () if value is None else (float(value),)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text)[:40] or "_"


def summary_charts(summary: Mapping[str, Any]) -> List[Chart]:
    """The figures of a summary: histogram and CDF of all ok pairs; per group percentile ranges, CDFs
    overlaid and a histogram each (the `plotted_groups`).

    Args:
        summary: summary.json.

    Returns:
        Charts in page order; file names are stable (ssim_histogram.png, ssim_cdf.png, groups_box.png,
        groups_cdf.png, group_NN_<name>.png).

    Example:
        >>> s = {"ssim": {"count": 0, "min": None, "max": None}, "histogram": {"counts": []}, "groups": {}}
        >>> [c.name for c in summary_charts(s)]
        ['ssim_histogram.png', 'ssim_cdf.png']
    """
    overall = summary["ssim"]
    if not overall["count"]:
        return [Chart("ssim_histogram.png", "SSIM histogram: no ok pairs", message_figure("no ok pairs to plot")),
                Chart("ssim_cdf.png", "SSIM CDF: no ok pairs", message_figure("no ok pairs to plot"))]
    lo, hi = display_range(overall["min"], overall["max"])
    counts = dense_histogram(summary["histogram"]["counts"])
    edges, binned = rebin(counts, lo=lo, hi=hi)
    xs, ys = cdf_points(counts, lo=lo, hi=hi)
    gates = gate_thresholds(summary, per_group=False)
    charts = [
        Chart("ssim_histogram.png", f"SSIM of {overall['count']:,} ok pairs in {len(binned)} bins",
              histogram_figure(edges, binned, title="SSIM histogram, all ok pairs", thresholds=gates)),
        Chart("ssim_cdf.png", "Fraction of ok pairs below each SSIM (at 0.001 steps)",
              cdf_figure([("all", xs, ys)], title="SSIM CDF, all ok pairs", thresholds=gates)),
    ]
    charts += _group_charts(summary, lo=lo, hi=hi)
    for metric in other_metrics(summary):
        charts += metric_charts(summary, metric)
    return charts


def other_metrics(summary: Mapping[str, Any]) -> List[str]:
    """The metrics besides SSIM the run computed (the metric block's `metrics`) that the summary has blocks for.

    Example:
        >>> other_metrics({"metric": {"metrics": ["ssim", "ms_ssim"]}, "ms_ssim": {}})
        ['ms_ssim']
    """
    chosen = (summary.get("metric") or {}).get("metrics") or ["ssim"]
    return [m for m in chosen if m != "ssim" and m in summary]


def metric_charts(summary: Mapping[str, Any], metric: str) -> List[Chart]:
    """The figures of one metric besides SSIM: histogram and CDF of its finite values, and the groups'
    percentile ranges (the `plotted_groups` with a value); file names <metric>_histogram.png,
    <metric>_cdf.png, <metric>_groups_box.png.

    Example:
        >>> s = {"psnr": {"count": 0, "min": None, "max": None, "histogram": {"counts": []}}, "groups": {}}
        >>> [c.name for c in metric_charts(s, "psnr")]
        ['psnr_histogram.png', 'psnr_cdf.png']
    """
    block, label = summary[metric], METRIC_LABELS[metric]
    xlabel = label + METRIC_UNITS[metric]
    if not block["count"]:
        empty = message_figure(f"no finite {label} value to plot")
        return [Chart(f"{metric}_histogram.png", f"{label} histogram: no finite value", empty),
                Chart(f"{metric}_cdf.png", f"{label} CDF: no finite value", message_figure("nothing to plot"))]
    lo, hi = display_range(block["min"], block["max"], metric)
    counts = dense_histogram(block["histogram"]["counts"], metric)
    edges, binned = rebin(counts, lo=lo, hi=hi, metric=metric)
    xs, ys = cdf_points(counts, lo=lo, hi=hi, metric=metric)
    gates = metric_gate_thresholds(summary, metric, per_group=False)
    charts = [
        Chart(f"{metric}_histogram.png", f"{label} of {block['count']:,} ok pairs with a finite value, "
              f"{len(binned)} bins", histogram_figure(edges, binned, title=f"{label} histogram", thresholds=gates,
                                                      xlabel=xlabel)),
        Chart(f"{metric}_cdf.png", f"Fraction of those pairs below each {label}",
              cdf_figure([("all", xs, ys)], title=f"{label} CDF", thresholds=gates, xlabel=xlabel)),
    ]
    groups, by = summary.get("groups") or {}, summary.get("group_by")
    names = [g for g in plotted_groups(summary) if groups[g][metric]["count"]]
    if names:
        charts.append(Chart(f"{metric}_groups_box.png", f"{label} percentiles of each {by}",
                            percentile_figure(groups, names, by=by, metric=metric,
                                              thresholds=metric_gate_thresholds(summary, metric, per_group=True))))
    return charts


def metric_gate_thresholds(summary: Mapping[str, Any], metric: str, *, per_group: bool) -> Tuple[float, ...]:
    """The thresholds of `metric`'s gates the summary was merged with (`audit.min_psnr`, `audit.group_min_psnr`...).

    Example:
        >>> metric_gate_thresholds({"audit": {"min_psnr": 30.0}}, "psnr", per_group=False)
        (30.0,)
    """
    value = (summary.get("audit") or {}).get(f"{'group_' if per_group else ''}min_{metric}")
    return () if value is None else (float(value),)


def _group_charts(summary: Mapping[str, Any], *, lo: float, hi: float) -> List[Chart]:
    names = plotted_groups(summary)
    if not names:
        return []
    groups, by = summary["groups"], summary.get("group_by")
    gates = gate_thresholds(summary, per_group=True)
    colors = colormaps[GROUP_COLORS]
    series, histograms = [], []
    for index, name in enumerate(names):
        counts = dense_histogram(groups[name]["histogram"]["counts"])
        series.append((name[:30], *cdf_points(counts, lo=lo, hi=hi)))
        edges, binned = rebin(counts, lo=lo, hi=hi)
        figure = histogram_figure(edges, binned, title=f"{by} = {name}"[:60], color=colors(index % 10),
                                  thresholds=gates, size=(350, 220), legend=False)
        caption = f"{by} = {name}" + (f" (dashed: gate {gates[0]:g})" if gates else "")
        histograms.append(Chart(f"group_{index:02d}_{_slug(name)}.png", caption, figure))
    return [
        Chart("groups_box.png", f"SSIM percentiles of each {by}: where most pairs lie, and the worst one",
              percentile_figure(groups, names, by=by, thresholds=gates)),
        Chart("groups_cdf.png", f"Fraction of ok pairs below each SSIM, by {by}",
              cdf_figure(series, title=f"SSIM CDF by {by}", thresholds=gates, size=(760, 360))),
    ] + histograms


def summary_plots(summary: Mapping[str, Any]) -> List[Plot]:
    """The summary's charts encoded as PNG (what the page embeds and plots/ holds).

    Args:
        summary: summary.json.

    Returns:
        One Plot per `summary_charts` chart, in the same order.

    Example:
        >>> s = {"ssim": {"count": 0, "min": None, "max": None}, "histogram": {"counts": []}, "groups": {}}
        >>> [p.png[:4] for p in summary_plots(s)]
        [b'\\x89PNG', b'\\x89PNG']
    """
    return [render(chart) for chart in summary_charts(summary)]


# ------------------------------------------------------------------------------------------------------
# SSIM maps
# ------------------------------------------------------------------------------------------------------

def map_colors(values: np.ndarray) -> np.ndarray:
    """An SSIM map coloured with SSIM_CMAP on SSIM_NORM: bright where structure is lost (values below 0
    take the colour of 0, above 1 that of 1).

    Args:
        values: (H, W) SSIM values.

    Returns:
        (H, W, 3) uint8 RGB.

    Example:
        >>> kept, lost = map_colors(np.array([[1.0, -0.3]]))[0]
        >>> int(kept.sum()) < int(lost.sum())
        True
    """
    normalised = Normalize(*SSIM_NORM, clip=True)(np.asarray(values, dtype=np.float64))
    return colormaps[SSIM_CMAP](normalised, bytes=True)[..., :3]


def colorbar_figure(height: int) -> Figure:
    """The SSIM maps' colour bar, vertical, `height` CSS pixels tall (the height of the map beside it).

    Args:
        height: the figure's height on the page.

    Returns:
        A figure whose one axes is the colour bar of SSIM_CMAP on SSIM_NORM.

    Example:
        >>> [float(v) for v in colorbar_figure(200).axes[0].get_ylim()]
        [0.0, 1.0]
    """
    figure = new_figure(72, max(height, 120))
    mappable = ScalarMappable(Normalize(*SSIM_NORM), colormaps[SSIM_CMAP])
    figure.colorbar(mappable, cax=figure.add_subplot(), extend="min", extendfrac=0.04, label="SSIM")
    return figure


@functools.lru_cache(maxsize=16)
def colorbar_plot(height: int) -> Plot:
    """`colorbar_figure(height)` encoded (cached: the k panels of a report share a few heights).

    Example:
        >>> colorbar_plot(200).height
        200
    """
    return render(Chart("ssim_colorbar.png", "SSIM colour scale", colorbar_figure(height)))
