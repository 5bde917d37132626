"""Mergeable statistics of SSIM results: the types, their sum, and their JSON form in a commit marker.

Statistics of two disjoint sets of rows combine into those of their union by a sum (`merge_stats`), so a
run's statistics are the sum of its shards'. The merge computes each part's statistics from the part itself,
after checking its sha256 against its marker, and sums them in plan order; markers carry the same statistics
(`stats_to_json`) as a record of the shard. Everything here is exact under merging except the order of
floating-point additions, which is fixed (plan order), so a merge is deterministic:

- counts by status, overall and per group;
- SSIM moments of ok rows as (count, mean, M2) merged with Chan et al.'s pairwise update rather than
  (sum, sum of squares): SSIM clusters near 1 with a small spread, where sum-of-squares minus squared-sum
  cancels catastrophically;
- min and max;
- a fixed-bin histogram on [-1, 1] (`HIST_BINS` bins of width 2/HIST_BINS; values outside the range, which
  a fused kernel may produce by a few ulps, land in the end bins);
- for PSNR and MS-SSIM (`MetricStats`, per group too): the same moments and min/max of their finite values
  with a histogram of fixed bins of their own (`HISTOGRAMS`: PSNR 0.05 dB on [0, 120], MS-SSIM on [0, 1]),
  the +inf values (PSNR of identical images) counted apart and never in a mean, and the ok rows without a
  value counted by reason (MS-SSIM `too_small`, `nonpositive_term`);
- the k worst ok pairs, ties broken by pair_id so the result does not depend on shard order;
- the first few failure examples per status, in plan order.

Computing them from a results table is `table_stats`; exact percentiles, which are not mergeable, and the
summary's statistics are `summary_stats`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from ssim_ray import statuses

HIST_BINS = 2000
HIST_RANGE = (-1.0, 1.0)
# The metrics besides SSIM whose statistics are kept (`config.METRIC_NAMES`; SSIM's are `GroupStats.moments`).
OTHER_METRICS = ("psnr", "ms_ssim")


@dataclass(frozen=True)
class HistogramLayout:
    """Fixed bins of one metric: `bins` bins of equal width on [low, high]; values outside land in the end bins."""

    low: float
    high: float
    bins: int

    def as_json(self) -> List[float]:
        return [self.low, self.high, self.bins]


# SSIM on [-1, 1]; PSNR in 0.05 dB bins up to 120 dB (a one-level error in one pixel of a 1000x1000 8-bit
# image is 108 dB; exact min and max are kept beside the bins); MS-SSIM on [0, 1], where its values lie.
HISTOGRAMS = {
    "ssim": HistogramLayout(HIST_RANGE[0], HIST_RANGE[1], HIST_BINS),
    "psnr": HistogramLayout(0.0, 120.0, 2400),
    "ms_ssim": HistogramLayout(0.0, 1.0, 2000),
}


@dataclass
class Moments:
    """Count, mean, M2 (sum of squared deviations), min, max and histogram of a set of SSIM scores."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    hist: np.ndarray = field(default_factory=lambda: np.zeros(HIST_BINS, dtype=np.int64))

    @classmethod
    def empty(cls, metric: str = "ssim") -> "Moments":
        """The moments of no values, with the metric's histogram layout."""
        return cls(hist=np.zeros(HISTOGRAMS[metric].bins, dtype=np.int64))

    @property
    def std(self) -> Optional[float]:
        """Population standard deviation (ddof=0), None when there are no scores."""
        return math.sqrt(self.m2 / self.count) if self.count else None


def moments_of(values: np.ndarray, metric: str = "ssim") -> Moments:
    """Moments of a float64 array of scores (finite, already filtered to ok rows).

    Args:
        values: 1-D float64 array.
        metric: whose histogram layout to use (`HISTOGRAMS`).

    Returns:
        The Moments of `values`.

    Example:
        >>> moments_of(np.array([0.5, 0.7])).mean
        0.6
    """
    if values.size == 0:
        return Moments.empty(metric)
    mean = float(values.mean())
    return Moments(
        count=int(values.size),
        mean=mean,
        m2=float(((values - mean) ** 2).sum()),
        min=float(values.min()),
        max=float(values.max()),
        hist=histogram_counts(values, metric),
    )


