"""Comparing real audits: a candidate that re-encodes the sample set's JPEG pairs at a lower quality, and an
identical rerun; the regressions drawn from both runs; compare.html in headless Chromium; the job's exit codes.

Three audits of a subset of the built-in sample set (3 photographs x 17 distortions) run once for the module
on a local Ray with 2 CPU actors (~1 min on 2 cores); every test reuses them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray
from compare_fixtures import row, write_audit
from job_fixtures import job_config
from PIL import Image
from test_report_browser import IMAGES, DevTools

from ssim_ray.compare import EXIT_COMPARE_GATE, CompareConfig, CompareJobConfig, compare_runs
from ssim_ray.config import SSIMConfig
from ssim_ray.run import evaluate
from ssim_ray.sources.sample import ensure_sample_dataset

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
PHOTOS = ("camera", "coins", "chelsea")  # 300 to 512 px: real photographs, a few seconds per audit


def _manifests(folder: Path) -> tuple:
    """The sample's rows of PHOTOS (absolute paths), and the same rows with every JPEG pair re-encoded from
    its reference at half its quality (10 -> 5 ... 90 -> 45): the candidate pipeline got worse on `jpeg` only."""
    sample = Path(ensure_sample_dataset())
    table = pq.read_table(sample)
    rows = table.filter(pc.is_in(table["image"], pa.array(list(PHOTOS)))).to_pylist()
    for r in rows:
        r["reference"], r["distorted"] = str(sample.parent / r["reference"]), str(sample.parent / r["distorted"])
    baseline = folder / "baseline.parquet"
    pq.write_table(pa.Table.from_pylist(rows), baseline)
    (folder / "reencoded").mkdir()
    candidate_rows, reencoded = [], []
    for r in rows:
        if r["distortion"] == "jpeg":
            path = folder / "reencoded" / (r["pair_id"].replace("/", "_") + ".jpg")
            Image.open(r["reference"]).save(path, "JPEG", quality=int(r["level"]) // 2)
            r = dict(r, distorted=str(path))
            reencoded.append(r["pair_id"])
        candidate_rows.append(r)
    candidate = folder / "candidate.parquet"
    pq.write_table(pa.Table.from_pylist(candidate_rows), candidate)
    return baseline, candidate, reencoded


@pytest.fixture(scope="module")
def audits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare-audits")
    baseline_manifest, candidate_manifest, reencoded = _manifests(folder)
    # address="local": a Ray of our own, even when another process on this machine runs one.
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        outputs = {}
        for name, manifest in (("baseline", baseline_manifest), ("candidate", candidate_manifest),
                               ("rerun", baseline_manifest)):
            cfg = job_config(manifest, folder / name, batch_size=8)
            cfg.summary.group_by = "distortion"
            assert evaluate(cfg, output_url=str(folder / name)).exit_code == 0
            outputs[name] = str(folder / name)
    finally:
        ray.shutdown()
    return folder, outputs, reencoded


@pytest.fixture(scope="module")
def regression(audits):
    folder, outputs, _ = audits
    job = CompareJobConfig(baseline=outputs["baseline"], candidate=outputs["candidate"],
                           compare=CompareConfig(report_worst_k=3, worst_k=6))
    return compare_runs(job, output_url=str(folder / "regression"))


@pytest.fixture(scope="module")
def rerun(audits):
    folder, outputs, _ = audits
    gates = {"max_mean_drop": {"ssim": 0.0}, "max_fraction_worse": {"ssim": 0.0}, "max_newly_failed": 0,
             "max_unmatched": 0, "group_max_mean_drop": {"ssim": 0.0}}
    job = CompareJobConfig(baseline=outputs["baseline"], candidate=outputs["rerun"], compare=CompareConfig(**gates))
    return compare_runs(job, output_url=str(folder / "rerun-compare"))


def _scores(output: str) -> dict:
    table = pq.read_table(Path(output) / "ssim.parquet", columns=["pair_id", "ssim", "distortion"])
    return {r["pair_id"]: r for r in table.to_pylist()}


def test_the_reencoded_subset_is_regressed_in_exactly_its_group(audits, regression):
    _, outputs, reencoded = audits
    summary = regression.summary
    result = summary["results"]["ssim"]
    assert summary["join"]["mode"] == "partitioned"  # the candidate's manifest differs: another plan
    assert summary["group_by"] == "distortion" and result["overall"]["verdict"] == "regressed"
    verdicts = {group: stats["verdict"] for group, stats in result["groups"].items()}
    assert verdicts.pop("jpeg") == "regressed"
    assert verdicts == dict.fromkeys(("blur", "contrast", "noise"), "no significant change")
    for group, stats in result["groups"].items():
        if group != "jpeg":  # the same files: the same bits
            assert (stats["mean"], stats["ci_low"], stats["ci_high"], stats["worse"]["count"]) == (0.0, 0.0, 0.0, 0)
    assert result["groups"]["jpeg"]["worse"]["count"] == len(reencoded) == 18
    # The worst pairs are the largest drops, computed here from the two runs' own ssim.parquet.
    before, after = _scores(outputs["baseline"]), _scores(outputs["candidate"])
    drops = sorted(reencoded, key=lambda p: (after[p]["ssim"] - before[p]["ssim"], p))
    assert [w["pair_id"] for w in result["overall"]["worst"]] == drops[:6]
    assert result["overall"]["worst"][0]["delta"] == after[drops[0]]["ssim"] - before[drops[0]]["ssim"]
    assert summary["pairs"]["both_ok"] == len(before) == 51 and summary["pairs"]["pair_ids"] == 51
    # Every metric both audits computed is compared (the audit's `metrics`, listed in its metric block).
    computed = json.loads((Path(outputs["baseline"]) / "summary.json").read_text())["metric"].get("metrics", ["ssim"])
    assert summary["metrics"] == computed
    for metric in computed:
        groups = summary["results"][metric]["groups"]
        assert groups["jpeg"]["verdict"] == "regressed", metric
        assert all(groups[g]["mean"] == 0.0 for g in ("blur", "contrast", "noise")), metric


def test_an_identical_rerun_is_no_change_with_every_delta_exactly_zero(audits, rerun):
    folder, _, _ = audits
    summary = rerun.summary
    assert summary["join"]["mode"] == "aligned"  # the same manifest: the same plan, rows in the same order
    compared = pq.read_table(folder / "rerun-compare" / "compare.parquet")
    for metric in summary["metrics"]:
        deltas = compared[f"delta_{metric}"].to_numpy(zero_copy_only=False)
        assert deltas.size == 51 and np.all(deltas == 0.0), metric
        assert summary["results"][metric]["overall"]["verdict"] == "no significant change"
        assert {s["verdict"] for s in summary["results"][metric]["groups"].values()} == {"no significant change"}
    assert rerun.violations == [] and rerun.exit_code == 0  # every gate at zero tolerance passes


def test_the_worst_regressions_are_drawn_from_both_runs(audits, regression):
    _, outputs, _ = audits
    page = Path(regression.html_path).read_text()
    assert page.count('class="pair"') == 3
    worst = regression.summary["results"]["ssim"]["overall"]["worst"][:3]
    for entry in worst:
        for side in ("baseline", "candidate"):
            assert f'<code>{entry[f"{side}_distorted"]}</code>' in page
        # Both runs re-read and re-scored: the stored scores again, to the printed digits.
        assert f"{entry['baseline']:.6f} → {entry['candidate']:.6f}" in page
    captions = ("reference", "baseline distorted", "candidate distorted", "baseline SSIM map", "candidate SSIM map")
    for caption in captions:
        assert page.count(f"<figcaption>{caption}</figcaption>") == 3, caption
    assert "no images" not in page


IMAGE_COUNT = "document.images.length"
# The mean-delta column of each metric's group table (SSIM's first), as sorted on the page.
GROUP_SORT = ("Array.from(document.querySelectorAll('table.groups')).map(function (t) {"
              " return Array.from(t.querySelectorAll('tbody tr'))"
              ".map(function (r) { return r.cells[3].getAttribute('data-sort'); }); })")


def test_compare_html_renders_in_headless_chromium(regression, tmp_path):
    tools = DevTools(tmp_path / "profile")
    try:
        tools.open(Path(regression.html_path).as_uri())
        images = tools.evaluate(IMAGES)
        assert len(images) >= 3 * 6 + 2  # three panels of six pictures, the histogram and the scatter
        assert [alt for complete, width, alt in images if not complete or width == 0] == []
        assert tools.errors() == []
        assert {url.split(":", 1)[0] for url in tools.requested_urls()} <= {"file", "data"}
        tables = [[float(v) for v in means] for means in tools.evaluate(GROUP_SORT)]
        assert len(tables) == len(regression.summary["metrics"])  # one group table per compared metric
        for means in tables:
            assert means == sorted(means) and means[0] < 0  # lowest mean delta first: jpeg
        tools.evaluate("document.querySelectorAll('table.groups th')[3].click()")
        tools.evaluate("document.querySelectorAll('table.groups th')[3].click()")
        assert [float(v) for v in tools.evaluate(GROUP_SORT)[0]] == sorted(tables[0], reverse=True)
        shot = np.asarray(tools.screenshot().convert("L"), dtype=np.float64)
    finally:
        tools.close()
    assert shot.shape[0] > 2000
    assert shot.std() > 20 and len(np.unique(shot)) > 64  # text, charts and photographs, not a blank page


def _jobs(*runs: list, cwd: Path) -> list:
    """`python -m jobs.compare` once per list of overrides, the runs at the same time (they share no output)."""
    started = [subprocess.Popen([sys.executable, "-m", "jobs.compare", *overrides], cwd=cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
               for overrides in runs]
    try:
        outputs = [p.communicate(timeout=300) for p in started]
        return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(started, outputs)]
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
                p.communicate()


def test_the_job_exits_with_the_gate_code_and_zero_when_gates_pass(audits, tmp_path):
    _, outputs, _ = audits
    failed, passed = _jobs(
        [f"baseline={outputs['baseline']}", f"candidate={outputs['candidate']}", "compare.report=false",
         "compare.max_mean_drop.ssim=0.01", "compare.group_max_fraction_worse.ssim=0.5",
         f"hydra.run.dir={tmp_path / 'failed'}"],
        [f"baseline={outputs['baseline']}", f"candidate={outputs['rerun']}", "compare.report=false",
         "compare.max_mean_drop.ssim=0", f"compare.output_url={tmp_path / 'passed'}",
         f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=tmp_path,
    )
    assert failed.returncode == EXIT_COMPARE_GATE, failed.stderr
    assert "gate violated: compare.max_mean_drop.ssim=0.01" in failed.stderr
    assert "gate violated: compare.group_max_fraction_worse.ssim=0.5" in failed.stderr and "'jpeg'" in failed.stderr
    assert "ssim: regressed" in failed.stdout and "regressed in jpeg" in failed.stdout
    written = json.loads((tmp_path / "failed" / "compare.json").read_text())  # Hydra's run folder by default
    assert written["gates"]["exit_code"] == EXIT_COMPARE_GATE and (tmp_path / "failed" / "compare.parquet").exists()
    assert passed.returncode == 0, passed.stderr
    assert "ssim: no significant change" in passed.stdout and (tmp_path / "passed" / "compare.json").exists()


def test_the_job_refuses_differing_settings_and_credentials_with_exit_1(tmp_path):
    rows = [row(f"p{i}", 0.9) for i in range(4)]
    a = write_audit(tmp_path / "a", rows)
    b = write_audit(tmp_path / "b", rows, metric=SSIMConfig(downsample="wang").describe())
    refused, secret = _jobs(
        [f"baseline={a}", f"candidate={b}", f"hydra.run.dir={tmp_path / 'run'}"],
        [f"baseline={a}", f"candidate={b}", "+compare.candidate_storage_options.secret=abc123",
         f"hydra.run.dir={tmp_path / 'secret'}"],
        cwd=tmp_path,
    )
    assert refused.returncode == 1
    assert "downsample: baseline None, candidate 'wang'" in refused.stderr and "Traceback" not in refused.stderr
    assert secret.returncode == 1 and "credentials found" in secret.stderr
    assert not (tmp_path / "secret" / ".hydra").exists()  # refused before Hydra wrote the config


def test_ssim_compare_is_the_jobs_entry_point():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["ssim-compare"] == "jobs.compare:main"
    from jobs import compare

    assert callable(compare.main)
