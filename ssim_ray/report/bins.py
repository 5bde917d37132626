"""Histogram arithmetic on the summary's fixed bins: dense counts, a display range, re-binning, CDF points.

summary.json keeps every score distribution as fixed bins (ssim_ray.output.stats: SSIM HIST_BINS bins on
[-1, 1], each other metric its layout in HISTOGRAMS), so the report draws histograms and CDFs of any number
of pairs from a few kilobytes, without reading rows. Every function takes the metric (default SSIM).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np

from ssim_ray.output.stats import HISTOGRAMS

DISPLAY_BINS = 50
# Display ranges snap to these steps (whole fine bins): 0.05 in SSIM and MS-SSIM, 1 dB in PSNR.
DISPLAY_STEP = {"ssim": 0.05, "psnr": 1.0, "ms_ssim": 0.05}


def _bin_width(metric: str) -> float:
    layout = HISTOGRAMS[metric]
    return (layout.high - layout.low) / layout.bins


def dense_histogram(sparse_counts: Sequence[Sequence[int]], metric: str = "ssim") -> np.ndarray:
    """The metric's fine-bin counts from the summary's sparse [bin, count] pairs.

    Args:
        sparse_counts: the summary's `histogram.counts` (non-empty bins only).
        metric: whose histogram layout (`HISTOGRAMS`).

    Returns:
        An int64 array of the layout's bin count.

    Example:
        >>> int(dense_histogram([[1999, 4]])[-1])
        4
    """
    counts = np.zeros(HISTOGRAMS[metric].bins, dtype=np.int64)
    for index, count in sparse_counts:
        counts[index] = count
    return counts


def display_range(low: Optional[float], high: Optional[float], metric: str = "ssim") -> Tuple[float, float]:
    """A plotting range within the metric's bins that holds [low, high], on DISPLAY_STEP steps (so fine bins
    align): [-1, 1] in 0.05 for SSIM.

    Args:
        low: the smallest score (None: no scores).
        high: the largest score.
        metric: whose bins and step.

    Returns:
        (lo, hi), with lo < hi.

    Example:
        >>> display_range(0.612, 0.9991), display_range(27.3, 41.02, "psnr")
        ((0.6, 1.0), (27.0, 42.0))
    """
    layout, step = HISTOGRAMS[metric], DISPLAY_STEP[metric]
    if low is None or high is None:
        return (0.0, 1.0) if metric != "psnr" else (layout.low, layout.high)
    lo = max(layout.low, math.floor(round(low / step, 9)) * step)
    hi = min(layout.high, math.ceil(round(high / step, 9)) * step)
    lo, hi = round(lo, 9), round(hi, 9)
    return (lo, hi) if hi > lo else (max(layout.low, round(hi - step, 9)), hi)


def _fine_index(value: float, metric: str = "ssim") -> int:
    return int(round((value - HISTOGRAMS[metric].low) / _bin_width(metric)))


def rebin(counts: np.ndarray, *, lo: float, hi: float, bins: int = DISPLAY_BINS,
          metric: str = "ssim") -> Tuple[np.ndarray, np.ndarray]:
    """Sum the fine bins inside [lo, hi] into at most `bins` display bins of whole fine bins.

    Fine bins below `lo` are added to the first display bin and above `hi` to the last, so the display
    counts always add up to the total.

    Args:
        counts: the metric's fine counts.
        lo: left end of the display range (a fine-bin edge, e.g. from `display_range`).
        hi: right end.
        bins: at most this many display bins.
        metric: whose bins.

    Returns:
        (edges, counts): display bin edges (len n+1) and counts (len n).

    Example:
        >>> edges, sums = rebin(dense_histogram([[1850, 2], [1999, 1]]), lo=0.8, hi=1.0, bins=2)
        >>> sums.tolist()
        [2, 1]
    """
    first, last = _fine_index(lo, metric), _fine_index(hi, metric)
    step = max(1, math.ceil((last - first) / bins))
    starts = np.arange(first, last, step)
    sums = np.add.reduceat(counts[first:last], starts - first) if last > first else np.zeros(0, np.int64)
    if sums.size:
        sums[0] += counts[:first].sum()
        sums[-1] += counts[last:].sum()
    edges = HISTOGRAMS[metric].low + _bin_width(metric) * np.append(
        starts, min(last, starts[-1] + step) if starts.size else first)
    return edges, sums


def cdf_points(counts: np.ndarray, *, lo: float, hi: float, metric: str = "ssim") -> Tuple[np.ndarray, np.ndarray]:
    """The empirical CDF at the fine bin edges in [lo, hi]: fraction of scores below each edge.

    Args:
        counts: the metric's fine counts.
        lo: first edge.
        hi: last edge.
        metric: whose bins.

    Returns:
        (edges, fractions), both of length (hi - lo) / bin width + 1.

    Example:
        >>> xs, ys = cdf_points(dense_histogram([[1990, 1], [1999, 1]]), lo=0.95, hi=1.0)
        >>> float(ys[-1]), len(xs)
        (1.0, 51)
    """
    total = counts.sum()
    cumulative = np.concatenate([[0], np.cumsum(counts)]) / (total if total else 1)
    first, last = _fine_index(lo, metric), _fine_index(hi, metric)
    indices = np.arange(first, last + 1)
    return HISTOGRAMS[metric].low + _bin_width(metric) * indices, cumulative[indices]
