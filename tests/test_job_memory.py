"""An actor's peak memory does not grow with the dataset: the same pairs listed 1x and 10x."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from job_fixtures import job_config, make_job_dataset
from ssim_ray.run import evaluate

pytestmark = pytest.mark.slow


def _copies(manifest, copies: int, path):
    table = pq.read_table(manifest)
    parts = []
    for copy in range(copies):
        ids = pa.array([f"{pair_id}#copy{copy}" for pair_id in table.column("pair_id").to_pylist()])
        parts.append(table.set_column(0, "pair_id", ids))
    pq.write_table(pa.concat_tables(parts), path, row_group_size=256)
    return path


def _peak_mib(dataset_root, manifest, out) -> float:
    cfg = job_config(manifest, out, pairs_per_shard=32)
    cfg.source.base_url = str(dataset_root)
    outcome = evaluate(cfg, output_url=str(out))
    assert outcome.summary["complete"]
    peaks = outcome.actor_peak_rss_bytes
    # Two actors are asked for; the dispatcher takes a shard back from one Ray has not started yet when the
    # other has room (a small run may finish on one), so one or two report their peak.
    assert 1 <= len(peaks) <= 2
    return max(peaks.values()) / 2**20


def test_actor_peak_rss_does_not_grow_with_the_dataset(tmp_path, capsys):
    data = make_job_dataset(tmp_path / "data", photos=("astronaut", "coffee", "chelsea"), with_bad=False)
    one = _copies(data.manifest, 1, tmp_path / "x1.parquet")
    ten = _copies(data.manifest, 10, tmp_path / "x10.parquet")
    peak_one = _peak_mib(data.root, one, tmp_path / "out1")
    peak_ten = _peak_mib(data.root, ten, tmp_path / "out10")
    with capsys.disabled():
        print(f"\nactor peak RSS: {peak_one:.0f} MiB for {len(data.ok_pairs)} pairs, "
              f"{peak_ten:.0f} MiB for {10 * len(data.ok_pairs)} pairs ({peak_ten / peak_one:.2f}x)")
    assert peak_ten <= 1.2 * peak_one
    assert not ray.is_initialized()  # each run started and stopped its own local Ray
