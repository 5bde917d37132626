"""The statistical part of summary.json: exact percentiles, below-threshold counts for the gates, and the
blocks of counts, moments and histograms, overall and per group.

Percentiles are not mergeable, so the merge keeps every ok score of the run (`ScoreCollector`: 12 bytes per
ok row and metric, no Python object per row) and computes them exactly at the end; the other numbers come
from the merged `stats.ShardStats`. SSIM's block is `ssim` with the top-level `histogram`; PSNR's and
MS-SSIM's blocks (`psnr`, `ms_ssim`, overall and per group) carry their histogram inside, the +inf values
(`infinite`) and the ok rows without a value by reason (`undefined`), neither of them in a mean or a
percentile.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np
import pyarrow as pa

from ssim_ray.metric import NONPOSITIVE_TERM
from ssim_ray.output.stats import HISTOGRAMS, OTHER_METRICS, MetricStats, Moments, ShardStats
from ssim_ray.output.table_stats import group_keys, metric_values, ok_scores, status_codes, value_codes

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


class _Column:
    """One metric's collected values with their group codes (preallocated; filled in order)."""

    def __init__(self, capacity: int, grouped: bool) -> None:
        self.values = np.empty(capacity, dtype=np.float64)
        self.codes = np.empty(capacity if grouped else 0, dtype=np.int32)
        self.size = 0

    def add(self, values: np.ndarray, codes: Optional[np.ndarray]) -> None:
        end = self.size + values.size
        if end > self.values.size:
            raise ValueError(f"ScoreCollector capacity is {self.values.size} rows, got {end} ok rows")
        self.values[self.size:end] = values
        if codes is not None:
            self.codes[self.size:end] = codes
        self.size = end


class ScoreCollector:
    """The ok scores of a merge, with each score's group, for exact percentiles and below-threshold counts.

    SSIM: every ok row. PSNR: every ok row that has one, +inf included (never below a threshold, left out of
    percentiles). MS-SSIM: every ok row that has one, and each `nonpositive_term` row as -inf (below every
    threshold, left out of percentiles); `too_small` rows are not measured and not collected.

    Memory: 8 bytes per collected value plus 4 for its group code (preallocated to `capacity` rows per metric,
    an upper bound such as the total row count; pages of a metric the run did not compute are never touched).
    No Python object per row.

    Example:
        >>> collector = ScoreCollector(capacity=2, group_by=None)
        >>> collector.add(pa.table({"pair_id": ["a", "b"], "ssim": [0.25, 0.75], "status": ["ok", "ok"]}))
        >>> collector.overall_percentiles()["p50"], collector.below(0.5)["count"]
        (0.5, 1)
    """

    def __init__(self, *, capacity: int, group_by: Optional[str]) -> None:
        self.group_by = group_by
        self._columns = {metric: _Column(capacity, bool(group_by)) for metric in ("ssim",) + OTHER_METRICS}
        self._group_index: Dict[str, int] = {}

    def add(self, table: pa.Table) -> None:
        """Append the ok rows of a results table.

        Raises:
            ValueError: more ok rows than the capacity given, or an ok row without a finite score.
        """
        ok = status_codes(table)[2]
        codes = None
        if self.group_by:
            local_codes, names = value_codes(group_keys(table, self.group_by))
            to_global = np.array([self._group_index.setdefault(n, len(self._group_index)) for n in names],
                                 dtype=np.int32)
            codes = to_global[local_codes[ok]] if names else np.empty(0, dtype=np.int32)
        self._columns["ssim"].add(ok_scores(table, ok), codes)
        for metric in OTHER_METRICS:
            values, reasons = metric_values(table, ok, metric)
            values = np.where(reasons == NONPOSITIVE_TERM, -np.inf, values)
            kept = ~np.isnan(values)
            self._columns[metric].add(values[kept], codes[kept] if codes is not None else None)

    def _finite(self, metric: str) -> np.ndarray:
        column = self._columns[metric]
        values = column.values[: column.size]
        return values if metric == "ssim" else values[np.isfinite(values)]

    def overall_percentiles(self, metric: str = "ssim") -> Dict[str, Optional[float]]:
        """Percentiles of every finite ok value of `metric` added."""
        return percentiles_of(self._finite(metric))

    def group_percentiles(self, metric: str = "ssim") -> Dict[str, Dict[str, Optional[float]]]:
        """Percentiles per group: one stable sort by group code, then each group's contiguous run."""
        column = self._columns[metric]
        values, codes = column.values[: column.size], column.codes[: column.size]
        finite = np.isfinite(values)
        values, codes = values[finite], codes[finite]
        order = np.argsort(codes, kind="stable")
        sorted_codes = codes[order]
        result = {}
        for name, code in self._group_index.items():
            lo, hi = np.searchsorted(sorted_codes, [code, code + 1])
            result[name] = percentiles_of(values[order[lo:hi]])
        return dict(sorted(result.items()))

    def below(self, threshold: float, metric: str = "ssim") -> Dict[str, Any]:
        """How many collected values of `metric` are strictly below `threshold`, overall and per group (for
        quality gates); `ok` counts the collected values (the pairs the gate judges)."""
        column = self._columns[metric]
        scores, codes = column.values[: column.size], column.codes[: column.size]
        under = scores < threshold
        entry: Dict[str, Any] = {"metric": metric, **_fraction(int(np.count_nonzero(under)), int(scores.size))}
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


