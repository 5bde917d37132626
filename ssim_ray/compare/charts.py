"""The comparison's charts: per metric, the histogram of paired deltas and baseline vs candidate scores.

Figures are drawn like the audit report's (`report.charts.new_figure`: matplotlib figures on their own
Agg canvases, pyplot never imported) and encoded by `report.charts.render`. The histogram counts every
finite delta, read a chunk at a time (`count_deltas`); the scatter is drawn from the sample of pairs chosen
by pair_id hash, with the worst regressions marked on top so that rare ones are never lost in the sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from ssim_ray.compare.metrics import METRICS
from ssim_ray.report.charts import GATE_COLOR, MAIN_COLOR, Chart, message_figure, new_figure

# Odd, so that one bin is centred on 0: unchanged pairs fall in a bin of their own, neither worse nor better.
HISTOGRAM_BINS = 81
WORSE_COLOR, BETTER_COLOR, SAME_COLOR = GATE_COLOR, "#1b7f3b", "#8c96a3"


@dataclass(frozen=True)
class DeltaCounts:
    """Paired deltas counted in HISTOGRAM_BINS symmetric bins (edges None when there are none, or all are equal)."""

    counts: Optional[np.ndarray]
    edges: Optional[np.ndarray]
    total: int
    low: float
    high: float


def count_deltas(chunks: Iterable[np.ndarray], *, low: float, high: float, total: int) -> DeltaCounts:
    """Count finite deltas, given a chunk at a time, in bins symmetric about 0 that reach the larger of |low|,
    |high| (their minimum and maximum), so that regressions and gains sit side by side.

    Example:
        >>> found = count_deltas([np.array([-0.2, 0.0]), np.array([0.0, 0.01])], low=-0.2, high=0.01, total=4)
        >>> int(found.counts.sum()), len(found.edges)
        (4, 82)
    """
    if total == 0 or low == high:
        return DeltaCounts(None, None, total, low, high)
    reach = max(abs(low), abs(high))
    edges = np.linspace(-reach, reach, HISTOGRAM_BINS + 1)
    counts = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
    for chunk in chunks:
        counts += np.histogram(chunk, bins=edges)[0]
    return DeltaCounts(counts, edges, total, low, high)


def delta_histogram(metric: str, found: DeltaCounts, *, epsilon: float) -> Chart:
    """Pairs per delta bin, log-scaled so that a few strong regressions show beside many unchanged pairs;
    bins below −ε red, above +ε green, dashed lines at ±ε.

    Args:
        metric: the metric's name.
        found: its finite paired deltas, counted (`count_deltas`).
        epsilon: the metric's ε.

    Returns:
        The chart (a message figure when there is no delta, or every delta is exactly the same).

    Example:
        >>> values = np.array([-0.2, 0.0, 0.0, 0.01])
        >>> chart = delta_histogram("ssim", count_deltas([values], low=-0.2, high=0.01, total=4), epsilon=0.001)
        >>> chart.name, len(chart.figure.axes[0].patches)
        ('delta_ssim.png', 81)
    """
    spec = METRICS[metric]
    name = f"delta_{metric}.png"
    caption = f"{spec.label} delta (candidate − baseline) of {found.total:,} paired pairs"
    if found.total == 0:
        return Chart(name, caption, message_figure(f"no paired {spec.label} scores"))
    if found.edges is None:
        return Chart(name, caption, message_figure(f"every paired {spec.label} delta is exactly {found.low:g}"))
    edges, counts = found.edges, found.counts
    # A bin is red or green only when all of it is beyond ε: its pairs are all worse (or better) by more than ε.
    colors = np.where(edges[1:] <= -epsilon, WORSE_COLOR, np.where(edges[:-1] >= epsilon, BETTER_COLOR, SAME_COLOR))
    figure = new_figure(560, 300)
    axes = figure.add_subplot()
    axes.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=list(colors), linewidth=0)
    for x in (-epsilon, epsilon):
        axes.axvline(x, color="#444444", linestyle="--", linewidth=0.9)
    axes.set_yscale("symlog", linthresh=1)
    axes.set(title=f"{spec.label} delta per pair (dashed: ±ε = {epsilon:g}{spec.unit})",
             xlabel=f"candidate − baseline{spec.unit}", ylabel="pairs (log)")
    axes.grid(axis="y", color="#e4e4e4")
    axes.set_axisbelow(True)
    return Chart(name, caption, figure)


def _finite_limits(values: np.ndarray) -> tuple:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    pad = (high - low) * 0.04 or 0.01
    return low - pad, high + pad


def score_scatter(metric: str, points: np.ndarray, worst: Sequence[Mapping[str, Any]], *, total: int) -> Chart:
    """Candidate against baseline score, one dot per sampled pair, the worst regressions marked, y = x dashed.

    Infinite scores (PSNR of identical images) are drawn at the top or right edge, with hollow markers.

    Args:
        metric: the metric's name.
        points: (n, 2) sampled (baseline, candidate) scores.
        worst: the worst regressions (rows with `baseline` and `candidate`).
        total: how many paired pairs the sample is drawn from.

    Returns:
        The chart.

    Example:
        >>> chart = score_scatter("psnr", np.array([[30.0, 28.0], [np.inf, 40.0]]), [], total=2)
        >>> chart.name
        'scatter_psnr.png'
    """
    spec = METRICS[metric]
    name = f"scatter_{metric}.png"
    caption = f"{spec.label}: candidate against baseline for {len(points):,} of {total:,} paired pairs" + (
        f" (chosen by a hash of pair_id); red: the {len(worst)} worst regressions" if worst else "")
    if len(points) == 0:
        return Chart(name, caption, message_figure(f"no paired {spec.label} scores"))
    low, high = _finite_limits(points.ravel())
    edge = high + (high - low) * 0.03
    shown = np.where(np.isinf(points), edge, points)
    infinite = np.isinf(points).any(axis=1)
    figure = new_figure(420, 400)
    axes = figure.add_subplot()
    axes.plot([low, edge], [low, edge], color="#444444", linestyle="--", linewidth=0.9, label="no change")
    size = 6 if len(points) > 2000 else 14
    axes.scatter(shown[~infinite, 0], shown[~infinite, 1], s=size, color=MAIN_COLOR, alpha=0.35, linewidths=0,
                 label="pairs")
    if infinite.any():
        axes.scatter(shown[infinite, 0], shown[infinite, 1], s=18, facecolors="none", edgecolors=MAIN_COLOR,
                     label="+inf (identical), at the edge")
    if worst:
        marked = np.array([[w["baseline"], w["candidate"]] for w in worst], dtype=float)
        axes.scatter(marked[:, 0], marked[:, 1], s=28, marker="x", color=WORSE_COLOR, label="worst regressions")
    axes.set(xlim=(low, edge + (high - low) * 0.02), ylim=(low, edge + (high - low) * 0.02),
             xlabel=f"baseline {spec.label}{spec.unit}", ylabel=f"candidate {spec.label}{spec.unit}",
             title=f"{spec.label}: candidate vs baseline")
    axes.set_aspect("equal", adjustable="box")
    axes.grid(color="#e4e4e4")
    axes.legend(loc="upper left", frameon=False, fontsize="small")
    return Chart(name, caption, figure)


def metric_charts(metric: str, deltas: DeltaCounts, points: np.ndarray, worst: Sequence[Mapping[str, Any]], *,
                  epsilon: float, paired: int) -> List[Chart]:
    """A metric's two charts, histogram then scatter.

    Example:
        >>> none = count_deltas([], low=0.0, high=0.0, total=0)
        >>> [c.name for c in metric_charts("ssim", none, np.zeros((0, 2)), [], epsilon=0.001, paired=0)]
        ['delta_ssim.png', 'scatter_ssim.png']
    """
    return [delta_histogram(metric, deltas, epsilon=epsilon), score_scatter(metric, points, worst, total=paired)]
