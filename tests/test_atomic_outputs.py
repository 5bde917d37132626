"""Merged outputs are published whole (issue 12, point 8): a driver SIGKILLed during a re-merge, a merge that
fails half way (local disk and the moto S3 server) and a report whose publication fails all leave the previous
ssim.parquet, summary.json and report.html whole and readable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ssim_ray.config import SummaryConfig
from ssim_ray.output.commit import write_shard
from ssim_ray.output.merge import CorruptShardError, RunInfo, merge
from ssim_ray.output.schema import result_row, rows_to_table

REPO = Path(__file__).resolve().parents[1]
SHARDS, ROWS = 240, 50


def _shard_rows(shard_id: str, start: int) -> list:
    # Scores of a smooth, deterministic curve: the test is about bytes on disk, not about SSIM.
    return [result_row(pair_id=f"p{start + i:06d}", reference=f"ref/{start + i}.png", distorted=f"dist/{start + i}.png",
                       status="ok", shard_id=shard_id, passthrough={}, ssim=0.5 + ((start + i) % 97) / 200,
                       ssim_per_channel=[0.5 + ((start + i) % 97) / 200], height=64, width=64, channels=1,
                       data_range=255.0, bit_depth=8, decoder="test")
            for i in range(ROWS)]


def _write_shards(out: str, storage_options=None, count: int = SHARDS) -> list:
    ids = [f"s{i:05d}" for i in range(count)]
    for index, shard_id in enumerate(ids):
        write_shard(out, shard_id, rows_to_table(_shard_rows(shard_id, index * ROWS), []),
                    storage_options=storage_options)
    return ids


def _info() -> RunInfo:
    return RunInfo(metric={"name": "wang2004"}, plan_fingerprint="f", total_pairs=SHARDS * ROWS)


# The driver of a re-merge, made slow by the test (each part read waits 20 ms) so that the kill lands in it.
_SLOW_MERGE = r"""
import sys, time
from ssim_ray.config import SummaryConfig
from ssim_ray.output import merge as m
read_part = m._read_part
def slow_read(*args):
    time.sleep(0.02)
    return read_part(*args)
m._read_part, m.MERGE_READ_AHEAD = slow_read, 1
out, shards, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
info = m.RunInfo(metric={"name": "wang2004"}, plan_fingerprint="f", total_pairs=shards * rows)
print("merging", flush=True)
m.merge(out, plan_shard_ids=[f"s{i:05d}" for i in range(shards)], run_info=info, summary_cfg=SummaryConfig())
print("merged", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_s", [0.3, 2.0])
def test_a_driver_killed_during_a_remerge_leaves_the_previous_results_whole(tmp_path, kill_after_s):
    out = str(tmp_path / "out")
    _write_shards(out)
    merge(out, plan_shard_ids=[f"s{i:05d}" for i in range(SHARDS)], run_info=_info(), summary_cfg=SummaryConfig())
    before = pq.read_table(tmp_path / "out" / "ssim.parquet")
    summary_before = (tmp_path / "out" / "summary.json").read_text()

    driver = subprocess.Popen([sys.executable, "-c", _SLOW_MERGE, out, str(SHARDS), str(ROWS)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    assert driver.stdout.readline().strip() == "merging"
    time.sleep(kill_after_s)  # the merge reads 240 parts at 20 ms each: ~5 s
    assert driver.poll() is None, "the merge must still be running when it is killed"
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()

    assert pq.read_table(tmp_path / "out" / "ssim.parquet").equals(before)
    assert (tmp_path / "out" / "summary.json").read_text() == summary_before
    # The next merge publishes over whatever the killed one left behind.
    merge(out, plan_shard_ids=[f"s{i:05d}" for i in range(SHARDS)], run_info=_info(), summary_cfg=SummaryConfig())
    assert pq.read_table(tmp_path / "out" / "ssim.parquet").equals(before)


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    """(output URL, storage options, fsspec filesystem, path of the output in it)."""
    if request.param == "local":
        import fsspec

        return str(tmp_path / "out"), None, fsspec.filesystem("file"), str(tmp_path / "out")
    import s3fs

    options = request.getfixturevalue("s3_storage_options")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/out", options, s3fs.S3FileSystem(**options), f"{bucket}/out"


def test_a_merge_that_fails_half_way_leaves_the_previous_outputs(output):
    url, options, fs, root = output
    ids = _write_shards(url, options, count=40)
    info = RunInfo(metric={"name": "wang2004"}, plan_fingerprint="f", total_pairs=40 * ROWS)
    merge(url, plan_shard_ids=ids, run_info=info, summary_cfg=SummaryConfig(), storage_options=options)
    fs.invalidate_cache()
    previous = {name: fs.cat_file(f"{root}/{name}") for name in ("ssim.parquet", "summary.json")}
    part = f"{root}/shards/{ids[30]}.parquet"
    data = fs.cat_file(part)
    fs.pipe_file(part, data[:-9] + bytes(9))  # same size, other bytes: found by its sha256 mid-merge
    with pytest.raises(CorruptShardError, match=ids[30]):
        merge(url, plan_shard_ids=ids, run_info=info, summary_cfg=SummaryConfig(), storage_options=options)
    fs.invalidate_cache()
    assert {name: fs.cat_file(f"{root}/{name}") for name in previous} == previous
    leftovers = [p for p in fs.ls(root, detail=False) if ".tmp-" in p]
    assert not leftovers


@pytest.mark.slow
def test_a_report_whose_publication_fails_leaves_the_previous_report(tmp_path, monkeypatch):
    from report_fixtures import build_audit

    from ssim_ray.config import AuditConfig, ReportConfig
    from ssim_ray.output import publish
    from ssim_ray.report import make_report

    out = Path(build_audit(tmp_path, audit=AuditConfig()))
    made = make_report(str(out), report_cfg=ReportConfig(worst_k=0))
    page, plots = Path(made.html_path).read_bytes(), {p: Path(p).read_bytes() for p in made.plot_paths}
    summary = json.loads((out / "summary.json").read_text())

    def disk_full(source: str, target: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(publish, "_replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        make_report(str(out), report_cfg=ReportConfig(worst_k=0))
    assert Path(made.html_path).read_bytes() == page
    assert {p: Path(p).read_bytes() for p in made.plot_paths} == plots
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    monkeypatch.undo()
    again = make_report(str(out), report_cfg=ReportConfig(worst_k=0))
    assert sorted(again.plot_paths) == sorted(made.plot_paths) and summary["pairs"]["merged"] > 0
