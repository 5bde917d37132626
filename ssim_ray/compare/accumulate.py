"""What the statistics keep while compare rows stream past: counts, sums, the extremes, samples, a spill.

Memory does not grow with the number of rows. Per metric: the finite paired deltas and their group codes go
to local disk (`spill.DeltaSpill`, 12 bytes per paired pair) for exact percentiles and the histogram; per
group and metric a few counters and sums (the mean delta is their ratio); the k worst and best pairs per
group (and overall) with their paths; the examples of each pairing outcome; for the bootstrap, per group
and overall, the deltas of the `bootstrap_max_sample` pairs with the smallest pair_id hashes (all of them
below that count); and `scatter_points` (baseline, candidate) pairs chosen by the smallest hashes of their
pair_ids. Hash-chosen samples are the same pairs whatever order the rows came in.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ssim_ray.compare.join import pair_hashes
from ssim_ray.compare.rows import OUTCOME_NAMES, CompareBatch, MetricRows
from ssim_ray.compare.runs import CompareRefusedError
from ssim_ray.compare.spill import DeltaSpill, key_values
from ssim_ray.output.table_stats import value_codes

EXTREME_FIELDS = ("pair_id", "group", "baseline", "candidate", "delta", "baseline_reference", "candidate_reference",
                  "baseline_distorted", "candidate_distorted", "baseline_shard_id", "candidate_shard_id")
EXAMPLE_FIELDS = ("pair_id", "group", "baseline_status", "candidate_status", "baseline_error", "candidate_error")
COUNTERS = ("paired", "finite", "sum_delta", "finite_scores", "worse", "better", "unchanged", "became_infinite",
            "became_finite", "scored_in_baseline_only", "scored_in_candidate_only")


class GroupCodes:
    """A code per group name, in order of first appearance; more than `max_groups` is refused.

    Example:
        >>> codes = GroupCodes(max_groups=5, column="codec")
        >>> codes.codes(pa.array(["b", "a", "b"])).tolist(), codes.names
        ([0, 1, 0], ['b', 'a'])
    """

    def __init__(self, *, max_groups: int, column: Optional[str]) -> None:
        self.max_groups, self.column = max_groups, column
        self.names: List[str] = []
        self._index: Dict[str, int] = {}

    def codes(self, groups: Any) -> np.ndarray:
        if self.column is None:
            return np.zeros(len(groups), dtype=np.int32)
        local, values = value_codes(groups)
        for name in values:
            if name not in self._index:
                self._index[name] = len(self.names)
                self.names.append(name)
        if len(self.names) > self.max_groups:
            raise CompareRefusedError(
                f"the group column {self.column!r} must have at most compare.max_groups={self.max_groups} values, "
                f"got more (e.g. {self.names[:3]}): a per-pair column? Set compare.group_by to a coarser column")
        return np.array([self._index[v] for v in values], dtype=np.int32)[local] if values else local.astype(np.int32)


class GroupCounts:
    """Named float64 totals per group code, growing with the codes (np.bincount per batch)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.values = {name: np.zeros(0) for name in names}

    def add(self, name: str, codes: np.ndarray, weights: Optional[np.ndarray] = None) -> None:
        found = np.bincount(codes, weights=weights, minlength=self.values[name].size)
        if found.size > self.values[name].size:
            self.values[name] = np.pad(self.values[name], (0, found.size - self.values[name].size))
        self.values[name] = self.values[name] + found

    def of(self, name: str, code: int) -> float:
        values = self.values[name]
        return float(values[code]) if code < values.size else 0.0

    def total(self, name: str) -> float:
        return float(self.values[name].sum())


def within_k(key: np.ndarray, codes: np.ndarray, k: int) -> np.ndarray:
    """Indices of the rows among the k smallest keys of their group or of all rows, ties at the k-th kept.

    Keeping ties makes the union over batches a superset of the k smallest by (key, pair_id), so the final
    choice among equal keys does not depend on the order rows came in.

    Example:
        >>> within_k(np.array([3.0, 1.0, 2.0, 1.0]), np.array([0, 0, 1, 1]), 1).tolist()
        [1, 3]
    """
    if key.size == 0 or k == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((key, codes))
    ranked, grouped = key[order], codes[order]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
    sizes = np.diff(np.r_[starts, grouped.size])
    kth = ranked[starts + np.minimum(k, sizes) - 1]
    overall = np.partition(key, min(k, key.size) - 1)[min(k, key.size) - 1]
    keep = (ranked <= np.repeat(kth, sizes)) | (ranked <= overall)
    return np.sort(order[keep])


