"""The rows of compare.parquet, built from joined tables: one per pair_id of either run, never dropped.

Owns compare.parquet's columns (`compare_columns`), the pairing outcome of each pair (`OUTCOMES`) and the
delta rule: delta = candidate − baseline where both runs scored the pair, null otherwise; equal values
(+inf and +inf: two identical images' PSNR) give exactly 0, and a finite score that becomes infinite (or
back) gives ±inf, counted apart by the statistics. A delta is never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ssim_ray import statuses
from ssim_ray.output.table_stats import GROUP_NULL

# How each pair_id of either run was paired, in the order reports list them.
OUTCOMES = {
    "both_ok": "ok in both runs: scored twice, compared",
    "newly_failed": "ok in the baseline, not ok in the candidate",
    "fixed": "not ok in the baseline, ok in the candidate",
    "both_failed": "not ok in either run",
    "baseline_only": "in the baseline only (absent from the candidate)",
    "candidate_only": "in the candidate only (absent from the baseline)",
}
OUTCOME_NAMES = tuple(OUTCOMES)
_TEXT = ("status", "error", "reference", "distorted", "shard_id")


def compare_columns(metrics: Sequence[str]) -> List[str]:
    """compare.parquet's columns, in order, for these metrics.

    Example:
        >>> compare_columns(["ssim"])[2:8]
        ['outcome', 'baseline_status', 'candidate_status', 'baseline_ssim', 'candidate_ssim', 'delta_ssim']
    """
    scores = [f"{kind}_{m}" for m in metrics for kind in ("baseline", "candidate", "delta")]
    text = [f"{side}_{name}" for name in _TEXT[1:] for side in ("baseline", "candidate")]
    return ["pair_id", "group", "outcome", "baseline_status", "candidate_status", *scores, *text]


@dataclass
class MetricRows:
    """One metric's values in a batch, as numpy arrays (NaN where not scored), for the statistics."""

    baseline: np.ndarray
    candidate: np.ndarray
    delta: np.ndarray  # NaN unless both runs scored the pair; otherwise finite or ±inf
    paired: np.ndarray  # both scored


@dataclass
class CompareBatch:
    """A batch of compare rows: the table written to compare.parquet and what the statistics read."""

    table: pa.Table
    outcome: np.ndarray  # index into OUTCOME_NAMES
    metrics: Dict[str, MetricRows]


def _scores(column: pa.ChunkedArray) -> np.ndarray:
    return np.asarray(column.to_numpy(), dtype=np.float64)  # nulls become NaN


def deltas(baseline: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """candidate − baseline where both are scored (not NaN); equal values (inf and inf) give exactly 0.

    Example:
        >>> inf, nan = float("inf"), float("nan")
        >>> deltas(np.array([0.5, inf, 30.0, inf, nan]), np.array([0.25, inf, inf, 30.0, 0.5])).tolist()
        [-0.25, 0.0, inf, -inf, nan]
    """
    paired = ~np.isnan(baseline) & ~np.isnan(candidate)
    with np.errstate(invalid="ignore"):
        found = np.where(baseline == candidate, 0.0, candidate - baseline)
    return np.where(paired, found, np.nan)


def outcome_codes(b_present: np.ndarray, c_present: np.ndarray, b_ok: np.ndarray, c_ok: np.ndarray) -> np.ndarray:
    """Each pair's outcome as an index into OUTCOME_NAMES.

    Example:
        >>> t, f = True, False
        >>> [OUTCOME_NAMES[i] for i in outcome_codes(np.array([t, t, t, t, t, f]), np.array([t, t, t, t, f, t]),
        ...                                           np.array([t, t, f, f, t, f]), np.array([t, f, t, f, f, t]))]
        ['both_ok', 'newly_failed', 'fixed', 'both_failed', 'baseline_only', 'candidate_only']
    """
    both = b_present & c_present
    codes = np.select([both & b_ok & c_ok, both & b_ok & ~c_ok, both & ~b_ok & c_ok, both, b_present],
                      [0, 1, 2, 3, 4], default=5)
    return codes.astype(np.int8)


def _dictionary(codes: np.ndarray, names: Sequence[str]) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), pa.array(list(names))).cast(pa.string())


def _flag(table: pa.Table, name: str) -> np.ndarray:
    return table[name].to_numpy(zero_copy_only=False).astype(bool)


def _ok(table: pa.Table, side: str) -> np.ndarray:
    return pc.fill_null(pc.equal(table[f"{side}_status"], statuses.OK), False).to_numpy(zero_copy_only=False)


def compare_batch(joined: pa.Table, metrics: Sequence[str], *, grouped: bool) -> CompareBatch:
    """compare.parquet's rows for a joined table (see `join`), and the arrays the statistics need.

    Args:
        joined: a joined table (`join.joined_tables`).
        metrics: the compared score columns.
        grouped: whether a group column is in use (else `group` is null).

    Returns:
        The CompareBatch.

    Example:
        >>> j = pa.table({"pair_id": ["p"], "b_present": [True], "c_present": [True], "b_status": ["ok"],
        ...               "c_status": ["ok"], "b_ssim": [0.9], "c_ssim": [0.8], "b_group": ["x"], "c_group": ["x"],
        ...               **{f"{s}_{n}": pa.array([None], pa.string()) for s in "bc"
        ...                  for n in ("error", "reference", "distorted", "shard_id")}})
        >>> batch = compare_batch(j, ["ssim"], grouped=True)
        >>> batch.table["outcome"][0].as_py(), round(batch.table["delta_ssim"][0].as_py(), 6)
        ('both_ok', -0.1)
    """
    b_present, c_present = _flag(joined, "b_present"), _flag(joined, "c_present")
    outcome = outcome_codes(b_present, c_present, _ok(joined, "b"), _ok(joined, "c"))
    group: pa.Array = pa.nulls(joined.num_rows, pa.string())
    if grouped:
        group = pc.fill_null(pc.coalesce(joined["b_group"], joined["c_group"]), GROUP_NULL)
    columns = {"pair_id": joined["pair_id"], "group": group, "outcome": _dictionary(outcome, OUTCOME_NAMES),
               "baseline_status": joined["b_status"], "candidate_status": joined["c_status"]}
    per_metric: Dict[str, MetricRows] = {}
    for metric in metrics:
        base, cand = _scores(joined[f"b_{metric}"]), _scores(joined[f"c_{metric}"])
        delta = deltas(base, cand)
        paired = ~np.isnan(delta)
        per_metric[metric] = MetricRows(base, cand, delta, paired)
        columns[f"baseline_{metric}"] = joined[f"b_{metric}"]
        columns[f"candidate_{metric}"] = joined[f"c_{metric}"]
        columns[f"delta_{metric}"] = pa.array(delta, mask=~paired)
    for name in _TEXT[1:]:
        columns[f"baseline_{name}"] = joined[f"b_{name}"]
        columns[f"candidate_{name}"] = joined[f"c_{name}"]
    names = compare_columns(metrics)
    table = pa.Table.from_arrays([columns[n] for n in names], names=names)
    return CompareBatch(table, outcome, per_metric)


def compare_schema(metrics: Sequence[str]) -> pa.Schema:
    """compare.parquet's Arrow schema: text columns as strings, scores and deltas float64.

    Example:
        >>> compare_schema(["ssim"]).field("delta_ssim").type
        DataType(double)
    """
    scores = {f"{kind}_{m}" for m in metrics for kind in ("baseline", "candidate", "delta")}
    return pa.schema([(n, pa.float64() if n in scores else pa.string()) for n in compare_columns(metrics)])

