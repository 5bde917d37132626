"""Comparing two audits on output folders built directly: pairing, deltas, statistics, refusals, gates, modes.

The real-audit acceptance tests (a re-encoded subset of the sample set, an identical rerun, the report's
images in Chromium) are in tests/test_compare_audits.py.
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from compare_fixtures import read_compare, row, write_audit

from ssim_ray.compare import (
    EXIT_COMPARE_GATE,
    CompareConfig,
    CompareJobConfig,
    CompareRefusedError,
    compare_runs,
)
from ssim_ray.compare.accumulate import HashSample, within_k
from ssim_ray.compare.join import pair_hashes
from ssim_ray.compare.spill import ALL, DeltaSpill, linear_positions, linear_value, order_statistics
from ssim_ray.compare.statistics import bootstrap_interval, seed_for
from ssim_ray.config import SSIMConfig
from ssim_ray.output import gates as audit_gates

CODECS = ("jpeg", "webp", "avif")


def _compare(tmp_path: Path, baseline: str, candidate: str, name: str = "out", **options):
    options.setdefault("report", False)
    job = CompareJobConfig(baseline=baseline, candidate=candidate, compare=CompareConfig(**options))
    outcome = compare_runs(job, output_url=str(tmp_path / name))
    rows, summary = read_compare(tmp_path / name)
    return outcome, rows, summary


def _scored_rows(n: int, seed: int, *, shift: dict = None, psnr: bool = False):
    """n ok rows over three codecs with real-looking scores; `shift` moves one codec's candidate scores."""
    rng = np.random.default_rng(seed)
    base = 1.0 - rng.gamma(2.0, 0.03, n)
    rows = []
    for i, score in enumerate(base):
        codec = CODECS[i % 3]
        extra = {"psnr": float(20 + 30 * score)} if psnr else {}
        rows.append(row(f"pair-{i:05d}", float(score), codec=codec, **extra))
    return rows


def _shifted(rows, codec: str, by: float, every: int = 1):
    out = []
    for i, r in enumerate(rows):
        r = dict(r)
        if r["codec"] == codec and i % every == 0 and r["ssim"] is not None:
            r["ssim"] = r["ssim"] + by
        out.append(r)
    return out


# ---------------------------------------------------------------------------------------------------------
# Pairing: every pair_id of either run is a row; outcomes counted and listed
# ---------------------------------------------------------------------------------------------------------

def test_identical_runs_give_every_delta_exactly_zero_and_no_change(tmp_path):
    rows = _scored_rows(300, 1, psnr=True)
    a = write_audit(tmp_path / "a", rows, scores=("ssim", "psnr"))
    b = write_audit(tmp_path / "b", rows, scores=("ssim", "psnr"))
    outcome, compared, summary = _compare(tmp_path, a, b)
    assert summary["join"]["mode"] == "aligned" and summary["metrics"] == ["ssim", "psnr"]
    for metric in ("ssim", "psnr"):
        assert all(r[f"delta_{metric}"] == 0.0 for r in compared.values())
        result = summary["results"][metric]
        assert result["overall"]["verdict"] == "no significant change"
        assert (result["overall"]["mean"], result["overall"]["ci_low"], result["overall"]["ci_high"]) == (0.0, 0.0, 0.0)
        assert {g: s["verdict"] for g, s in result["groups"].items()} == dict.fromkeys(CODECS, "no significant change")
        assert result["overall"]["worst"] == [] and result["overall"]["best"] == []
    assert outcome.exit_code == 0


def test_one_regressed_group_is_regressed_alone_with_its_pairs_worst(tmp_path):
    rows = _scored_rows(300, 2)
    a = write_audit(tmp_path / "a", rows)
    b = write_audit(tmp_path / "b", _shifted(rows, "webp", -0.05, every=2))
    _, compared, summary = _compare(tmp_path, a, b, worst_k=5)
    result = summary["results"]["ssim"]
    assert result["overall"]["verdict"] == "regressed"
    assert {g: s["verdict"] for g, s in result["groups"].items()} == {
        "webp": "regressed", "jpeg": "no significant change", "avif": "no significant change"}
    assert list(result["groups"]) [0] == "webp"  # lowest mean delta first
    webp = result["groups"]["webp"]
    assert webp["worse"]["count"] == 50 and webp["worse"]["fraction"] == pytest.approx(0.5)
    assert webp["ci_low"] < webp["mean"] < webp["ci_high"] < 0
    assert {w["pair_id"] for w in result["overall"]["worst"]} <= {p for p, r in compared.items()
                                                                  if r["group"] == "webp" and r["delta_ssim"] < 0}