class Extremes:
    """The k pairs with the smallest `key` per group and overall (key: delta for regressions, −delta for
    improvements), with what identifies and re-reads them."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.held: Optional[pa.Table] = None

    def add(self, table: pa.Table, metric: str, rows: np.ndarray, key: np.ndarray, codes: np.ndarray) -> None:
        """Consider `rows` of a compare table (their `key` and group `codes` given): only the few that can
        still be among the k are taken from the table."""
        picked = within_k(key, codes, self.k)
        if picked.size == 0:
            return
        payload = _extreme_payload(table.take(pa.array(rows[picked])), metric)
        chosen = payload.append_column("_key", pa.array(key[picked])).append_column("_code", pa.array(codes[picked]))
        held = chosen if self.held is None else pa.concat_tables([self.held, chosen])
        keep = within_k(held["_key"].to_numpy(), held["_code"].to_numpy(), self.k)
        self.held = held.take(pa.array(keep))

    def listed(self, code: Optional[int] = None) -> List[Dict[str, Any]]:
        """The k smallest of group `code` (None: overall), by key then pair_id, as plain rows."""
        if self.held is None:
            return []
        table = self.held if code is None else self.held.filter(pc.equal(self.held["_code"], code))
        table = table.sort_by([("_key", "ascending"), ("pair_id", "ascending")]).slice(0, self.k)
        return table.drop_columns(["_key", "_code"]).to_pylist()


class OutcomeExamples:
    """Per pairing outcome but `both_ok`, the `k` pairs with the smallest pair_ids (the same in any row order)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.held: Dict[str, pa.Table] = {}

    def add(self, table: pa.Table, outcome: np.ndarray) -> None:
        if self.k == 0:
            return
        for code in np.unique(outcome):
            name = OUTCOME_NAMES[code]
            if name == "both_ok":  # the ordinary case: all of them are in compare.parquet
                continue
            rows = table.filter(pa.array(outcome == code)).select(list(EXAMPLE_FIELDS))
            if name in self.held:
                rows = pa.concat_tables([self.held[name], rows])
            self.held[name] = rows.sort_by([("pair_id", "ascending")]).slice(0, self.k)

    def listed(self) -> Dict[str, List[Dict[str, Any]]]:
        return {name: self.held[name].to_pylist() for name in OUTCOME_NAMES if name in self.held}


class Sample:
    """Up to `size` (baseline, candidate) pairs: those whose pair_id hashes are smallest."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.keys = np.zeros(0, dtype=np.uint64)
        self.points = np.zeros((0, 2))

    def add(self, hashes: np.ndarray, baseline: np.ndarray, candidate: np.ndarray) -> None:
        if self.size == 0 or hashes.size == 0:
            return
        keys = np.concatenate([self.keys, hashes])
        points = np.concatenate([self.points, np.stack([baseline, candidate], axis=1)])
        if keys.size > self.size:
            keep = np.argpartition(keys, self.size - 1)[: self.size]
            keys, points = keys[keep], points[keep]
        self.keys, self.points = keys, points

    def ordered(self) -> np.ndarray:
        """The points in hash order (a stable order whatever order rows came in)."""
        return self.points[np.argsort(self.keys, kind="stable")]


class HashSample:
    """Per group and overall, the deltas of the `k` pairs with the smallest pair_id hashes (ties kept).

    Bounded: after each pruning at most k per group plus k overall are held; pruning runs when twice that
    has gathered.

    Example:
        >>> sample = HashSample(2)
        >>> sample.add(np.array([5, 1, 3, 2], np.uint64), np.array([0.5, 0.1, 0.3, 0.2]), np.array([0, 0, 0, 1]))
        >>> sample.values(0).tolist(), sample.values(1).tolist(), sample.values(None).tolist()
        ([0.1, 0.3], [0.2], [0.1, 0.2])
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.hashes = np.zeros(0, dtype=np.uint64)
        self.deltas = np.zeros(0)
        self.codes = np.zeros(0, dtype=np.int32)

    def add(self, hashes: np.ndarray, deltas: np.ndarray, codes: np.ndarray) -> None:
        if hashes.size == 0:
            return
        self.hashes = np.concatenate([self.hashes, hashes])
        self.deltas = np.concatenate([self.deltas, deltas])
        self.codes = np.concatenate([self.codes, codes.astype(np.int32)])
        if self.hashes.size > 2 * self.k * (int(self.codes.max()) + 2):
            self._prune()

    def _prune(self) -> None:
        keep = within_k(self.hashes, self.codes, self.k)
        self.hashes, self.deltas, self.codes = self.hashes[keep], self.deltas[keep], self.codes[keep]

    def values(self, code: Optional[int]) -> np.ndarray:
        """The sample of group `code` (None: overall), sorted: the k smallest hashes' deltas (all if fewer)."""
        self._prune()
        hashes, deltas = self.hashes, self.deltas
        if code is not None:
            mine = self.codes == code
            hashes, deltas = hashes[mine], deltas[mine]
        if hashes.size > self.k:
            deltas = deltas[np.argsort(hashes, kind="stable")[: self.k]]
        return np.sort(deltas)