def _histogram_block(moments: Moments, metric: str = "ssim") -> Dict[str, Any]:
    nonzero = np.flatnonzero(moments.hist)
    layout = HISTOGRAMS[metric]
    return {"range": [layout.low, layout.high], "bins": layout.bins,
            "counts": [[int(i), int(moments.hist[i])] for i in nonzero]}


def _metric_block(metric: str, m: MetricStats, percentiles: Mapping[str, Optional[float]]) -> Dict[str, Any]:
    """A metric's block: count, mean, std, min, max and percentiles of its finite values, its histogram, the
    +inf values and the ok rows without a value by reason."""
    return {**_ssim_block(m.moments, percentiles), "infinite": m.infinite, "undefined": dict(m.undefined),
            "histogram": _histogram_block(m.moments, metric)}


def _thresholds_by_metric(thresholds: Union[Sequence[float], Mapping[str, Sequence[float]]]) -> Dict[str, list]:
    if isinstance(thresholds, Mapping):
        return {metric: sorted(set(values)) for metric, values in thresholds.items()}
    return {"ssim": sorted(set(thresholds))}


def summary_statistics(stats: ShardStats, collector: ScoreCollector, *,
                       thresholds: Union[Sequence[float], Mapping[str, Sequence[float]]] = ()) -> Dict[str, Any]:
    """The statistical part of summary.json, from merged statistics and the collected scores.

    Args:
        stats: the run's merged statistics.
        collector: the run's ok scores, for exact percentiles and below-threshold counts.
        thresholds: the gates' thresholds to count below: SSIM's (`audit.min_ssim`, `audit.group_min_ssim`),
            or per metric (`AuditConfig.thresholds()`: {"ssim": [...], "psnr": [...], "ms_ssim": [...]}).

    Returns:
        A dict with `status_counts`, `ssim` (count, mean, std (population), min, max, percentiles p1..p99),
        `histogram` (sparse [bin, count] pairs over HIST_BINS bins on [-1, 1]), `psnr` and `ms_ssim` (the same
        numbers of their finite values with their own `histogram`, plus `infinite` and `undefined`), `groups`
        (all of it per group, with `rows` and `failures`), `worst`, `failure_examples`, and `below`: for each
        metric and threshold, the count, ok count and fraction of its values strictly below it, overall and
        per group.

    Example:
        >>> from ssim_ray.output.stats import empty_stats
        >>> s = empty_stats(group_by=None, worst_k=1, examples_per_status=1)
        >>> summary_statistics(s, ScoreCollector(capacity=0, group_by=None))["ssim"]["count"]
        0
    """
    none = percentiles_of(np.empty(0))
    group_pct = {metric: collector.group_percentiles(metric) if stats.group_by else {}
                 for metric in ("ssim",) + OTHER_METRICS}
    groups = {
        name: {
            "rows": g.rows,
            "failures": g.failures,
            "status_counts": g.status_counts,
            "ssim": _ssim_block(g.moments, group_pct["ssim"].get(name, none)),
            "histogram": _histogram_block(g.moments),
            **{metric: _metric_block(metric, g.scores[metric], group_pct[metric].get(name, none))
               for metric in OTHER_METRICS},
        }
        for name, g in stats.groups.items()
    }
    below = [collector.below(t, metric) for metric, values in _thresholds_by_metric(thresholds).items()
             for t in values]
    return {
        "status_counts": stats.overall.status_counts,
        "ssim": _ssim_block(stats.overall.moments, collector.overall_percentiles()),
        "histogram": _histogram_block(stats.overall.moments),
        **{metric: _metric_block(metric, stats.overall.scores[metric], collector.overall_percentiles(metric))
           for metric in OTHER_METRICS},
        "group_by": stats.group_by,
        "groups": groups,
        "worst_k": stats.worst_k,
        "worst": [vars(p) for p in stats.worst],
        "failure_examples": {s: [vars(e) for e in rows] for s, rows in stats.failure_examples.items()},
        "below": below,
    }
