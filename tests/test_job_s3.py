"""S3 in and out through a moto server on 127.0.0.1: a manifest and images on S3, results, summary and report
written to S3, read back, exactly once and equal to direct scores."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import s3fs

from job_fixtures import direct_score, job_config, make_job_dataset
from ssim_ray.run import evaluate

pytestmark = pytest.mark.slow


def test_job_reads_and_writes_s3(s3_storage_options, s3_bucket, tmp_path):
    data = make_job_dataset(tmp_path / "data", photos=("camera", "chelsea", "page"))
    fs = s3fs.S3FileSystem(**s3_storage_options)
    fs.put(str(data.root) + "/", f"{s3_bucket}/data/", recursive=True)
    out = f"s3://{s3_bucket}/audits/run1"
    cfg = job_config(tmp_path / "unused", tmp_path / "unused", pairs_per_shard=20, report=True)
    cfg.source.url = f"s3://{s3_bucket}/data/manifest.parquet"
    cfg.source.storage_options = s3_storage_options
    cfg.output.url = out
    cfg.output.storage_options = s3_storage_options
    cfg.report.worst_k = 3

    outcome = evaluate(cfg, output_url=out)

    fs.invalidate_cache()
    with fs.open(f"{out}/ssim.parquet", "rb") as handle:
        rows = pq.read_table(handle).to_pylist()
    assert sorted(r["pair_id"] for r in rows) == sorted(data.ok_pairs + list(data.bad_status))
    for row in rows:
        if row["pair_id"] in data.bad_status:
            assert row["status"] == data.bad_status[row["pair_id"]], row
        else:
            assert row["ssim"] == direct_score(data.root, row["reference"], row["distorted"])
    summary = json.loads(fs.cat_file(f"{out}/summary.json"))
    assert summary == outcome.summary
    assert summary["shards"]["computed"] == summary["shards"]["total"]
    assert fs.exists(f"{out}/report.html") and fs.ls(f"{out}/plots")
    # Storage options hold only the endpoint; the dummy credentials of the environment appear nowhere.
    for name in ("summary.json", "_run.json", "report.html"):
        assert b"testing" not in fs.cat_file(f"{out}/{name}")