class MetricAccumulator:
    """One metric's deltas and counts, per group; see the module docstring for what is kept."""

    def __init__(self, metric: str, *, epsilon: float, folder: str, worst_k: int, scatter_points: int,
                 bootstrap_sample: int) -> None:
        self.metric, self.epsilon = metric, epsilon
        self.spill = DeltaSpill(folder, metric)
        self.low, self.high = np.inf, -np.inf  # of the finite deltas
        self.counts = GroupCounts(COUNTERS + ("sum_baseline", "sum_candidate"))
        self.worst, self.best = Extremes(worst_k), Extremes(worst_k)
        self.sample = Sample(scatter_points)
        self.bootstrap = HashSample(bootstrap_sample)

    @property
    def size(self) -> int:
        """Finite paired deltas seen."""
        return self.spill.size

    def finite_deltas(self) -> Iterator[np.ndarray]:
        """Every finite paired delta, a chunk at a time, from the spill."""
        for keys, _ in self.spill.chunks():
            yield key_values(keys)

    def add(self, batch: CompareBatch, rows: MetricRows, codes: np.ndarray, hashes: np.ndarray) -> None:
        delta, paired = rows.delta, rows.paired
        finite = paired & np.isfinite(delta)
        self.spill.add(delta[finite], codes[finite])
        if finite.any():
            self.low, self.high = min(self.low, float(delta[finite].min())), max(self.high, float(delta[finite].max()))
        count = self.counts.add
        count("paired", codes[paired])
        count("finite", codes[finite])
        count("sum_delta", codes[finite], delta[finite])
        # The runs' means over the pairs both scored finitely (two identical images' +inf PSNR left out).
        scores = paired & np.isfinite(rows.baseline) & np.isfinite(rows.candidate)
        count("finite_scores", codes[scores])
        count("sum_baseline", codes[scores], rows.baseline[scores])
        count("sum_candidate", codes[scores], rows.candidate[scores])
        with np.errstate(invalid="ignore"):
            count("worse", codes[paired & (delta < -self.epsilon)])
            count("better", codes[paired & (delta > self.epsilon)])
            count("unchanged", codes[paired & (delta == 0)])
            count("became_infinite", codes[paired & (delta == np.inf)])
            count("became_finite", codes[paired & (delta == -np.inf)])
        scored_b, scored_c = ~np.isnan(rows.baseline), ~np.isnan(rows.candidate)
        count("scored_in_baseline_only", codes[scored_b & ~scored_c])
        count("scored_in_candidate_only", codes[~scored_b & scored_c])
        self._extremes(batch, delta, finite, codes)
        self.bootstrap.add(hashes[finite], delta[finite], codes[finite])
        self.sample.add(hashes[paired], rows.baseline[paired], rows.candidate[paired])

    def _extremes(self, batch: CompareBatch, delta: np.ndarray, finite: np.ndarray, codes: np.ndarray) -> None:
        # Ranked by finite deltas: pairs that became (or stopped being) identical are counted apart.
        with np.errstate(invalid="ignore"):
            regressed, improved = np.flatnonzero(finite & (delta < 0)), np.flatnonzero(finite & (delta > 0))
        for rows, extremes, sign in ((regressed, self.worst, 1.0), (improved, self.best, -1.0)):
            if rows.size:
                extremes.add(batch.table, self.metric, rows, sign * delta[rows], codes[rows])


def _extreme_payload(table: pa.Table, metric: str) -> pa.Table:
    names = {"baseline": f"baseline_{metric}", "candidate": f"candidate_{metric}", "delta": f"delta_{metric}"}
    return pa.Table.from_arrays([table[names.get(field, field)] for field in EXTREME_FIELDS],
                                names=list(EXTREME_FIELDS))


class Accumulator:
    """Everything a comparison's statistics need, fed one CompareBatch at a time."""

    def __init__(self, metrics: Sequence[str], *, group_by: Optional[str], epsilon: Mapping[str, float],
                 folder: str, worst_k: int, examples_k: int, max_groups: int, scatter_points: int,
                 bootstrap_sample: int) -> None:
        self.group_by = group_by
        self.groups = GroupCodes(max_groups=max_groups, column=group_by)
        self.outcomes = GroupCounts(OUTCOME_NAMES)
        self.examples = OutcomeExamples(examples_k)
        self.scatter_points = scatter_points
        self.metrics = {m: MetricAccumulator(m, epsilon=epsilon[m], folder=folder, worst_k=worst_k,
                                             scatter_points=scatter_points, bootstrap_sample=bootstrap_sample)
                        for m in metrics}

    def add(self, batch: CompareBatch) -> None:
        codes = self.groups.codes(batch.table["group"])
        for index, name in enumerate(OUTCOME_NAMES):
            self.outcomes.add(name, codes[batch.outcome == index])
        self.examples.add(batch.table, batch.outcome)
        hashes = pair_hashes(batch.table["pair_id"])
        for metric, rows in batch.metrics.items():
            self.metrics[metric].add(batch, rows, codes, hashes)

    def close(self) -> None:
        """Delete the spilled deltas (the statistics and the report have read them)."""
        for kept in self.metrics.values():
            kept.spill.remove()