def test_rows_in_one_run_only_are_counted_listed_and_kept(tmp_path):
    rows = _scored_rows(12, 3)
    a = write_audit(tmp_path / "a", rows + [row("only-in-baseline", 0.8)])
    b = write_audit(tmp_path / "b", [row("only-in-candidate-2", 0.7), *rows, row("only-in-candidate-1", 0.9)],
                    plan="plan-2")
    _, compared, summary = _compare(tmp_path, a, b)
    pairs = summary["pairs"]
    assert summary["join"]["mode"] == "partitioned"
    assert (pairs["baseline_rows"], pairs["candidate_rows"], pairs["pair_ids"]) == (13, 14, 15)
    assert (pairs["both_ok"], pairs["baseline_only"], pairs["candidate_only"]) == (12, 1, 2)
    assert [e["pair_id"] for e in summary["examples"]["baseline_only"]] == ["only-in-baseline"]
    assert [e["pair_id"] for e in summary["examples"]["candidate_only"]] == [
        "only-in-candidate-1", "only-in-candidate-2"]
    assert len(compared) == 15
    lone = compared["only-in-baseline"]
    assert (lone["outcome"], lone["baseline_status"], lone["candidate_status"]) == ("baseline_only", "ok", None)
    assert (lone["baseline_ssim"], lone["candidate_ssim"], lone["delta_ssim"]) == (0.8, None, None)
    assert compared["only-in-candidate-1"]["outcome"] == "candidate_only"
    assert summary["results"]["ssim"]["overall"]["scored_in_baseline_only"] == 1
    assert summary["results"]["ssim"]["overall"]["scored_in_candidate_only"] == 2
    assert summary["results"]["ssim"]["overall"]["paired"] == 12


def test_status_changes_are_counted_listed_and_never_scored(tmp_path):
    rows = _scored_rows(9, 4)
    a_rows = rows + [row("breaks", 0.9), row("heals", status="unreadable"), row("stays-broken", status="missing")]
    b_rows = rows + [row("breaks", status="size_mismatch"), row("heals", 0.95),
                     row("stays-broken", status="unreadable")]
    a, b = write_audit(tmp_path / "a", a_rows), write_audit(tmp_path / "b", b_rows)
    outcome, compared, summary = _compare(tmp_path, a, b, max_newly_failed=0)
    assert {k: summary["pairs"][k] for k in ("both_ok", "newly_failed", "fixed", "both_failed")} == {
        "both_ok": 9, "newly_failed": 1, "fixed": 1, "both_failed": 1}
    assert summary["pairs"]["status_changed"] == 2
    broken = summary["examples"]["newly_failed"][0]
    assert (broken["pair_id"], broken["baseline_status"], broken["candidate_status"]) == (
        "breaks", "ok", "size_mismatch")
    assert broken["candidate_error"].startswith("size_mismatch")
    assert summary["examples"]["fixed"][0]["pair_id"] == "heals"
    for pair_id, outcome_name in (("breaks", "newly_failed"), ("heals", "fixed"), ("stays-broken", "both_failed")):
        assert (compared[pair_id]["outcome"], compared[pair_id]["delta_ssim"]) == (outcome_name, None)
    assert [v.gate for v in outcome.violations] == ["max_newly_failed"] and outcome.exit_code == EXIT_COMPARE_GATE


# ---------------------------------------------------------------------------------------------------------
# Metric settings
# ---------------------------------------------------------------------------------------------------------

def test_differing_metric_settings_are_refused_naming_each_difference(tmp_path):
    rows = _scored_rows(6, 5)
    a = write_audit(tmp_path / "a", rows)
    other = SSIMConfig(color="y", precision="fp64").describe()
    b = write_audit(tmp_path / "b", rows, metric=other)
    with pytest.raises(CompareRefusedError) as refused:
        _compare(tmp_path, a, b)
    message = str(refused.value)
    assert "color: baseline 'rgb', candidate 'y'" in message
    assert "precision: baseline 'fp32', candidate 'fp64'" in message
    assert "compare.allow_different_metric=true" in message
    assert not (tmp_path / "out" / "compare.parquet").exists()


def test_allowed_metric_differences_are_stated_at_the_top_of_the_report(tmp_path):
    rows = _scored_rows(6, 5)
    a = write_audit(tmp_path / "a", rows)
    b = write_audit(tmp_path / "b", rows, metric=SSIMConfig(data_range=4095).describe())
    outcome, _, summary = _compare(tmp_path, a, b, allow_different_metric=True, report=True, report_worst_k=0)
    assert summary["metric_settings"]["same"] is False
    assert any("data_range: baseline 'auto', candidate 4095.0" in d for d in summary["metric_settings"]["differences"])
    assert summary["warnings"][0].startswith("the runs' metric settings differ")
    page = Path(outcome.html_path).read_text()
    body = page[page.index("<body>"):]
    assert body.index('id="warnings"') < body.index('id="verdict"')
    assert "data_range: baseline &#x27;auto&#x27;, candidate 4095.0" in body


