"""Mergeable statistics of SSIM results: a shard's statistics combine with another's by a sum.

A part file's statistics travel in its commit marker, so the driver can merge a run's summary from markers
without re-reading rows. Everything here is exact under merging except the order of floating-point
additions, which is fixed (plan order), so a merge is deterministic:

- counts by status, overall and per group;
- SSIM moments of ok rows as (count, mean, M2) merged with Chan et al.'s pairwise update rather than
  (sum, sum of squares): SSIM clusters near 1 with a small spread, where sum-of-squares minus squared-sum
  cancels catastrophically;
- min and max;
- a fixed-bin histogram on [-1, 1] (`HIST_BINS` bins of width 2/HIST_BINS; values outside the range, which
  a fused kernel may produce by a few ulps, land in the end bins);
- the k worst ok pairs, ties broken by pair_id so the result does not depend on shard order;
- the first few failure examples per status, in plan order.

Exact percentiles are not mergeable; `percentiles` computes them from the merged column (see results.merge).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ssim_ray import statuses

HIST_BINS = 2000
HIST_RANGE = (-1.0, 1.0)
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
GROUP_NULL = "(null)"


@dataclass
class Moments:
    """Count, mean, M2 (sum of squared deviations), min, max and histogram of a set of SSIM scores."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    hist: np.ndarray = field(default_factory=lambda: np.zeros(HIST_BINS, dtype=np.int64))

    @property
    def std(self) -> Optional[float]:
        """Population standard deviation (ddof=0), None when there are no scores."""
        return math.sqrt(self.m2 / self.count) if self.count else None


def moments_of(values: np.ndarray) -> Moments:
    """Moments of a float64 array of scores (finite, already filtered to ok rows).

    Args:
        values: 1-D float64 array.

    Returns:
        The Moments of `values`.

    Example:
        >>> moments_of(np.array([0.5, 0.7])).mean
        0.6
    """
    if values.size == 0:
        return Moments()
    mean = float(values.mean())
    return Moments(
        count=int(values.size),
        mean=mean,
        m2=float(((values - mean) ** 2).sum()),
        min=float(values.min()),
        max=float(values.max()),
        hist=histogram_counts(values),
    )


def histogram_counts(values: np.ndarray) -> np.ndarray:
    """Counts of `values` in the fixed bins on [-1, 1]; bin i is [-1 + i*w, -1 + (i+1)*w), 1.0 in the last.

    Example:
        >>> int(histogram_counts(np.array([1.0, 0.99999]))[-1])
        2
    """
    lo, hi = HIST_RANGE
    index = np.floor((values - lo) / (hi - lo) * HIST_BINS).astype(np.int64)
    return np.bincount(np.clip(index, 0, HIST_BINS - 1), minlength=HIST_BINS).astype(np.int64)


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
class GroupStats:
    """Statistics of one population of rows: counts by status and the moments of its ok scores."""

    status_counts: Dict[str, int] = field(default_factory=dict)
    moments: Moments = field(default_factory=Moments)

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
    return GroupStats(dict(sorted(counts.items())), merge_moments(a.moments, b.moments))


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
        worst=_k_worst(a.worst + b.worst, a.worst_k),
        failure_examples=dict(sorted(examples.items())),
    )


def _k_worst(pairs: Sequence[WorstPair], k: int) -> List[WorstPair]:
    return sorted(pairs, key=lambda p: (p.ssim, p.pair_id))[:k]


