"""Quality gates (ssim_ray.output.gates): each gate passes and fails on a real merged audit, with its exit code."""

from __future__ import annotations

import numpy as np
import pytest
from report_fixtures import in_shards, photo_rows

from ssim_ray.config import AuditConfig, SummaryConfig
from ssim_ray.output.commit import write_shard
from ssim_ray.output.gates import (
    EXIT_FAILURE_GATE,
    EXIT_INCOMPLETE,
    EXIT_OK,
    EXIT_QUALITY_GATE,
    evaluate_gates,
    exit_code,
)
from ssim_ray.output.merge import RunInfo, merge
from ssim_ray.output.schema import rows_to_table
from ssim_ray.output.table_stats import shard_stats

PASSTHROUGH = ["distortion", "photo"]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A merged-ready output of the real photo results: 30 ok pairs, 3 failures, grouped by photo."""
    out = tmp_path_factory.mktemp("out")
    rows = photo_rows(tmp_path_factory.mktemp("photos"))
    shards = in_shards(rows, [11, 11, 11])
    cfg = SummaryConfig(group_by="photo")
    for shard_id, shard_rows in shards.items():
        table = rows_to_table(shard_rows, PASSTHROUGH)
        write_shard(str(out), shard_id, table, stats=shard_stats(table, cfg))
    return str(out), rows, list(shards), cfg


def _gated(written, audit: AuditConfig, plan=None, **merge_options):
    out, rows, shard_ids, cfg = written
    info = RunInfo(metric={"name": "wang2004"}, plan_fingerprint="f", total_pairs=len(rows))
    summary = merge(out, plan_shard_ids=plan or shard_ids, run_info=info, summary_cfg=cfg, audit_cfg=audit,
                    **merge_options)
    violations = evaluate_gates(summary, audit)
    return violations, exit_code(violations)


def _scores(rows, photo=None):
    return np.array([r["ssim"] for r in rows if r["status"] == "ok" and photo in (None, r["photo"])])


def test_no_gates_pass(written):
    assert _gated(written, AuditConfig()) == ([], EXIT_OK)


def test_min_ssim_without_a_fraction_fails_on_one_pair_below(written):
    scores = _scores(written[1])
    lowest = float(scores.min())
    assert _gated(written, AuditConfig(min_ssim=lowest))[1] == EXIT_OK  # a pair exactly at the limit passes
    violations, code = _gated(written, AuditConfig(min_ssim=float(np.nextafter(lowest, 1))))
    assert code == EXIT_QUALITY_GATE
    assert [(v.gate, v.group, v.observed) for v in violations] == [("min_ssim", None, 1 / 30)]
    assert "1 of 30 ok pairs in the run" in violations[0].message


def test_min_ssim_with_a_fraction(written):
    scores = _scores(written[1])
    below = int((scores < 0.8).sum())
    assert 0 < below < 30
    assert _gated(written, AuditConfig(min_ssim=0.8, max_fraction_below=below / 30))[1] == EXIT_OK
    violations, code = _gated(written, AuditConfig(min_ssim=0.8, max_fraction_below=(below - 1) / 30))
    assert code == EXIT_QUALITY_GATE
    assert violations[0].observed == pytest.approx(below / 30)


def test_group_gate_names_each_failing_group(written):
    rows = written[1]
    photos = sorted({r["photo"] for r in rows})
    medians = {p: float(np.median(_scores(rows, p))) for p in photos}
    threshold = sorted(medians.values())[2]  # some photos have over half their pairs below, others not
    failing = sorted(p for p in photos if (_scores(rows, p) < threshold).mean() > 0.5)
    assert 0 < len(failing) < len(photos)
    violations, code = _gated(written, AuditConfig(group_min_ssim=threshold, group_max_fraction_below=0.5))
    assert code == EXIT_QUALITY_GATE
    assert sorted(v.group for v in violations) == failing
    assert _gated(written, AuditConfig(group_min_ssim=-1.0))[1] == EXIT_OK


def _psnrs(rows, photo=None):
    return np.array([r["psnr"] for r in rows if r["status"] == "ok" and photo in (None, r["photo"])])


def test_min_psnr_follows_the_rules_of_min_ssim_with_its_own_fraction_and_group_settings(written):
    """PSNR (scikit-image's values of the real photo pairs) against audit.min_psnr, overall and per photo."""
    rows = written[1]
    psnrs = _psnrs(rows)
    lowest, threshold = float(psnrs.min()), float(np.median(psnrs))
    assert _gated(written, AuditConfig(min_psnr=lowest))[1] == EXIT_OK  # a pair exactly at the limit passes
    violations, code = _gated(written, AuditConfig(min_psnr=float(np.nextafter(lowest, 100))))
    assert code == EXIT_QUALITY_GATE and [(v.gate, v.observed) for v in violations] == [("min_psnr", 1 / 30)]
    assert "have PSNR below" in violations[0].message
    below = int((psnrs < threshold).sum())
    assert _gated(written, AuditConfig(min_psnr=threshold, psnr_max_fraction_below=below / 30))[1] == EXIT_OK
    assert _gated(written, AuditConfig(min_psnr=threshold, psnr_max_fraction_below=(below - 1) / 30))[1] == 3
    # An SSIM gate at the same number does not answer for PSNR: each metric has its own counts.
    both = AuditConfig(min_ssim=0.5, min_psnr=0.5)
    assert [v.gate for v in _gated(written, both)[0]] == ["min_ssim"]  # some SSIM < 0.5, no PSNR < 0.5 dB
    photos = sorted({r["photo"] for r in rows})
    failing = sorted(p for p in photos if (_psnrs(rows, p) < threshold).mean() > 0.5)
    assert 0 < len(failing) < len(photos)
    violations, _ = _gated(written, AuditConfig(group_min_psnr=threshold, group_psnr_max_fraction_below=0.5))
    assert sorted(v.group for v in violations) == failing


def test_min_ms_ssim_without_a_measured_pair_cannot_pass(written):
    """Every crop is too small for five scales: no pair is judged, so the gate cannot show quality."""
    violations, code = _gated(written, AuditConfig(min_ms_ssim=0.5))
    assert code == EXIT_QUALITY_GATE and [v.gate for v in violations] == ["min_ms_ssim"]
    assert "has no ok pair judged by MS-SSIM" in violations[0].message


def test_group_gate_needs_group_by(written):
    out, rows, shard_ids, _ = written
    info = RunInfo(metric={"name": "wang2004"}, plan_fingerprint="f", total_pairs=len(rows))
    audit = AuditConfig(group_min_ssim=0.5)
    summary = merge(out, plan_shard_ids=shard_ids, run_info=info, summary_cfg=SummaryConfig(), audit_cfg=audit)
    with pytest.raises(ValueError, match="needs summary.group_by"):
        evaluate_gates(summary, audit)


def test_max_failures(written):
    assert _gated(written, AuditConfig(max_failures=3))[1] == EXIT_OK
    violations, code = _gated(written, AuditConfig(max_failures=2))
    assert code == EXIT_FAILURE_GATE
    assert violations[0].message == "audit.max_failures=2: 3 pairs are not ok"


def test_incomplete_summary_is_its_own_violation_and_the_highest_code_wins(written):
    plan = written[2] + ["shard-00099"]
    violations, code = _gated(written, AuditConfig(min_ssim=0.99, max_failures=0), plan=plan,
                              allow_incomplete=True)
    assert [v.exit_code for v in violations] == [EXIT_INCOMPLETE, EXIT_QUALITY_GATE, EXIT_FAILURE_GATE]
    assert code == EXIT_INCOMPLETE


def test_a_summary_without_the_gate_threshold_is_refused(written):
    out, rows, shard_ids, cfg = written
    info = RunInfo(metric={"name": "wang2004"}, plan_fingerprint="f", total_pairs=len(rows))
    summary = merge(out, plan_shard_ids=shard_ids, run_info=info, summary_cfg=cfg)
    with pytest.raises(ValueError, match="needs the summary's count of ok pairs below 0.9.*merge_only"):
        evaluate_gates(summary, AuditConfig(min_ssim=0.9))


def test_no_ok_pair_violates_the_quality_gate():
    summary = {"complete": True, "pairs": {"failures": 4},
               "below": [{"threshold": 0.5, "count": 0, "ok": 0, "fraction": None}]}
    violations = evaluate_gates(summary, AuditConfig(min_ssim=0.5))
    assert exit_code(violations) == EXIT_QUALITY_GATE
    assert "no ok pair" in violations[0].message


@pytest.mark.parametrize("options, message", [
    (dict(min_ssim=1.5), r"audit.min_ssim must be in \[-1, 1\], got 1.5"),
    (dict(min_ssim=0.5, max_fraction_below=2.0), r"audit.max_fraction_below must be in \[0, 1\], got 2.0"),
    (dict(max_fraction_below=0.1), "audit.max_fraction_below needs audit.min_ssim"),
    (dict(group_max_fraction_below=0.1), "audit.group_max_fraction_below needs audit.group_min_ssim"),
    (dict(max_failures=-1), "audit.max_failures must be a finite number >= 0, got -1"),
])
def test_audit_config_is_validated(options, message):
    with pytest.raises(ValueError, match=message):
        AuditConfig(**options)


# ------------------------------------------------------------------------------------------------------
# No ok pair at all (issue 12): an audit that measured nothing does not pass silently
# ------------------------------------------------------------------------------------------------------

def test_an_audit_with_no_ok_pair_fails_with_the_failure_code_even_without_gates():
    summary = {"complete": True, "pairs": {"merged": 4, "ok": 0, "failures": 4}, "below": []}
    violations = evaluate_gates(summary, AuditConfig())
    assert [v.gate for v in violations] == ["no_ok_pairs"]
    assert exit_code(violations) == EXIT_FAILURE_GATE
    assert "no pair is ok (4 pairs, all failed)" in violations[0].message
    assert "audit.allow_no_ok_pairs=true" in violations[0].message  # says how to opt out


def test_an_empty_audit_fails_too_and_the_opt_out_passes_both(tmp_path):
    out = str(tmp_path / "empty")
    info = RunInfo(metric={"name": "wang2004"}, plan_fingerprint="f", total_pairs=0)
    summary = merge(out, plan_shard_ids=[], run_info=info, summary_cfg=SummaryConfig(), audit_cfg=AuditConfig())
    violations = evaluate_gates(summary, AuditConfig())
    assert exit_code(violations) == EXIT_FAILURE_GATE
    assert "no pair is ok (the plan has no pair)" in violations[0].message
    assert evaluate_gates(summary, AuditConfig(allow_no_ok_pairs=True)) == []
    all_failed = {"complete": True, "pairs": {"merged": 4, "ok": 0, "failures": 4}, "below": []}
    assert evaluate_gates(all_failed, AuditConfig(allow_no_ok_pairs=True)) == []