def test_settings_of_a_metric_not_compared_do_not_refuse(tmp_path):
    rows = _scored_rows(6, 6, psnr=True)
    older = {k: v for k, v in SSIMConfig().describe(["ssim"]).items()
             if k not in ("psnr", "ms_ssim", "ms_ssim_weights")}
    a = write_audit(tmp_path / "a", rows, metric=older, legacy=True)  # a run from before PSNR was recorded
    b = write_audit(tmp_path / "b", rows, scores=("ssim", "psnr"))
    _, _, summary = _compare(tmp_path, a, b)
    assert summary["metrics"] == ["ssim"] and summary["metric_settings"]["same"]
    changed = SSIMConfig().describe(["ssim", "psnr"])
    changed["psnr"] = {**changed["psnr"], "precision": "fp64"}
    c = write_audit(tmp_path / "c", rows, scores=("ssim", "psnr"), metric=changed)
    with pytest.raises(CompareRefusedError, match=r"psnr.precision: baseline 'fp32', candidate 'fp64'"):
        _compare(tmp_path, b, c)
    _, _, summary = _compare(tmp_path, b, c, "ssim-only", metrics=["ssim"])
    assert summary["metrics"] == ["ssim"]


def test_metrics_are_those_both_runs_computed(tmp_path):
    rows = _scored_rows(6, 7, psnr=True)
    a = write_audit(tmp_path / "a", rows, scores=("ssim", "psnr"))
    b = write_audit(tmp_path / "b", rows)  # every column, PSNR's null: the metric block says only ssim
    assert "psnr" in pq.read_schema(Path(b) / "ssim.parquet").names
    _, compared, summary = _compare(tmp_path, a, b)
    assert summary["metrics"] == ["ssim"] and "delta_psnr" not in next(iter(compared.values()))
    assert summary["metric_settings"]["same"]  # which metrics were computed is no setting
    with pytest.raises(CompareRefusedError, match=r"compare.metrics=\['psnr'\] must name metrics both runs computed; "
                                                  r"\['psnr'\] missing from candidate"):
        _compare(tmp_path, a, b, "psnr", metrics=["psnr"])


def test_every_metric_both_runs_computed_is_compared(tmp_path):
    rows = [dict(r, ms_ssim=r["ssim"] ** 2) for r in _scored_rows(60, 17, psnr=True)]
    moved = [dict(r, psnr=r["psnr"] - 0.5, ms_ssim=r["ms_ssim"] - 0.01) if r["codec"] == "avif" else r for r in rows]
    every = ("ssim", "psnr", "ms_ssim")
    a, b = write_audit(tmp_path / "a", rows, scores=every), write_audit(tmp_path / "b", moved, scores=every)
    _, compared, summary = _compare(tmp_path, a, b)
    assert summary["metrics"] == list(every)
    results = summary["results"]
    assert results["ssim"]["overall"]["verdict"] == "no significant change"
    for metric, drop in (("psnr", -0.5), ("ms_ssim", -0.01)):
        verdicts = {g: s["verdict"] for g, s in results[metric]["groups"].items()}
        assert verdicts == {"avif": "regressed", "jpeg": "no significant change", "webp": "no significant change"}
        assert results[metric]["groups"]["avif"]["mean"] == pytest.approx(drop)
        assert all(r[f"delta_{metric}"] == pytest.approx(drop if r["group"] == "avif" else 0.0)
                   for r in compared.values())
    # Old runs (only the columns they computed, no list) are compared on the columns both hold.
    c = write_audit(tmp_path / "c", rows, scores=("ssim", "ms_ssim"), legacy=True)
    d = write_audit(tmp_path / "d", moved, scores=("ssim", "ms_ssim"), legacy=True)
    _, _, summary = _compare(tmp_path, c, d, "legacy")
    assert summary["metrics"] == ["ssim", "ms_ssim"]
    assert summary["results"]["ms_ssim"]["groups"]["avif"]["verdict"] == "regressed"


# ---------------------------------------------------------------------------------------------------------
# PSNR's +inf and MS-SSIM's nulls
# ---------------------------------------------------------------------------------------------------------

