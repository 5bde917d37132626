"""Histogram arithmetic on the summary's fixed bins: dense counts, a display range, re-binning, CDF points.

summary.json keeps every score distribution as HIST_BINS fixed bins on [-1, 1] (ssim_ray.output.stats), so
the report draws histograms and CDFs of any number of pairs from a few kilobytes, without reading rows.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np

from ssim_ray.output.stats import HIST_BINS, HIST_RANGE

DISPLAY_BINS = 50


def dense_histogram(sparse_counts: Sequence[Sequence[int]]) -> np.ndarray:
    """The HIST_BINS counts from the summary's sparse [bin, count] pairs.

    Args:
        sparse_counts: the summary's `histogram.counts` (non-empty bins only).

    Returns:
        An int64 array of HIST_BINS counts.

    Example:
        >>> int(dense_histogram([[1999, 4]])[-1])
        4
    """
    counts = np.zeros(HIST_BINS, dtype=np.int64)
    for index, count in sparse_counts:
        counts[index] = count
    return counts


def display_range(low: Optional[float], high: Optional[float]) -> Tuple[float, float]:
    """A plotting range on [-1, 1] that holds [low, high], on 0.05 steps (so fine bins align).

    Args:
        low: the smallest score (None: no scores).
        high: the largest score.

    Returns:
        (lo, hi), with lo < hi.

    Example:
        >>> display_range(0.612, 0.9991)
        (0.6, 1.0)
    """
    if low is None or high is None:
        return 0.0, 1.0
    lo = max(HIST_RANGE[0], math.floor(low * 20) / 20)
    hi = min(HIST_RANGE[1], math.ceil(high * 20) / 20)
    return (lo, hi) if hi > lo else (max(HIST_RANGE[0], hi - 0.05), hi)


def _fine_index(value: float) -> int:
    width = (HIST_RANGE[1] - HIST_RANGE[0]) / HIST_BINS
    return int(round((value - HIST_RANGE[0]) / width))


def rebin(counts: np.ndarray, *, lo: float, hi: float, bins: int = DISPLAY_BINS) -> Tuple[np.ndarray, np.ndarray]:
    """Sum the fine bins inside [lo, hi] into at most `bins` display bins of whole fine bins.

    Fine bins below `lo` are added to the first display bin and above `hi` to the last, so the display
    counts always add up to the total.

    Args:
        counts: the HIST_BINS fine counts.
        lo: left end of the display range (a fine-bin edge, e.g. from `display_range`).
        hi: right end.
        bins: at most this many display bins.

    Returns:
        (edges, counts): display bin edges (len n+1) and counts (len n).

    Example:
        >>> edges, sums = rebin(dense_histogram([[1850, 2], [1999, 1]]), lo=0.8, hi=1.0, bins=2)
        >>> sums.tolist()
        [2, 1]
    """
    first, last = _fine_index(lo), _fine_index(hi)
    step = max(1, math.ceil((last - first) / bins))
    starts = np.arange(first, last, step)
    sums = np.add.reduceat(counts[first:last], starts - first) if last > first else np.zeros(0, np.int64)
    if sums.size:
        sums[0] += counts[:first].sum()
        sums[-1] += counts[last:].sum()
    width = (HIST_RANGE[1] - HIST_RANGE[0]) / HIST_BINS
    edges = HIST_RANGE[0] + width * np.append(starts, min(last, starts[-1] + step) if starts.size else first)
    return edges, sums


def cdf_points(counts: np.ndarray, *, lo: float, hi: float) -> Tuple[np.ndarray, np.ndarray]:
    """The empirical CDF at the fine bin edges in [lo, hi]: fraction of scores below each edge.

    Args:
        counts: the HIST_BINS fine counts.
        lo: first edge.
        hi: last edge.

    Returns:
        (edges, fractions), both of length (hi - lo) / bin width + 1.

    Example:
        >>> xs, ys = cdf_points(dense_histogram([[1990, 1], [1999, 1]]), lo=0.95, hi=1.0)
        >>> float(ys[-1]), len(xs)
        (1.0, 51)
    """
    total = counts.sum()
    cumulative = np.concatenate([[0], np.cumsum(counts)]) / (total if total else 1)
    first, last = _fine_index(lo), _fine_index(hi)
    width = (HIST_RANGE[1] - HIST_RANGE[0]) / HIST_BINS
    indices = np.arange(first, last + 1)
    return HIST_RANGE[0] + width * indices, cumulative[indices]
