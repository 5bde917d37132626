"""The statistical part of summary.json: exact percentiles, below-threshold counts for the gates, and the
blocks of counts, moments and histograms, overall and per group.

Percentiles are not mergeable, so the merge keeps every ok score of the run (`ScoreCollector`: 12 bytes per
ok row, no Python object per row) and computes them exactly at the end; the other numbers come from the
merged `stats.ShardStats`.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa

from ssim_ray.output.stats import HIST_BINS, HIST_RANGE, Moments, ShardStats
from ssim_ray.output.table_stats import group_keys, ok_scores, status_codes, value_codes

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def percentiles_of(values: np.ndarray) -> Dict[str, Optional[float]]:
    """Exact percentiles PERCENTILES of scores, numpy's 'linear' method (R type 7).

    Example:
        >>> percentiles_of(np.array([0.0, 1.0]))["p50"]
        0.5
    """
    if values.size == 0:
        return {f"p{q}": None for q in PERCENTILES}
    found = np.percentile(values, PERCENTILES, method="linear")
    return {f"p{q}": float(v) for q, v in zip(PERCENTILES, found)}


class ScoreCollector:
    """The ok scores of a merge, with each score's group, for exact percentiles and below-threshold counts.

    Memory: 8 bytes per ok row for the score plus 4 per ok row for its group code (preallocated to
    `capacity` rows, an upper bound such as the total row count). No Python object per row.

    Example:
        >>> collector = ScoreCollector(capacity=2, group_by=None)
        >>> collector.add(pa.table({"pair_id": ["a", "b"], "ssim": [0.25, 0.75], "status": ["ok", "ok"]}))
        >>> collector.overall_percentiles()["p50"], collector.below(0.5)["count"]
        (0.5, 1)
    """

    def __init__(self, *, capacity: int, group_by: Optional[str]) -> None:
        self.group_by = group_by
        self._scores = np.empty(capacity, dtype=np.float64)
        self._codes = np.empty(capacity if group_by else 0, dtype=np.int32)
        self._group_index: Dict[str, int] = {}
        self._size = 0

    def add(self, table: pa.Table) -> None:
        """Append the ok rows of a results table.

        Raises:
            ValueError: more ok rows than the capacity given, or an ok row without a finite score.
        """
        ok = status_codes(table)[2]
        scores = ok_scores(table, ok)
        end = self._size + scores.size
        if end > self._scores.size:
            raise ValueError(f"ScoreCollector capacity is {self._scores.size} rows, got {end} ok rows")
        self._scores[self._size:end] = scores
        if self.group_by:
            local_codes, names = value_codes(group_keys(table, self.group_by))
            to_global = np.array([self._group_index.setdefault(n, len(self._group_index)) for n in names],
                                 dtype=np.int32)
            self._codes[self._size:end] = to_global[local_codes[ok]] if names else []
        self._size = end

    def overall_percentiles(self) -> Dict[str, Optional[float]]:
        """Percentiles of every ok score added."""
        return percentiles_of(self._scores[: self._size])

    def group_percentiles(self) -> Dict[str, Dict[str, Optional[float]]]:
        """Percentiles per group: one stable sort by group code, then each group's contiguous run."""
        codes = self._codes[: self._size]
        order = np.argsort(codes, kind="stable")
        sorted_codes = codes[order]
        result = {}
        for name, code in self._group_index.items():
            lo, hi = np.searchsorted(sorted_codes, [code, code + 1])
            result[name] = percentiles_of(self._scores[order[lo:hi]])
        return dict(sorted(result.items()))

    def below(self, threshold: float) -> Dict[str, Any]:
        """How many ok scores are strictly below `threshold`, overall and per group (for quality gates)."""
        scores, codes = self._scores[: self._size], self._codes[: self._size]
        under = scores < threshold
        entry: Dict[str, Any] = _fraction(int(np.count_nonzero(under)), int(scores.size))
        entry["threshold"] = float(threshold)
        if self.group_by:
            names = list(self._group_index)
            under_counts = np.bincount(codes[under], minlength=len(names))
            totals = np.bincount(codes, minlength=len(names))
            entry["groups"] = {name: _fraction(int(under_counts[i]), int(totals[i]))
                               for name, i in sorted(self._group_index.items())}
        return entry


def _fraction(count: int, ok: int) -> Dict[str, Any]:
    return {"count": count, "ok": ok, "fraction": count / ok if ok else None}


def _ssim_block(moments: Moments, percentiles: Mapping[str, Optional[float]]) -> Dict[str, Any]:
    return {
        "count": moments.count,
        "mean": moments.mean if moments.count else None,
        "std": moments.std,
        "min": moments.min if moments.count else None,
        "max": moments.max if moments.count else None,
        "percentiles": dict(percentiles),
    }


def _histogram_block(moments: Moments) -> Dict[str, Any]:
    nonzero = np.flatnonzero(moments.hist)
    return {"range": list(HIST_RANGE), "bins": HIST_BINS,
            "counts": [[int(i), int(moments.hist[i])] for i in nonzero]}


def summary_statistics(stats: ShardStats, collector: ScoreCollector, *,
                       thresholds: Sequence[float] = ()) -> Dict[str, Any]:
    """The statistical part of summary.json, from merged statistics and the collected scores.

    Args:
        stats: the run's merged statistics.
        collector: the run's ok scores, for exact percentiles and below-threshold counts.
        thresholds: the gates' thresholds (`audit.min_ssim`, `audit.group_min_ssim`) to count below.

    Returns:
        A dict with `status_counts`, `ssim` (count, mean, std (population), min, max, percentiles p1..p99),
        `histogram` (sparse [bin, count] pairs over HIST_BINS bins on [-1, 1]), `groups` (the same per group,
        with `rows` and `failures`), `worst`, `failure_examples`, and `below`: for each threshold, the
        count, ok count and fraction of ok scores strictly below it, overall and per group.

    Example:
        >>> from ssim_ray.output.stats import empty_stats
        >>> s = empty_stats(group_by=None, worst_k=1, examples_per_status=1)
        >>> summary_statistics(s, ScoreCollector(capacity=0, group_by=None))["ssim"]["count"]
        0
    """
    group_pct = collector.group_percentiles() if stats.group_by else {}
    groups = {
        name: {
            "rows": g.rows,
            "failures": g.failures,
            "status_counts": g.status_counts,
            "ssim": _ssim_block(g.moments, group_pct.get(name, percentiles_of(np.empty(0)))),
            "histogram": _histogram_block(g.moments),
        }
        for name, g in stats.groups.items()
    }
    return {
        "status_counts": stats.overall.status_counts,
        "ssim": _ssim_block(stats.overall.moments, collector.overall_percentiles()),
        "histogram": _histogram_block(stats.overall.moments),
        "group_by": stats.group_by,
        "groups": groups,
        "worst_k": stats.worst_k,
        "worst": [vars(p) for p in stats.worst],
        "failure_examples": {s: [vars(e) for e in rows] for s, rows in stats.failure_examples.items()},
        "below": [collector.below(t) for t in sorted(set(thresholds))],
    }