def test_psnr_infinities_give_zero_or_a_counted_transition_never_nan(tmp_path):
    inf = math.inf
    pairs = {"same-identical": (inf, inf), "no-longer-identical": (inf, 41.0), "now-identical": (35.0, inf),
             "finite": (40.0, 38.0), "finite-same": (30.0, 30.0)}
    a = write_audit(tmp_path / "a", [row(p, 0.9, psnr=v[0]) for p, v in pairs.items()], scores=("ssim", "psnr"))
    b = write_audit(tmp_path / "b", [row(p, 0.9, psnr=v[1]) for p, v in pairs.items()], scores=("ssim", "psnr"))
    _, compared, summary = _compare(tmp_path, a, b)
    deltas = {p: compared[p]["delta_psnr"] for p in pairs}
    assert deltas == {"same-identical": 0.0, "no-longer-identical": -inf, "now-identical": inf, "finite": -2.0,
                      "finite-same": 0.0}
    stats = summary["results"]["psnr"]["overall"]
    assert (stats["paired"], stats["finite"], stats["became_finite"], stats["became_infinite"]) == (5, 3, 1, 1)
    assert stats["mean"] == pytest.approx(-2.0 / 3)  # finite deltas only: 0, -2, 0
    assert stats["worse"]["count"] == 2 and stats["better"]["count"] == 1  # -inf and -2 worse; +inf better
    assert all(w["pair_id"] == "finite" for w in stats["worst"])  # ranked by finite deltas
    text = (tmp_path / "out" / "compare.json").read_text()
    assert "NaN" not in text and "Infinity" not in text


def test_a_metric_scored_in_one_run_only_is_counted_apart(tmp_path):
    a = write_audit(tmp_path / "a", [row("small", 0.8, ms_ssim=None), row("big", 0.9, ms_ssim=0.95)],
                    scores=("ssim", "ms_ssim"))
    b = write_audit(tmp_path / "b", [row("small", 0.8, ms_ssim=0.9), row("big", 0.9, ms_ssim=0.9)],
                    scores=("ssim", "ms_ssim"))
    _, compared, summary = _compare(tmp_path, a, b)
    stats = summary["results"]["ms_ssim"]["overall"]
    assert (stats["paired"], stats["scored_in_candidate_only"], stats["scored_in_baseline_only"]) == (1, 1, 0)
    assert compared["small"]["delta_ms_ssim"] is None and compared["small"]["outcome"] == "both_ok"


# ---------------------------------------------------------------------------------------------------------
# Join modes
# ---------------------------------------------------------------------------------------------------------

def _comparable(summary: dict) -> dict:
    """compare.json without what differs between join modes by design (mode, timing, dates)."""
    kept = {k: v for k, v in summary.items() if k not in ("join", "seconds", "created", "config")}
    text = json.dumps(kept, sort_keys=True)
    # The two runs' means are sums in row order (float64): equal to ~1e-15, not bit for bit.
    return json.loads(re.sub(r'"(baseline|candidate)_mean": (-?[0-9.e-]+)',
                             lambda m: f'"{m.group(1)}_mean": {float(m.group(2)):.12g}', text))


def test_aligned_and_partitioned_joins_give_the_same_comparison(tmp_path):
    rows = _scored_rows(2000, 8, psnr=True)
    rows[5] = row(rows[5]["pair_id"], status="missing", codec=rows[5]["codec"])
    changed = _shifted(rows, "avif", -0.02, every=3)
    changed[7] = row(changed[7]["pair_id"], status="unreadable", codec=changed[7]["codec"])
    a = write_audit(tmp_path / "a", rows, scores=("ssim", "psnr"), row_group_size=333)
    b = write_audit(tmp_path / "b", changed, scores=("ssim", "psnr"), row_group_size=250)
    options = dict(bootstrap_resamples=200, bootstrap_max_sample=500, worst_k=7, examples_k=3, batch_rows=97)
    _, aligned_rows, aligned = _compare(tmp_path, a, b, "aligned", **options)
    _, split_rows, split = _compare(tmp_path, a, b, "split", join="partitioned", partition_rows=300, **options)
    assert (aligned["join"]["mode"], split["join"]["mode"]) == ("aligned", "partitioned")
    assert split["join"]["partitions"] == 7 and split["join"]["spilled_bytes"] > 0
    assert aligned["join"]["spilled_bytes"] is None
    assert _comparable(aligned) == _comparable(split)
    assert aligned_rows == split_rows
    order = pq.read_table(tmp_path / "aligned" / "compare.parquet")["pair_id"].to_pylist()
    assert order == [r["pair_id"] for r in rows]  # the aligned mode keeps plan order


def test_a_shared_plan_with_rows_in_another_order_is_joined_partitioned(tmp_path, capsys):
    rows = _scored_rows(50, 9)
    a = write_audit(tmp_path / "a", rows)
    b = write_audit(tmp_path / "b", list(reversed(rows)))  # same plan fingerprint, but not the same order
    _, compared, summary = _compare(tmp_path, a, b)
    assert summary["join"]["mode"] == "partitioned" and "their rows differ" in summary["join"]["why"]
    assert summary["pairs"]["both_ok"] == 50 and all(r["delta_ssim"] == 0.0 for r in compared.values())
    assert "joined partitioned instead" in capsys.readouterr().err


