"""Mergeable statistics (ssim_ray.output.stats): merging shards' statistics equals computing them over all rows."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from report_fixtures import photo_rows

from ssim_ray.output.schema import rows_to_table
from ssim_ray.output.stats import HIST_BINS, empty_stats, histogram_counts, merge_stats, stats_from_json, stats_to_json
from ssim_ray.output.summary_stats import ScoreCollector
from ssim_ray.output.table_stats import GROUP_NULL, group_keys, stats_from_table

PASSTHROUGH = ["distortion", "photo"]


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> pa.Table:
    rows = photo_rows(tmp_path_factory.mktemp("photos"))
    return rows_to_table([dict(r, shard_id="s") for r in rows], PASSTHROUGH)


def _stats(table: pa.Table, group_by="distortion"):
    return stats_from_table(table, group_by=group_by, worst_k=4, examples_per_status=2)


def _merged_over(table: pa.Table, cuts: list):
    bounds = [0, *sorted(cuts), table.num_rows]
    merged = empty_stats(group_by="distortion", worst_k=4, examples_per_status=2)
    for lo, hi in zip(bounds, bounds[1:]):
        merged = merge_stats(merged, _stats(table.slice(lo, hi - lo)))
    return merged


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=33), max_size=6))
def test_merging_any_split_equals_the_whole(table, cuts):
    whole, merged = _stats(table), _merged_over(table, cuts)
    assert merged.overall.status_counts == whole.overall.status_counts
    assert merged.overall.moments.count == whole.overall.moments.count == 30
    # Chan's update reorders additions: equal to rounding, relative 1e-12.
    assert merged.overall.moments.mean == pytest.approx(whole.overall.moments.mean, rel=1e-12)
    assert merged.overall.moments.m2 == pytest.approx(whole.overall.moments.m2, rel=1e-10)
    assert (merged.overall.moments.min, merged.overall.moments.max) == (whole.overall.moments.min,
                                                                         whole.overall.moments.max)
    np.testing.assert_array_equal(merged.overall.moments.hist, whole.overall.moments.hist)
    assert merged.worst == whole.worst
    assert merged.failure_examples == whole.failure_examples
    assert sorted(merged.groups) == sorted(whole.groups)
    for name, group in whole.groups.items():
        assert merged.groups[name].status_counts == group.status_counts
        np.testing.assert_array_equal(merged.groups[name].moments.hist, group.moments.hist)


def test_statistics_equal_numpy_on_the_scores(table):
    stats = _stats(table)
    scores = np.array([s for s in table["ssim"].to_pylist() if s is not None])
    assert stats.overall.moments.mean == pytest.approx(scores.mean(), rel=1e-12)
    assert stats.overall.moments.std == pytest.approx(scores.std(), rel=1e-12)
    assert stats.overall.status_counts == {"missing": 1, "ok": 30, "size_mismatch": 1, "unreadable": 1}
    assert [p.ssim for p in stats.worst] == sorted(scores)[:4]
    assert stats.groups["noise"].moments.count == 6
    assert stats.groups["missing"].failures == 1


def test_std_of_scores_near_one_survives_merging():
    # SSIM near 1 with a tiny spread: summed (sum, sum of squares) per shard would lose most digits here.
    scores = 0.999 + 1e-7 * np.random.default_rng(0).standard_normal(100_000)
    table = pa.table({"pair_id": [f"p{i}" for i in range(scores.size)], "ssim": scores,
                      "status": ["ok"] * scores.size, "error": pa.nulls(scores.size, pa.string()),
                      "reference": pa.nulls(scores.size, pa.string()),
                      "distorted": pa.nulls(scores.size, pa.string()), "shard_id": ["s"] * scores.size})
    merged = empty_stats(group_by=None, worst_k=1, examples_per_status=0)
    total, squares = 0.0, 0.0
    for start in range(0, scores.size, 1000):
        part = stats_from_table(table.slice(start, 1000), group_by=None, worst_k=1, examples_per_status=0)
        merged = merge_stats(merged, part)
        total += float(scores[start:start + 1000].sum())
        squares += float((scores[start:start + 1000] ** 2).sum())
    naive = np.sqrt(squares / scores.size - (total / scores.size) ** 2)
    assert merged.overall.moments.std == pytest.approx(scores.std(), rel=1e-6)
    assert abs(naive - scores.std()) > 1e-3 * scores.std()  # the shortcut we avoided really is wrong here


def test_histogram_bins_include_the_ends():
    counts = histogram_counts(np.array([-1.0, -1.00001, 0.0, 0.9995, 1.0, 1.0000043]))
    assert counts.sum() == 6
    assert counts[0] == 2 and counts[HIST_BINS // 2] == 1
    assert counts[HIST_BINS - 1] == 3  # 0.9995 is in [0.999, 1.0], and 1.0 and beyond join the last bin


def test_worst_ties_break_by_pair_id_whatever_the_order():
    table = pa.table({"pair_id": ["c", "a", "b", "d"], "ssim": [0.5, 0.5, 0.5, 0.9], "status": ["ok"] * 4,
                      "error": pa.nulls(4, pa.string()), "reference": ["rc", "ra", "rb", "rd"],
                      "distorted": ["dc", "da", "db", "dd"], "shard_id": ["s"] * 4})
    forward = stats_from_table(table, group_by=None, worst_k=2)
    backward = stats_from_table(table.take([3, 2, 1, 0]), group_by=None, worst_k=2)
    assert [p.pair_id for p in forward.worst] == ["a", "b"] == [p.pair_id for p in backward.worst]


def test_json_round_trip_is_exact(table):
    stats = _stats(table)
    again = stats_from_json(json.loads(json.dumps(stats_to_json(stats))))
    assert stats_to_json(again) == stats_to_json(stats)
    assert again.worst == stats.worst


def test_merging_different_settings_is_refused(table):
    with pytest.raises(ValueError, match=r"expected \('distortion', 4, 2\), got \(None, 4, 2\)"):
        merge_stats(_stats(table), _stats(table, group_by=None))


def test_group_keys_are_strings_with_nulls_named(table):
    numbers = pa.table({"q": pa.array([10, None, 90], pa.int64())})
    assert group_keys(numbers, "q").to_pylist() == ["10", GROUP_NULL, "90"]
    with pytest.raises(ValueError, match=r"one of \['q'\], got 'codec'"):
        group_keys(numbers, "codec")
    with pytest.raises(ValueError, match="castable to string.*list"):
        group_keys(pa.table({"q": pa.array([[1]])}), "q")


def test_ok_row_without_a_score_is_an_error(table):
    broken = table.set_column(3, "ssim", pa.array([None] + table["ssim"].to_pylist()[1:], pa.float64()))
    with pytest.raises(ValueError, match="finite ssim.*camera_jpeg10"):
        _stats(broken)


def test_collector_percentiles_equal_numpy_per_group(table):
    collector = ScoreCollector(capacity=table.num_rows, group_by="distortion")
    collector.add(table.slice(0, 10))
    collector.add(table.slice(10))
    ok = [(r["distortion"], r["ssim"]) for r in table.to_pylist() if r["status"] == "ok"]
    by_group = collector.group_percentiles()
    for name in ("jpeg10", "noise", "blur"):
        scores = np.array([s for g, s in ok if g == name])
        assert by_group[name]["p5"] == np.percentile(scores, 5)
        assert by_group[name]["p99"] == np.percentile(scores, 99)
    assert collector.overall_percentiles()["p50"] == np.median([s for _, s in ok])
    with pytest.raises(ValueError, match="capacity is 33 rows, got 60 ok rows"):
        collector.add(table)
