"""An audit that scored no pair does not exit 0 (issue 12): an empty manifest, or one where every pair failed.

It exits with the failure gate's code (4) and says so, unless `audit.allow_no_ok_pairs=true`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from job_fixtures import job_config, read_summary

from ssim_ray.output.gates import EXIT_FAILURE_GATE, EXIT_OK
from ssim_ray.run import evaluate

REPO = Path(__file__).resolve().parents[1]


def _manifest(path: Path, rows: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"pair_id": pa.array([f"p{i}" for i in range(rows)], pa.string()),
                      "reference": pa.array([f"gone/r{i}.png" for i in range(rows)], pa.string()),
                      "distorted": pa.array([f"gone/d{i}.png" for i in range(rows)], pa.string())})
    pq.write_table(table, path)
    return path


def test_an_empty_manifest_exits_with_the_failure_code(tmp_path, capsys):
    manifest = _manifest(tmp_path / "data" / "empty.parquet", rows=0)
    out = tmp_path / "out"
    cfg = job_config(manifest, out)
    cfg.summary.group_by = None
    outcome = evaluate(cfg, output_url=str(out))  # nothing to compute: Ray is not even started
    assert outcome.exit_code == EXIT_FAILURE_GATE
    assert "no pair is ok (the plan has no pair)" in capsys.readouterr().err
    assert read_summary(out)["pairs"]["merged"] == 0  # every output is still written
    cfg.audit.allow_no_ok_pairs, cfg.output.mode = True, "overwrite"
    assert evaluate(cfg, output_url=str(out)).exit_code == EXIT_OK


@pytest.mark.slow  # a fresh interpreter for the job: ~10 s
def test_the_job_command_exits_4_on_an_empty_manifest_and_0_when_allowed(tmp_path):
    manifest = _manifest(tmp_path / "data" / "empty.parquet", rows=0)
    command = [sys.executable, "-m", "jobs.ssim_audit", "source=parquet", f"source.url={manifest}",
               f"hydra.run.dir={tmp_path / 'run'}", "report.enabled=false"]
    refused = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert refused.returncode == EXIT_FAILURE_GATE, refused.stderr
    assert "no pair is ok" in refused.stderr
    allowed = subprocess.run(command + ["audit.allow_no_ok_pairs=true", "output.mode=overwrite"], cwd=REPO,
                             capture_output=True, text=True, timeout=180)
    assert allowed.returncode == EXIT_OK, allowed.stderr


@pytest.mark.slow
def test_a_run_where_every_pair_failed_exits_with_the_failure_code(tmp_path, capsys):
    manifest = _manifest(tmp_path / "data" / "missing.parquet", rows=5)
    out = tmp_path / "out"
    cfg = job_config(manifest, out, num_workers=1)
    cfg.summary.group_by = None
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        outcome = evaluate(cfg, output_url=str(out))
    finally:
        ray.shutdown()
    assert outcome.summary["status_counts"] == {"missing": 5}
    assert outcome.exit_code == EXIT_FAILURE_GATE
    assert "no pair is ok (5 pairs, all failed)" in capsys.readouterr().err


def test_the_closing_summary_names_report_html_only_when_one_was_written():
    import io

    from ssim_ray.run import RunOutcome, print_summary

    summary = {"run_id": "r", "status_counts": {"ok": 1}, "shards": {"total": 1, "computed": 1, "resumed": 0}}
    lines = {}
    for written in (False, True):
        printed = io.StringIO()
        print_summary(RunOutcome(summary=summary, exit_code=0, output_url="/out", report_written=written), printed)
        lines[written] = next(line for line in printed.getvalue().splitlines() if "results:" in line)
    assert lines[False].endswith("/out/ssim.parquet, summary.json")
    assert lines[True].endswith("/out/ssim.parquet, summary.json, report.html")


def test_the_closing_summary_gives_psnr_and_ms_ssim_with_the_pairs_kept_apart():
    import io

    from ssim_ray.run import RunOutcome, print_summary

    pct = {"p5": 0.5, "p50": 0.9}
    summary = {"run_id": "r", "status_counts": {"ok": 4}, "shards": {"total": 1, "computed": 1, "resumed": 0},
               "metric": {"metrics": ["ssim", "psnr", "ms_ssim"]},
               "ssim": {"count": 4, "mean": 0.8, "std": 0.1, "min": 0.5, "max": 0.99, "percentiles": pct},
               "psnr": {"count": 3, "mean": 31.234, "min": 25.0, "max": 40.0, "percentiles": {"p5": 25.5, "p50": 30.0},
                        "infinite": 1, "undefined": {}},
               "ms_ssim": {"count": 2, "mean": 0.95, "min": 0.9, "max": 0.99, "percentiles": pct, "infinite": 0,
                           "undefined": {"too_small": 1, "nonpositive_term": 1}}}
    printed = io.StringIO()
    print_summary(RunOutcome(summary=summary, exit_code=0, output_url="/out"), printed)
    lines = {line.split(":")[0].strip(): line for line in printed.getvalue().splitlines() if ":" in line}
    assert "mean 31.23 dB" in lines["psnr"] and "(1 identical (+inf) not in these)" in lines["psnr"]
    assert "mean 0.9500" in lines["ms_ssim"]
    assert "(1 nonpositive_term, 1 too_small not in these)" in lines["ms_ssim"]
    printed = io.StringIO()  # an audit of SSIM alone prints no line for the metrics it did not compute
    print_summary(RunOutcome(summary=dict(summary, metric={"metrics": ["ssim"]}), exit_code=0, output_url="/out"),
                  printed)
    assert "psnr" not in printed.getvalue() and "ms_ssim" not in printed.getvalue()