def histogram_counts(values: np.ndarray, metric: str = "ssim") -> np.ndarray:
    """Counts of `values` in the metric's fixed bins (SSIM: on [-1, 1]; bin i is [-1 + i*w, -1 + (i+1)*w),
    1.0 in the last); values outside the range land in the end bins.

    Example:
        >>> int(histogram_counts(np.array([1.0, 0.99999]))[-1]), int(histogram_counts(np.array([130.0]), "psnr")[-1])
        (2, 1)
    """
    layout = HISTOGRAMS[metric]
    lo, hi, bins = layout.low, layout.high, layout.bins
    index = np.floor((values - lo) / (hi - lo) * bins).astype(np.int64)
    return np.bincount(np.clip(index, 0, bins - 1), minlength=bins).astype(np.int64)


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Combine two Moments as if computed over the union of their scores (Chan et al. 1979).

    Example:
        >>> merge_moments(moments_of(np.array([0.0])), moments_of(np.array([1.0]))).std
        0.5
    """
    if b.count == 0:
        return Moments(a.count, a.mean, a.m2, a.min, a.max, a.hist.copy())
    if a.count == 0:
        return Moments(b.count, b.mean, b.m2, b.min, b.max, b.hist.copy())
    count = a.count + b.count
    delta = b.mean - a.mean
    return Moments(
        count=count,
        mean=a.mean + delta * b.count / count,
        m2=a.m2 + b.m2 + delta * delta * a.count * b.count / count,
        min=min(a.min, b.min),
        max=max(a.max, b.max),
        hist=a.hist + b.hist,
    )


@dataclass
class MetricStats:
    """One metric's values over ok rows (PSNR, MS-SSIM): moments of the finite ones, +inf apart, none by reason.

    moments: count, mean, M2, min, max and histogram of the finite values.
    infinite: values of +inf (PSNR of identical images), never in a mean.
    undefined: ok rows without a value, by reason (MS-SSIM's `too_small`, `nonpositive_term`).
    """

    moments: Moments
    infinite: int = 0
    undefined: Dict[str, int] = field(default_factory=dict)


def empty_metric_stats(metric: str) -> MetricStats:
    """No values of `metric`.

    Example:
        >>> empty_metric_stats("psnr").moments.hist.size
        2400
    """
    return MetricStats(Moments.empty(metric))


def metric_stats_of(metric: str, values: np.ndarray, reasons: Sequence[Optional[str]] = ()) -> MetricStats:
    """The MetricStats of ok rows' values (NaN: no value) and the reasons of those without one.

    Args:
        metric: its name (the histogram layout).
        values: float64 values of the ok rows, NaN where the row has none; +inf counted apart.
        reasons: the reason of each row without a value (None entries ignored).

    Raises:
        ValueError: a value of -inf (no metric has one).

    Example:
        >>> m = metric_stats_of("psnr", np.array([30.0, np.inf, 40.0]))
        >>> m.moments.mean, m.infinite
        (35.0, 1)
    """
    if np.any(np.isneginf(values)):
        raise ValueError(f"{metric} values must not be -inf, got {int(np.isneginf(values).sum())}")
    undefined: Dict[str, int] = {}
    for reason in reasons:
        if reason is not None:
            undefined[reason] = undefined.get(reason, 0) + 1
    finite = values[np.isfinite(values)]
    return MetricStats(moments_of(finite, metric), int(np.isposinf(values).sum()), dict(sorted(undefined.items())))


def merge_metric_stats(a: MetricStats, b: MetricStats) -> MetricStats:
    """Sum of two MetricStats of one metric.

    Example:
        >>> merge_metric_stats(MetricStats(Moments(), 1, {"too_small": 1}), MetricStats(Moments(), 2)).infinite
        3
    """
    undefined = dict(a.undefined)
    for reason, n in b.undefined.items():
        undefined[reason] = undefined.get(reason, 0) + n
    return MetricStats(merge_moments(a.moments, b.moments), a.infinite + b.infinite, dict(sorted(undefined.items())))


def _empty_scores() -> Dict[str, MetricStats]:
    return {metric: empty_metric_stats(metric) for metric in OTHER_METRICS}


@dataclass
class GroupStats:
    """Statistics of one population of rows: counts by status, the moments of its ok SSIM scores, and the
    statistics of its other metrics (`scores`, by name: OTHER_METRICS)."""

    status_counts: Dict[str, int] = field(default_factory=dict)
    moments: Moments = field(default_factory=Moments)
    scores: Dict[str, MetricStats] = field(default_factory=_empty_scores)

    @property
    def rows(self) -> int:
        return sum(self.status_counts.values())

    @property
    def failures(self) -> int:
        """Rows whose status is not `ok`."""
        return self.rows - self.status_counts.get(statuses.OK, 0)


def merge_group_stats(a: GroupStats, b: GroupStats) -> GroupStats:
    """Sum of two GroupStats.

    Example:
        >>> merge_group_stats(GroupStats({"ok": 1}), GroupStats({"ok": 2, "missing": 1})).status_counts
        {'missing': 1, 'ok': 3}
    """
    counts = dict(a.status_counts)
    for status, n in b.status_counts.items():
        counts[status] = counts.get(status, 0) + n
    scores = {metric: merge_metric_stats(a.scores[metric], b.scores[metric]) for metric in OTHER_METRICS}
    return GroupStats(dict(sorted(counts.items())), merge_moments(a.moments, b.moments), scores)


@dataclass(frozen=True)
class WorstPair:
    """One of the k lowest-scoring ok pairs."""

    pair_id: str
    ssim: float
    reference: Optional[str]
    distorted: Optional[str]
    group: Optional[str]
    shard_id: Optional[str]


@dataclass(frozen=True)
class FailureExample:
    """A row that is not ok, kept as an example of its status."""

    pair_id: str
    status: str
    error: Optional[str]
    reference: Optional[str]
    distorted: Optional[str]
    shard_id: Optional[str]


@dataclass
class ShardStats:
    """Mergeable statistics of a set of result rows (a shard, or a whole run after merging).

    group_by, worst_k and examples_per_status are the settings the statistics were computed with; two
    ShardStats merge only when they agree.
    """

    group_by: Optional[str]
    worst_k: int
    examples_per_status: int
    overall: GroupStats = field(default_factory=GroupStats)
    groups: Dict[str, GroupStats] = field(default_factory=dict)
    worst: List[WorstPair] = field(default_factory=list)
    failure_examples: Dict[str, List[FailureExample]] = field(default_factory=dict)

    def settings(self) -> tuple:
        return (self.group_by, self.worst_k, self.examples_per_status)


def empty_stats(*, group_by: Optional[str], worst_k: int, examples_per_status: int) -> ShardStats:
    """The statistics of no rows: the identity of `merge_stats`.

    Example:
        >>> empty_stats(group_by=None, worst_k=5, examples_per_status=3).overall.rows
        0
    """
    return ShardStats(group_by=group_by, worst_k=worst_k, examples_per_status=examples_per_status)


def merge_stats(a: ShardStats, b: ShardStats) -> ShardStats:
    """Combine the statistics of two disjoint sets of rows; `a`'s rows come first in plan order.

    Args:
        a: statistics of the earlier rows.
        b: statistics of the later rows.

    Returns:
        The statistics of both sets.

    Raises:
        ValueError: the two were computed with different group_by / worst_k / examples_per_status.

    Example:
        >>> s = empty_stats(group_by=None, worst_k=5, examples_per_status=3)
        >>> merge_stats(s, s).overall.rows
        0
    """
    if a.settings() != b.settings():
        raise ValueError(
            "cannot merge statistics computed with different (group_by, worst_k, examples_per_status): "
            f"expected {a.settings()}, got {b.settings()}"
        )
    groups = dict(a.groups)
    for key, value in b.groups.items():
        groups[key] = merge_group_stats(groups[key], value) if key in groups else value
    examples = {status: list(rows) for status, rows in a.failure_examples.items()}
    for status, rows in b.failure_examples.items():
        kept = examples.setdefault(status, [])
        kept.extend(rows[: max(0, a.examples_per_status - len(kept))])
    return ShardStats(
        group_by=a.group_by,
        worst_k=a.worst_k,
        examples_per_status=a.examples_per_status,
        overall=merge_group_stats(a.overall, b.overall),
        groups=dict(sorted(groups.items())),
        worst=k_worst(a.worst + b.worst, a.worst_k),
        failure_examples=dict(sorted(examples.items())),
    )


def k_worst(pairs: Sequence[WorstPair], k: int) -> List[WorstPair]:
    """The `k` lowest-scoring pairs, ties broken by pair_id (so the order of shards does not matter).

    Example:
        >>> pairs = [WorstPair(p, s, None, None, None, None) for p, s in (("b", 0.2), ("a", 0.2), ("c", 0.1))]
        >>> [p.pair_id for p in k_worst(pairs, 2)]
        ['c', 'a']
    """
    return sorted(pairs, key=lambda p: (p.ssim, p.pair_id))[:k]


def _moments_to_json(m: Moments) -> Dict[str, Any]:
    nonzero = np.flatnonzero(m.hist)
    return {
        "count": m.count,
        "mean": m.mean if m.count else None,
        "m2": m.m2,
        "min": m.min if m.count else None,
        "max": m.max if m.count else None,
        "hist": [[int(i), int(m.hist[i])] for i in nonzero],
    }


def _moments_from_json(d: Mapping[str, Any], metric: str = "ssim") -> Moments:
    hist = np.zeros(HISTOGRAMS[metric].bins, dtype=np.int64)
    for index, count in d["hist"]:
        hist[index] = count
    if not d["count"]:
        return Moments(hist=hist)
    return Moments(d["count"], d["mean"], d["m2"], d["min"], d["max"], hist)


def _group_to_json(g: GroupStats) -> Dict[str, Any]:
    scores = {metric: {"moments": _moments_to_json(m.moments), "infinite": m.infinite, "undefined": m.undefined}
              for metric, m in g.scores.items()}
    return {"status_counts": g.status_counts, "moments": _moments_to_json(g.moments), "scores": scores}


def _group_from_json(d: Mapping[str, Any]) -> GroupStats:
    scores = _empty_scores()  # markers written before PSNR and MS-SSIM were kept have none
    for metric, m in (d.get("scores") or {}).items():
        scores[metric] = MetricStats(_moments_from_json(m["moments"], metric), m["infinite"], dict(m["undefined"]))
    return GroupStats(dict(d["status_counts"]), _moments_from_json(d["moments"]), scores)


def stats_to_json(stats: ShardStats) -> Dict[str, Any]:
    """A JSON-serialisable dict of `stats` (the histogram stored sparsely as [bin, count] pairs).

    Example:
        >>> stats_to_json(empty_stats(group_by=None, worst_k=1, examples_per_status=1))["worst"]
        []
    """
    return {
        "group_by": stats.group_by,
        "worst_k": stats.worst_k,
        "examples_per_status": stats.examples_per_status,
        "hist_bins": HIST_BINS,
        "histograms": {metric: layout.as_json() for metric, layout in HISTOGRAMS.items()},
        "overall": _group_to_json(stats.overall),
        "groups": {key: _group_to_json(value) for key, value in stats.groups.items()},
        "worst": [vars(p) for p in stats.worst],
        "failure_examples": {s: [vars(e) for e in rows] for s, rows in stats.failure_examples.items()},
    }


def stats_from_json(d: Mapping[str, Any]) -> ShardStats:
    """Inverse of `stats_to_json`.

    Raises:
        ValueError: the dict was written with a different histogram layout.

    Example:
        >>> s = empty_stats(group_by="codec", worst_k=3, examples_per_status=2)
        >>> stats_from_json(stats_to_json(s)).settings()
        ('codec', 3, 2)
    """
    if d.get("hist_bins") != HIST_BINS:
        raise ValueError(f"statistics must use {HIST_BINS} histogram bins, got {d.get('hist_bins')!r}")
    layouts = {metric: layout.as_json() for metric, layout in HISTOGRAMS.items()}
    if "histograms" in d and d["histograms"] != layouts:
        raise ValueError(f"statistics must use the histogram layouts {layouts}, got {d['histograms']!r}")
    return ShardStats(
        group_by=d["group_by"],
        worst_k=d["worst_k"],
        examples_per_status=d["examples_per_status"],
        overall=_group_from_json(d["overall"]),
        groups={key: _group_from_json(value) for key, value in d["groups"].items()},
        worst=[WorstPair(**p) for p in d["worst"]],
        failure_examples={s: [FailureExample(**e) for e in rows] for s, rows in d["failure_examples"].items()},
    )