def group_keys(table: pa.Table, group_by: str) -> pa.Array:
    """The group of each row as a string (nulls become GROUP_NULL), so groups are JSON object keys.

    Raises:
        ValueError: `group_by` is not a column of `table`, or its type has no string form.

    Example:
        >>> group_keys(pa.table({"q": [90, None]}), "q").to_pylist()
        ['90', '(null)']
    """
    if group_by not in table.column_names:
        raise ValueError(f"summary.group_by must name a result column, one of {table.column_names}, got {group_by!r}")
    column = table[group_by]
    try:
        as_text = pc.cast(column, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        raise ValueError(
            f"summary.group_by column {group_by!r} must be castable to string (numbers, strings, booleans), "
            f"got type {column.type}"
        ) from error
    return pc.fill_null(as_text, GROUP_NULL).combine_chunks()


def _codes(array: pa.Array) -> tuple[np.ndarray, list]:
    """Integer code per row and the distinct values, without a Python object per row."""
    encoded = pc.dictionary_encode(array)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    return encoded.indices.to_numpy(zero_copy_only=False), encoded.dictionary.to_pylist()


def _ok_scores(table: pa.Table, ok: np.ndarray) -> np.ndarray:
    scores = table["ssim"].to_numpy(zero_copy_only=False).astype(np.float64)[ok]
    if not np.all(np.isfinite(scores)):
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        pair_id = table["pair_id"].to_numpy(zero_copy_only=False)[np.flatnonzero(ok)[bad]]
        raise ValueError(f"rows with status 'ok' must have a finite ssim; expected a number, got {scores[bad]!r} "
                         f"for pair_id {pair_id!r}")
    return scores


def _status_counts(codes: np.ndarray, names: list) -> Dict[str, int]:
    counts = np.bincount(codes, minlength=len(names))
    return {name: int(counts[i]) for i, name in sorted(enumerate(names), key=lambda item: item[1]) if counts[i]}


def stats_from_table(
    table: pa.Table, *, group_by: Optional[str], worst_k: int, examples_per_status: int = 5
) -> ShardStats:
    """Compute the mergeable statistics of result rows (a table with the results schema).

    Args:
        table: result rows (see results.RESULT_SCHEMA); pass-through columns may follow.
        group_by: a column to break the statistics down by, or None.
        worst_k: how many of the lowest-scoring ok pairs to keep.
        examples_per_status: how many example rows to keep for each status other than ok.

    Returns:
        The ShardStats of `table`.

    Raises:
        ValueError: an ok row without a finite ssim, or a `group_by` that is not a usable column.

    Example:
        >>> t = pa.table({"pair_id": ["a", "b"], "ssim": [0.5, None], "status": ["ok", "missing"],
        ...               "error": [None, "no such file: b.png"], "reference": ["a.png", "b.png"],
        ...               "distorted": ["a_d.png", "b_d.png"], "shard_id": ["s0", "s0"]})
        >>> stats_from_table(t, group_by=None, worst_k=1).overall.status_counts
        {'missing': 1, 'ok': 1}
    """
    status_codes, status_names = _codes(table["status"])
    ok = status_codes == (status_names.index(statuses.OK) if statuses.OK in status_names else -1)
    scores = _ok_scores(table, ok)
    stats = empty_stats(group_by=group_by, worst_k=worst_k, examples_per_status=examples_per_status)
    stats.overall = GroupStats(_status_counts(status_codes, status_names), moments_of(scores))
    keys = group_keys(table, group_by) if group_by is not None else None
    if keys is not None:
        stats.groups = _groups_of(keys, status_codes, status_names, ok, scores)
    stats.worst = _worst_rows(table, ok, scores, keys, worst_k)
    stats.failure_examples = _failure_examples(table, status_codes, status_names, examples_per_status)
    return stats


def _groups_of(keys: pa.Array, status_codes: np.ndarray, status_names: list, ok: np.ndarray,
               scores: np.ndarray) -> Dict[str, GroupStats]:
    group_codes, group_names = _codes(keys)
    ok_group_codes = group_codes[ok]
    groups = {}
    for code, name in enumerate(group_names):
        in_group = group_codes == code
        groups[name] = GroupStats(_status_counts(status_codes[in_group], status_names),
                                  moments_of(scores[ok_group_codes == code]))
    return dict(sorted(groups.items()))


def _worst_rows(table: pa.Table, ok: np.ndarray, scores: np.ndarray, keys: Optional[pa.Array],
                k: int) -> List[WorstPair]:
    if k == 0 or scores.size == 0:
        return []
    # Keep every row tied with the k-th lowest score, so the tie-break by pair_id sees all candidates.
    threshold = np.partition(scores, min(k, scores.size) - 1)[min(k, scores.size) - 1]
    rows = np.flatnonzero(ok)[scores <= threshold]
    picked = table.take(pa.array(rows)).select(["pair_id", "ssim", "reference", "distorted", "shard_id"])
    groups = keys.take(pa.array(rows)).to_pylist() if keys is not None else [None] * len(rows)
    pairs = [WorstPair(group=group, **row) for row, group in zip(picked.to_pylist(), groups)]
    return _k_worst(pairs, k)


def _failure_examples(table: pa.Table, status_codes: np.ndarray, status_names: list,
                      per_status: int) -> Dict[str, List[FailureExample]]:
    examples = {}
    columns = ["pair_id", "status", "error", "reference", "distorted", "shard_id"]
    for code, name in sorted(enumerate(status_names), key=lambda item: item[1]):
        if name == statuses.OK or per_status == 0:
            continue
        rows = np.flatnonzero(status_codes == code)[:per_status]
        if rows.size:
            examples[name] = [FailureExample(**row) for row in table.take(pa.array(rows)).select(columns).to_pylist()]
    return examples


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


def _moments_from_json(d: Mapping[str, Any]) -> Moments:
    hist = np.zeros(HIST_BINS, dtype=np.int64)
    for index, count in d["hist"]:
        hist[index] = count
    if not d["count"]:
        return Moments(hist=hist)
    return Moments(d["count"], d["mean"], d["m2"], d["min"], d["max"], hist)


def _group_to_json(g: GroupStats) -> Dict[str, Any]:
    return {"status_counts": g.status_counts, "moments": _moments_to_json(g.moments)}


def _group_from_json(d: Mapping[str, Any]) -> GroupStats:
    return GroupStats(dict(d["status_counts"]), _moments_from_json(d["moments"]))


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
    return ShardStats(
        group_by=d["group_by"],
        worst_k=d["worst_k"],
        examples_per_status=d["examples_per_status"],
        overall=_group_from_json(d["overall"]),
        groups={key: _group_from_json(value) for key, value in d["groups"].items()},
        worst=[WorstPair(**p) for p in d["worst"]],
        failure_examples={s: [FailureExample(**e) for e in rows] for s, rows in d["failure_examples"].items()},
    )


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
    """The ok scores of a merge, with each score's group, for exact percentiles.

    Memory: 8 bytes per ok row for the score plus 4 per ok row for its group code (preallocated to
    `capacity` rows, an upper bound such as the total row count). No Python object per row.
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
        status_codes, status_names = _codes(table["status"])
        ok = status_codes == (status_names.index(statuses.OK) if statuses.OK in status_names else -1)
        scores = _ok_scores(table, ok)
        end = self._size + scores.size
        if end > self._scores.size:
            raise ValueError(f"ScoreCollector capacity is {self._scores.size} rows, got {end} ok rows")
        self._scores[self._size:end] = scores
        if self.group_by:
            local_codes, names = _codes(group_keys(table, self.group_by))
            to_global = np.array([self._group_index.setdefault(n, len(self._group_index)) for n in names],
                                 dtype=np.int32)
            self._codes[self._size:end] = to_global[local_codes[ok]] if names else []
        self._size = end

    def overall_percentiles(self) -> Dict[str, Optional[float]]:
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

    Returns:
        A dict with `status_counts`, `ssim` (count, mean, std (population), min, max, percentiles p1..p99),
        `histogram` (sparse [bin, count] pairs over HIST_BINS bins on [-1, 1]), `groups` (the same per group,
        with `rows` and `failures`), `worst`, `failure_examples`, and `below`: for each threshold, the
        count, ok count and fraction of ok scores strictly below it, overall and per group.

    Example:
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
