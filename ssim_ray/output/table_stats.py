"""Statistics of a results table: from a shard's rows (or a part file's) to its mergeable ShardStats.

Rows are read column-wise (dictionary codes, numpy masks), never as a Python object per row, so a part of
a few thousand rows takes about a millisecond. The types and their sum are in `stats`.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ssim_ray import statuses
from ssim_ray.config import SummaryConfig
from ssim_ray.output.stats import (
    OTHER_METRICS,
    FailureExample,
    GroupStats,
    MetricStats,
    ShardStats,
    WorstPair,
    empty_stats,
    k_worst,
    metric_stats_of,
    moments_of,
)

# The group of rows whose group_by value is null (groups are JSON object keys, so they need a string).
GROUP_NULL = "(null)"


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


def value_codes(array: pa.Array) -> Tuple[np.ndarray, list]:
    """An integer code per row and the distinct values, without a Python object per row.

    Args:
        array: a column (chunked or not).

    Returns:
        (codes, values): row i holds values[codes[i]].

    Example:
        >>> codes, values = value_codes(pa.array(["ok", "missing", "ok"]))
        >>> codes.tolist(), values
        ([0, 1, 0], ['ok', 'missing'])
    """
    encoded = pc.dictionary_encode(array)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    return encoded.indices.to_numpy(zero_copy_only=False), encoded.dictionary.to_pylist()


def status_codes(table: pa.Table) -> Tuple[np.ndarray, list, np.ndarray]:
    """Each row's status as a code (see `value_codes`), the statuses present, and which rows are ok.

    Example:
        >>> codes, names, ok = status_codes(pa.table({"status": ["ok", "missing"]}))
        >>> names, ok.tolist()
        (['ok', 'missing'], [True, False])
    """
    codes, names = value_codes(table["status"])
    ok = codes == (names.index(statuses.OK) if statuses.OK in names else -1)
    return codes, names, ok


def ok_scores(table: pa.Table, ok: np.ndarray) -> np.ndarray:
    """The float64 scores of the ok rows (`ok`: the mask from `status_codes`).

    Raises:
        ValueError: an ok row without a finite score, naming its pair_id.

    Example:
        >>> t = pa.table({"pair_id": ["a", "b"], "ssim": [0.5, None], "status": ["ok", "missing"]})
        >>> ok_scores(t, status_codes(t)[2]).tolist()
        [0.5]
    """
    scores = table["ssim"].to_numpy(zero_copy_only=False).astype(np.float64)[ok]
    if not np.all(np.isfinite(scores)):
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        pair_id = table["pair_id"].to_numpy(zero_copy_only=False)[np.flatnonzero(ok)[bad]]
        raise ValueError(f"rows with status {statuses.OK!r} must have a finite ssim; expected a number, got "
                         f"{scores[bad]!r} for pair_id {pair_id!r}")
    return scores


# The column that gives the reason an ok row has no value of a metric (output/schema.py owns the columns).
UNDEFINED_COLUMNS = {"ms_ssim": "ms_ssim_undefined"}


def metric_values(table: pa.Table, ok: np.ndarray, metric: str) -> Tuple[np.ndarray, np.ndarray]:
    """A metric's float64 values on the ok rows (NaN where null: not computed, or undefined) and the reason
    of each ok row without one (None where there is none); a table without the columns has none.

    Example:
        >>> t = pa.table({"status": ["ok", "ok"], "ms_ssim": [0.9, None], "ms_ssim_undefined": [None, "too_small"]})
        >>> values, reasons = metric_values(t, np.array([True, True]), "ms_ssim")
        >>> values.tolist()[0], reasons.tolist()
        (0.9, [None, 'too_small'])
    """
    count = int(np.count_nonzero(ok))
    if metric not in table.column_names:
        return np.full(count, np.nan), np.full(count, None, dtype=object)
    values = table[metric].to_numpy(zero_copy_only=False).astype(np.float64)[ok]
    column = UNDEFINED_COLUMNS.get(metric)
    if column is None or column not in table.column_names:
        return values, np.full(count, None, dtype=object)
    return values, table[column].to_numpy(zero_copy_only=False).astype(object)[ok]


def _other_scores(table: pa.Table, ok: np.ndarray) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    return {metric: metric_values(table, ok, metric) for metric in OTHER_METRICS}


def _scores_of(columns: Dict[str, Tuple[np.ndarray, np.ndarray]], mask: Optional[np.ndarray] = None
               ) -> Dict[str, MetricStats]:
    """MetricStats of every other metric over the ok rows selected by `mask` (None: all of them)."""
    return {metric: metric_stats_of(metric, values if mask is None else values[mask],
                                    reasons if mask is None else reasons[mask])
            for metric, (values, reasons) in columns.items()}


def _status_counts(codes: np.ndarray, names: list) -> Dict[str, int]:
    counts = np.bincount(codes, minlength=len(names))
    return {name: int(counts[i]) for i, name in sorted(enumerate(names), key=lambda item: item[1]) if counts[i]}


def stats_from_table(
    table: pa.Table, *, group_by: Optional[str], worst_k: int, examples_per_status: int = 5
) -> ShardStats:
    """Compute the mergeable statistics of result rows (a table with the results schema).

    Args:
        table: result rows (see schema.RESULT_SCHEMA); pass-through columns may follow.
        group_by: a column to break the statistics down by, or None.
        worst_k: how many of the lowest-scoring ok pairs to keep.
        examples_per_status: how many example rows to keep for each status other than ok.

    Returns:
        The ShardStats of `table`.

    Raises:
        ValueError: an ok row without a finite ssim, a value of -inf, or a `group_by` that is not a usable column.

    Example:
        >>> t = pa.table({"pair_id": ["a", "b"], "ssim": [0.5, None], "status": ["ok", "missing"],
        ...               "error": [None, "no such file: b.png"], "reference": ["a.png", "b.png"],
        ...               "distorted": ["a_d.png", "b_d.png"], "shard_id": ["s0", "s0"]})
        >>> stats_from_table(t, group_by=None, worst_k=1).overall.status_counts
        {'missing': 1, 'ok': 1}
    """
    codes, status_names, ok = status_codes(table)
    scores = ok_scores(table, ok)
    stats = empty_stats(group_by=group_by, worst_k=worst_k, examples_per_status=examples_per_status)
    others = _other_scores(table, ok)
    stats.overall = GroupStats(_status_counts(codes, status_names), moments_of(scores), _scores_of(others))
    keys = group_keys(table, group_by) if group_by is not None else None
    if keys is not None:
        stats.groups = _groups_of(keys, codes, status_names, ok, scores, others)
    stats.worst = _worst_rows(table, ok, scores, keys, worst_k)
    stats.failure_examples = _failure_examples(table, codes, status_names, examples_per_status)
    return stats


def _groups_of(keys: pa.Array, codes: np.ndarray, status_names: list, ok: np.ndarray,
               scores: np.ndarray, others: Dict[str, Tuple[np.ndarray, np.ndarray]]) -> Dict[str, GroupStats]:
    group_codes, group_names = value_codes(keys)
    ok_group_codes = group_codes[ok]
    groups = {}
    for code, name in enumerate(group_names):
        in_group = group_codes == code
        ok_in_group = ok_group_codes == code
        groups[name] = GroupStats(_status_counts(codes[in_group], status_names), moments_of(scores[ok_in_group]),
                                  _scores_of(others, ok_in_group))
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
    return k_worst(pairs, k)


def _failure_examples(table: pa.Table, codes: np.ndarray, status_names: list,
                      per_status: int) -> Dict[str, List[FailureExample]]:
    examples = {}
    columns = ["pair_id", "status", "error", "reference", "distorted", "shard_id"]
    for code, name in sorted(enumerate(status_names), key=lambda item: item[1]):
        if name == statuses.OK or per_status == 0:
            continue
        rows = np.flatnonzero(codes == code)[:per_status]
        if rows.size:
            examples[name] = [FailureExample(**row) for row in table.take(pa.array(rows)).select(columns).to_pylist()]
    return examples


def shard_stats(table: pa.Table, summary_cfg: SummaryConfig) -> ShardStats:
    """The statistics of a shard's rows with the run's summary settings (group_by, worst_k, examples).

    Args:
        table: the shard's results.
        summary_cfg: the run's `summary` settings.

    Returns:
        The ShardStats that `commit.write_shard` puts into the marker and the merge sums.

    Example:
        >>> from ssim_ray.output.schema import rows_to_table
        >>> shard_stats(rows_to_table([], []), SummaryConfig()).overall.rows
        0
    """
    return stats_from_table(table, group_by=summary_cfg.group_by, worst_k=summary_cfg.worst_k,
                            examples_per_status=summary_cfg.examples_per_status)
