"""The driver's own death is covered by resume: SIGKILL its whole process group, rerun, exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from job_fixtures import make_job_dataset, read_results, read_summary

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _job(manifest: Path, out: Path, run_dir: Path) -> list:
    return [
        sys.executable, "-m", "jobs.ssim_audit", "source=parquet", f"source.url={manifest}",
        "source.pairs_per_shard=6", f"output.url={out}", "runtime.num_workers=1", "runtime.progress_interval_s=1",
        "ssim.precision=fp64", "report.enabled=false", f"hydra.run.dir={run_dir}",
    ]


def _markers(out: Path) -> set:
    return {p.name.split(".")[0] for p in (out / "shards").glob("*.commit.json")} if (out / "shards").exists() else set()


def test_sigkill_of_driver_process_group_then_rerun_is_exactly_once(tmp_path):
    data = make_job_dataset(tmp_path / "data", photos=("camera", "astronaut", "coffee", "chelsea"))
    out = tmp_path / "out"
    total_shards = -(-data.total // 6)
    driver = subprocess.Popen(_job(data.manifest, out, tmp_path / "run1"), cwd=REPO, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    try:
        while len(_markers(out)) < 3 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver, its local Ray and every actor
        driver.wait()
    time.sleep(1.0)
    committed = {shard: (out / "shards" / f"{shard}.commit.json").read_text() for shard in _markers(out)}
    assert 3 <= len(committed) < total_shards, "the driver must die mid-run for this test to mean anything"
    assert not (out / "ssim.parquet").exists()

    rerun = subprocess.run(_job(data.manifest, out, tmp_path / "run2"), cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = read_summary(out)
    assert summary["shards"]["resumed"] == len(committed)
    assert summary["shards"]["computed"] == total_shards - len(committed)
    ids = read_results(out).column("pair_id").to_pylist()
    assert len(ids) == len(set(ids)) == data.total
    # The shards committed before the kill were not recomputed: their markers are untouched.
    for shard, marker in committed.items():
        assert (out / "shards" / f"{shard}.commit.json").read_text() == marker
    assert json.loads(next(iter(committed.values())))["rows"] == 6