def test_a_pair_id_twice_in_a_run_is_refused(tmp_path):
    rows = _scored_rows(5, 10)
    a = write_audit(tmp_path / "a", rows + [row(rows[2]["pair_id"], 0.5)])
    b = write_audit(tmp_path / "b", rows, plan="other")
    with pytest.raises(CompareRefusedError, match=r"must hold each pair_id once, got 'pair-00002'"):
        _compare(tmp_path, a, b)


def test_no_results_table_is_refused_naming_the_path(tmp_path):
    a = write_audit(tmp_path / "a", _scored_rows(3, 11))
    with pytest.raises(CompareRefusedError, match=r"candidate must be an audit's output folder holding ssim.parquet"):
        _compare(tmp_path, a, str(tmp_path / "nothing"))


def test_pair_hashes_are_stable_and_spread():
    ids = pa.array([f"img/{i}/jpeg/{q}" for i in range(2000) for q in (10, 90)])
    hashes = pair_hashes(ids)
    assert hashes.tolist() == pair_hashes(pa.chunked_array([ids.slice(0, 7), ids.slice(7)])).tolist()
    assert len(set(hashes.tolist())) == len(ids)
    counts = np.bincount((hashes % np.uint64(8)).astype(int), minlength=8)
    assert counts.min() > 0.8 * len(ids) / 8  # partitions are about equal
    small = pa.array(["", "a"])
    assert pair_hashes(small.cast(pa.large_string())).tolist() == pair_hashes(small).tolist()


# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------

def test_statistics_are_exact_and_the_interval_is_seeded(tmp_path):
    rows = _scored_rows(600, 12)
    rng = np.random.default_rng(3)
    changed = [dict(r, ssim=r["ssim"] + float(rng.normal(-0.002, 0.01))) for r in rows]
    a, b = write_audit(tmp_path / "a", rows), write_audit(tmp_path / "b", changed)
    _, compared, summary = _compare(tmp_path, a, b, epsilon={"ssim": 0.005, "psnr": 0.1, "ms_ssim": 0.001})
    deltas = np.array([r["delta_ssim"] for r in compared.values()])
    stats = summary["results"]["ssim"]["overall"]
    assert stats["mean"] == pytest.approx(deltas.mean(), abs=1e-15)
    for q in (1, 5, 50, 99):
        assert stats["percentiles"][f"p{q}"] == np.percentile(np.sort(deltas), q)
    assert stats["worse"]["count"] == int((deltas < -0.005).sum())
    assert stats["ci_low"] < stats["mean"] < stats["ci_high"]
    assert stats["ci_high"] - stats["ci_low"] == pytest.approx(2 * 1.96 * deltas.std() / math.sqrt(600), rel=0.2)
    _, _, again = _compare(tmp_path, a, b, "again", epsilon={"ssim": 0.005, "psnr": 0.1, "ms_ssim": 0.001})
    assert again["results"]["ssim"] == summary["results"]["ssim"]
    _, _, reseeded = _compare(tmp_path, a, b, "reseeded", seed=1)
    assert reseeded["results"]["ssim"]["overall"]["ci_low"] != stats["ci_low"]


@pytest.mark.parametrize("kind", ["normal", "ties", "mostly_zero", "tiny"])
def test_order_statistics_from_the_spill_are_numpys_percentiles(tmp_path, kind):
    rng = np.random.default_rng(21)
    n = 20_011
    values = {"normal": rng.normal(0.0, 0.01, n), "ties": np.round(rng.normal(0.0, 3.0, n)) / 7,
              "mostly_zero": np.where(rng.random(n) < 0.7, 0.0, rng.normal(-1e-3, 1e-4, n)),
              "tiny": rng.normal(0.0, 1e-300, n)}[kind]
    codes = rng.integers(0, 4, n).astype(np.int32)
    codes[codes == 3] = 2  # a code without deltas: group 3 is never asked for
    spill = DeltaSpill(str(tmp_path), kind)
    for start in range(0, n, 997):
        spill.add(values[start:start + 997], codes[start:start + 997])
    sizes = {ALL: n, **{c: int((codes == c).sum()) for c in range(3)}}
    qs = (0, 1, 5, 25, 50, 75, 95, 99, 100)
    wanted = {c: sorted({r for lo, hi, _ in linear_positions(size, qs) for r in (lo, hi)}) for c, size in sizes.items()}
    # Budgets this small force several counting reads before the few keys left are collected.
    found = order_statistics(spill, wanted, sizes, chunk_rows=3000, bin_budget=256, collect_budget=600)
    for code, size in sizes.items():
        group = values if code == ALL else values[codes == code]
        mine = [linear_value(found[(code, lo)], found[(code, hi)], w) for lo, hi, w in linear_positions(size, qs)]
        assert mine == np.percentile(group, qs).tolist(), code  # bit for bit
    with pytest.raises(ValueError, match="rank must be in"):
        order_statistics(spill, {0: [sizes[0]]}, sizes)
    spill.remove()
    assert list(tmp_path.iterdir()) == []


