"""The audit job end to end on a local Ray with 2 CPU actors, over a few hundred real pairs with bad ones."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest
import ray
from job_fixtures import direct_score, job_config, make_job_dataset, read_results, read_summary

from ssim_ray.output import resume
from ssim_ray.run import evaluate, merge_only

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_job_dataset(tmp_path_factory.mktemp("job-data"), copies_of_shapes=2)


@pytest.fixture(scope="module")
def first_run(local_ray, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("job-out") / "audit"
    cfg = job_config(dataset.manifest, out)
    outcome = evaluate(cfg, output_url=str(out))
    return cfg, out, outcome


def test_every_pair_exactly_once_with_direct_scores_and_typed_failures(dataset, first_run):
    _, out, outcome = first_run
    table = read_results(out)
    ids = table.column("pair_id").to_pylist()
    assert len(ids) == dataset.total >= 300
    assert sorted(ids) == sorted(dataset.ok_pairs + list(dataset.bad_status))
    rows = {row["pair_id"]: row for row in table.to_pylist()}
    for pair_id, status in dataset.bad_status.items():
        row = rows[pair_id]
        assert (row["status"], row["ssim"]) == (status, None), row
        assert row["error"] and "\n" not in row["error"]
    for pair_id in dataset.ok_pairs:
        row = rows[pair_id]
        assert row["status"] == "ok", row
        # Bitwise: the job batches pairs by shape, ssim() is batch-invariant, so the bits must agree.
        assert row["ssim"] == direct_score(dataset.root, row["reference"], row["distorted"]), pair_id
        assert len(row["ssim_per_channel"]) == row["channels"] in (1, 3)
        assert row["data_range"] == 255.0 and row["bit_depth"] == 8
    assert outcome.exit_code == 0


def test_summary_counts_shards_and_batch_sizes(dataset, first_run):
    cfg, out, outcome = first_run
    summary = read_summary(out)
    assert summary == outcome.summary
    bad_counts = {}
    for status in dataset.bad_status.values():
        bad_counts[status] = bad_counts.get(status, 0) + 1
    assert summary["status_counts"] == {"ok": len(dataset.ok_pairs), **bad_counts}
    plan_shards = -(-dataset.total // cfg.source.pairs_per_shard)
    assert summary["shards"]["total"] == summary["shards"]["computed"] == plan_shards
    assert summary["shards"]["resumed"] == 0
    assert summary["metric"]["name"] == "wang2004"
    assert summary["throughput"]["pairs_per_second"] > 0
    # One probed size per shape bucket (3 shapes x gray/color), each within the cap.
    assert len(summary["batch_sizes"]) == 6
    for record in summary["batch_sizes"].values():
        assert all(1 <= size <= cfg.batch.max_size for size in record["batch_sizes"])
    assert set(summary["groups"]) >= {"jpeg", "noise", "blur", "contrast", "bad"}


def test_summary_names_every_metric_setting_and_the_kernel_that_scored(first_run):
    from dataclasses import fields

    from ssim_ray.config import SSIMConfig

    cfg, out, _ = first_run
    summary, manifest = read_summary(out), json.loads((out / "_run.json").read_text())
    # One function describes the metric for both files; every setting that changes a score is named.
    assert summary["metric"] == manifest["metric"] == cfg.ssim.describe()
    settings = {f.name for f in fields(SSIMConfig)} - {"compile"}  # compile changes speed, not bits
    assert settings <= set(summary["metric"]) and "data_range_rule" in summary["metric"]
    assert summary["metric"]["color"] == cfg.ssim.color and summary["metric"]["kernel"] == cfg.ssim.kernel
    used = summary["runtime"]["kernels_used"]
    assert used and set(used) <= {"torch-eager", "torch-compiled"}  # CPU actors, torch path
    assert summary["runtime"]["compile"] == cfg.ssim.compile
    from ssim_ray.config import ReportConfig
    from ssim_ray.report import make_report

    page = pathlib.Path(make_report(str(out), report_cfg=ReportConfig(worst_k=0)).html_path).read_text()
    assert all(kernel in page for kernel in used) and "compile policy" in page


def test_batch_size_one_and_auto_give_identical_scores(local_ray, dataset, first_run, tmp_path):
    _, out_auto, _ = first_run
    out_one = tmp_path / "batch-one"
    evaluate(job_config(dataset.manifest, out_one, batch_size=1), output_url=str(out_one))
    auto = {r["pair_id"]: (r["ssim"], r["ssim_per_channel"]) for r in read_results(out_auto).to_pylist()}
    one = {r["pair_id"]: (r["ssim"], r["ssim_per_channel"]) for r in read_results(out_one).to_pylist()}
    assert auto == one


def test_rerun_resumes_everything_and_merge_only_rebuilds_the_same_table(dataset, first_run):
    cfg, out, _ = first_run
    before = read_results(out)
    outcome = evaluate(cfg, output_url=str(out))  # every shard is committed: nothing to compute, no Ray
    assert outcome.summary["shards"]["resumed"] == outcome.summary["shards"]["total"]
    assert outcome.summary["shards"]["computed"] == 0
    assert read_results(out).equals(before)
    rebuilt = merge_only(cfg, output_url=str(out))
    assert read_results(out).equals(before)
    assert rebuilt.summary["status_counts"] == outcome.summary["status_counts"]


def test_rerun_with_other_metric_settings_refuses_unless_overwrite(dataset, first_run):
    cfg, out, _ = first_run
    changed = dataclasses.replace(cfg, ssim=dataclasses.replace(cfg.ssim, precision="fp64"))
    with pytest.raises(resume.ResumeConflictError, match="precision"):
        evaluate(changed, output_url=str(out))
    assert read_summary(out)["metric"]["precision"] == "fp32"  # nothing was touched