def test_the_kept_state_does_not_grow_with_rows(tmp_path):
    rows = _scored_rows(3000, 22)
    a = write_audit(tmp_path / "a", rows)
    b = write_audit(tmp_path / "b", _shifted(rows, "jpeg", -0.01, every=2))
    spill = tmp_path / "spill"
    spill.mkdir()
    _, _, summary = _compare(tmp_path, a, b, bootstrap_max_sample=100, batch_rows=250, spill_dir=str(spill))
    assert list(spill.iterdir()) == []  # the deltas spilled to disk are removed at the end
    sample = HashSample(100)
    hashes = pair_hashes(pa.array([f"p{i}" for i in range(30_000)]))
    group = np.arange(30_000) % 3
    for start in range(0, 30_000, 500):
        sample.add(hashes[start:start + 500], np.arange(start, start + 500, dtype=float), group[start:start + 500])
        assert sample.hashes.size <= 2 * 100 * 4 + 500  # k per group and overall, pruned at twice that
    # The bootstrap sample of a group: the deltas of its pairs with the k smallest hashes, whatever the order.
    mine = np.flatnonzero(group == 1)
    chosen = np.sort(mine[np.argsort(hashes[mine], kind="stable")[:100]].astype(float))
    assert sample.values(1).tolist() == chosen.tolist()
    # Above bootstrap_max_sample the interval still has the width of n (2 x 1.96 sigma / sqrt(n)).
    jpeg = summary["results"]["ssim"]["groups"]["jpeg"]
    deltas = np.array([r["ssim"] for r in _shifted(rows, "jpeg", -0.01, every=2)]) - np.array([r["ssim"] for r in rows])
    spread = deltas[np.arange(3000) % 3 == 0].std()
    assert jpeg["ci_high"] - jpeg["ci_low"] == pytest.approx(2 * 1.96 * spread / math.sqrt(1000), rel=0.25)
    assert jpeg["ci_low"] < jpeg["mean"] < jpeg["ci_high"]


def test_the_m_out_of_n_bootstrap_keeps_the_width_of_n():
    values = np.sort(np.random.default_rng(5).normal(0.0, 1.0, 200_000))
    low, high = bootstrap_interval(values, resamples=400, max_sample=5_000, confidence=0.95,
                                   seed=seed_for(0, "x", None))
    # The width of the mean's 95% interval is 2 x 1.96 sigma / sqrt(n); 400 resamples estimate it to ~10%.
    assert high - low == pytest.approx(2 * 1.96 / math.sqrt(values.size), rel=0.15)
    assert low < values.mean() < high


def test_within_k_keeps_ties_so_the_final_choice_is_by_pair_id():
    key = np.array([-0.1, -0.3, -0.3, -0.3, -0.2])
    codes = np.zeros(5, dtype=np.int32)
    assert within_k(key, codes, 2).tolist() == [1, 2, 3]


def test_worst_and_best_are_k_each_by_delta_then_pair_id(tmp_path):
    rows = [row(f"p{i}", 0.9, codec="a" if i < 6 else "b") for i in range(10)]
    moved = [-0.3, -0.1, -0.3, 0.2, 0.0, -0.05, 0.1, 0.4, -0.2, 0.0]
    changed = [dict(r, ssim=0.9 + d) for r, d in zip(rows, moved)]
    a, b = write_audit(tmp_path / "a", rows), write_audit(tmp_path / "b", changed)
    _, _, summary = _compare(tmp_path, a, b, worst_k=2)
    overall = summary["results"]["ssim"]["overall"]
    assert [w["pair_id"] for w in overall["worst"]] == ["p0", "p2"]
    assert [w["pair_id"] for w in overall["best"]] == ["p7", "p3"]
    assert [w["pair_id"] for w in summary["results"]["ssim"]["groups"]["b"]["worst"]] == ["p8"]
    assert overall["worst"][0]["baseline_distorted"] == "dist/p0.png"


# ---------------------------------------------------------------------------------------------------------
# Gates
# ---------------------------------------------------------------------------------------------------------

def test_gate_exit_codes_do_not_clash_with_the_audits():
    assert EXIT_COMPARE_GATE == 6
    assert EXIT_COMPARE_GATE not in (audit_gates.EXIT_OK, audit_gates.EXIT_QUALITY_GATE, audit_gates.EXIT_FAILURE_GATE,
                                     audit_gates.EXIT_INCOMPLETE, 1, 2)


@pytest.mark.parametrize(("options", "gates"), [
    ({}, []),
    ({"max_mean_drop": {"ssim": 0.01}}, []),  # the mean drops by 0.00833
    ({"max_mean_drop": {"ssim": 0.005}}, [("max_mean_drop.ssim", None)]),
    ({"max_fraction_worse": {"ssim": 1 / 3}}, []),  # exactly a third worse: allowed
    ({"max_fraction_worse": {"ssim": 0.3}}, [("max_fraction_worse.ssim", None)]),
    # ε above the drop: no pair is worse by more than ε (the deltas are -0.025 to within float rounding).
    ({"max_fraction_worse": {"ssim": 0.0}, "epsilon": {"ssim": 0.026, "psnr": 0.1, "ms_ssim": 0.001}}, []),
    ({"max_fraction_worse": {"ssim": 0.0}, "epsilon": {"ssim": 0.024, "psnr": 0.1, "ms_ssim": 0.001}},
     [("max_fraction_worse.ssim", None)]),
    ({"group_max_mean_drop": {"ssim": 0.02}}, [("group_max_mean_drop.ssim", "webp")]),
    ({"group_max_fraction_worse": {"ssim": 0.5}}, [("group_max_fraction_worse.ssim", "webp")]),
])
def test_gates_fail_with_their_exit_code_and_pass_with_zero(tmp_path, options, gates):
    rows = _scored_rows(300, 13)
    a = write_audit(tmp_path / "a", rows)
    b = write_audit(tmp_path / "b", _shifted(rows, "webp", -0.025))  # a third of the pairs, each by 0.025
    outcome, _, summary = _compare(tmp_path, a, b, **options)
    assert [(v.gate, v.group) for v in outcome.violations] == gates
    assert outcome.exit_code == (EXIT_COMPARE_GATE if gates else 0) == summary["gates"]["exit_code"]


def test_a_gate_on_a_group_without_paired_pairs_fails(tmp_path):
    rows = _scored_rows(6, 14)
    failing = [row(r["pair_id"], status="missing", codec=r["codec"]) if r["codec"] == "jpeg" else r for r in rows]
    a, b = write_audit(tmp_path / "a", rows), write_audit(tmp_path / "b", failing)
    outcome, _, _ = _compare(tmp_path, a, b, group_max_mean_drop={"ssim": 0.5})
    assert [(v.gate, v.group) for v in outcome.violations] == [("group_max_mean_drop.ssim", "jpeg")]
    assert "cannot be shown" in outcome.violations[0].message


def test_group_by_chooses_and_refuses(tmp_path):
    rows = _scored_rows(6, 15)
    a = write_audit(tmp_path / "a", rows, group_by=None)
    b = write_audit(tmp_path / "b", rows, group_by=None)
    _, compared, summary = _compare(tmp_path, a, b)
    assert summary["group_by"] is None and summary["results"]["ssim"]["groups"] == {}
    assert next(iter(compared.values()))["group"] is None
    _, _, summary = _compare(tmp_path, a, b, "by-codec", group_by="codec")
    assert sorted(summary["results"]["ssim"]["groups"]) == sorted(CODECS)
    with pytest.raises(CompareRefusedError, match="compare.group_by must name a column of either run, got 'lens'"):
        _compare(tmp_path, a, b, "lens", group_by="lens")
    with pytest.raises(CompareRefusedError, match="need a group column"):
        _compare(tmp_path, a, b, "gate", group_max_mean_drop={"ssim": 0.1})
    with pytest.raises(CompareRefusedError, match="compare.max_groups=2"):
        _compare(tmp_path, a, b, "many", group_by="codec", max_groups=2)


# ---------------------------------------------------------------------------------------------------------
# Config and report
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("options", "message"), [
    ({"epsilon": {"ssim": -0.1, "psnr": 0.1, "ms_ssim": 0.001}}, "compare.epsilon.ssim must be a finite number >= 0"),
    ({"epsilon": {"lpips": 0.1}}, "compare.epsilon must be keyed by metric names"),
    ({"max_fraction_worse": {"ssim": 1.5}}, r"compare.max_fraction_worse.ssim must be in \[0, 1\]"),
    ({"max_mean_drop": {"ssim": float("nan")}}, "compare.max_mean_drop.ssim must be a finite number"),
    ({"metrics": ["vmaf"]}, "compare.metrics must list some of"),
    ({"confidence": 1.0}, r"compare.confidence must be in \(0, 1\)"),
    ({"join": "sorted"}, "compare.join must be one of"),
    ({"baseline_storage_options": {"secret": "abc"}}, "credential"),
])
def test_invalid_options_are_refused_naming_them(options, message):
    with pytest.raises(ValueError, match=message):
        CompareConfig(**options)


def test_the_config_composes_with_per_metric_overrides():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ssim_ray.compare import register_compare_configs

    register_compare_configs()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose("compare", overrides=["baseline=/a", "candidate=s3://b/run", "compare.output_url=/out",
                                            "compare.max_mean_drop.ssim=0.01", "compare.epsilon.psnr=0.5",
                                            "compare.metrics=[ssim,psnr]"])
        job = OmegaConf.to_object(cfg)
    assert isinstance(job, CompareJobConfig) and job.candidate == "s3://b/run"
    assert job.compare.max_mean_drop == {"ssim": 0.01, "psnr": None, "ms_ssim": None}
    assert job.compare.epsilon["psnr"] == 0.5 and job.compare.metrics == ["ssim", "psnr"]


def test_every_number_on_the_page_is_the_one_in_compare_json(tmp_path):
    rows = _scored_rows(120, 16, psnr=True)
    a = write_audit(tmp_path / "a", rows + [row("gone", 0.5)], scores=("ssim", "psnr"))
    b = write_audit(tmp_path / "b", _shifted(rows, "jpeg", -0.04, every=2) + [row("new", 0.6)],
                    scores=("ssim", "psnr"), plan="plan-2")
    outcome, _, summary = _compare(tmp_path, a, b, report=True, report_worst_k=2)
    page = Path(outcome.html_path).read_text()
    spans = re.findall(r'data-key="([^"]+)" data-value="([^"]+)"', page)
    assert len(spans) > 100
    for key, value in spans:
        found = summary
        for part in json.loads(html.unescape(key)):
            found = found[part]
        assert found == json.loads(html.unescape(value)), key
    assert page.index('id="verdict"') < page.index('id="pairing"') < page.index('id="regressions"')
    # The fixture's pairs have no image files: each side of each panel says why it shows none.
    assert page.count('class="pair"') == 2 and page.count("no images: pair not found in its shard") == 4


def _exit_code_rows(text: str, heading: str) -> dict:
    """The exit-code table of a README section: code -> meaning."""
    section = text.split(heading, 1)[1].split("\n### ", 1)[0]
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^\| (\d+) \| (.+) \|$", section, re.MULTILINE)}


def test_the_readme_documents_the_compare_exit_codes_beside_the_audits():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    audit = _exit_code_rows(text, "### Resume, faults, exit codes")
    compare = _exit_code_rows(text, "### Compare two audits")
    audit_codes = {audit_gates.EXIT_OK, 1, audit_gates.EXIT_QUALITY_GATE, audit_gates.EXIT_FAILURE_GATE,
                   audit_gates.EXIT_INCOMPLETE}
    assert set(audit) == audit_codes | {EXIT_COMPARE_GATE} and "jobs.compare" in audit[EXIT_COMPARE_GATE]
    assert set(compare) == {0, 1, EXIT_COMPARE_GATE}
    assert "compare.max_mean_drop" in compare[EXIT_COMPARE_GATE] and "compare.max_fraction_worse" in compare[6]


def test_a_folder_ssim_parquet_from_a_large_merge_compares_like_the_file(tmp_path):
    """Above output.merge.SINGLE_FILE_MAX_ROWS the merge writes ssim.parquet as a folder of part files (plan
    order by name): the comparison reads it as the same rows, here a baseline split into three files."""
    import pyarrow.parquet as pq

    rows = _scored_rows(300, 3)
    a = write_audit(tmp_path / "a", rows)
    b = write_audit(tmp_path / "b", _shifted(rows, "webp", -0.05, every=2))
    _, expected, expected_summary = _compare(tmp_path / "file", a, b)
    merged = Path(a) / "ssim.parquet"
    table = pq.read_table(merged)
    merged.unlink()
    merged.mkdir()
    for index, start in enumerate(range(0, table.num_rows, 120)):
        pq.write_table(table.slice(start, 120), merged / f"part-{index:06d}.parquet")
    _, compared, summary = _compare(tmp_path / "folder", a, b)
    assert summary["join"]["mode"] == expected_summary["join"]["mode"] == "aligned"
    assert compared == expected
    got, want = summary["results"]["ssim"]["overall"], expected_summary["results"]["ssim"]["overall"]
    assert got.keys() == want.keys() and got["verdict"] == want["verdict"] == "regressed"
    for key, value in want.items():  # means are sums in batch order: the last bit may differ across file bounds
        assert got[key] == (pytest.approx(value, rel=1e-12, abs=1e-15) if isinstance(value, float) else value), key
