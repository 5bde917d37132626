"""The merge as Ray tasks (issue 15, point 2): the same rows, order and summary statistics as the one-process
merge on the same parts, one ssim.parquet up to a row count and a folder of Parquet files above it, and a
driver SIGKILLed inside the merge then rerun with merge_only gives the same outputs."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import ray

from job_fixtures import job_config
from ssim_ray import merge_tasks, run, sources
from ssim_ray.config import AuditConfig
from ssim_ray.output import merge as merging
from ssim_ray.output.claim import ClaimHeldError, ClaimLostError, OutputClaim
from ssim_ray.output.commit import scan_shards, write_shard
from ssim_ray.output.schema import result_row, rows_to_table
from ssim_ray.output.stats import merge_stats

REPO = Path(__file__).resolve().parents[1]
ROWS, PAIRS_PER_SHARD, BLOCK_ROWS = 2400, 60, 120
BLOCKS = ROWS // (2 * PAIRS_PER_SHARD)  # 40 parts, two per block
CODECS = ("jpeg", "webp", "avif", "png")
# Summary fields that say when and how a merge ran, not what it found.
HOW = ("created", "merge_seconds", "merge", "run_id")


def _manifest(path: Path) -> None:
    """ROWS pairs with a group column (codec) and a pass-through column that is all null in some shards."""
    quality = [None if (i // PAIRS_PER_SHARD) % 7 == 3 else float(10 + i % 90) for i in range(ROWS)]
    pq.write_table(pa.table({"pair_id": [f"p{i:05d}" for i in range(ROWS)],
                             "reference": [f"ref/{i % 37}.png" for i in range(ROWS)],
                             "distorted": [f"dist/{i}.jpg" for i in range(ROWS)],
                             "codec": [CODECS[(i * 7 + i // 13) % 4] for i in range(ROWS)],
                             "quality": pa.array(quality, pa.float64())}), path)


def _rows(shard: sources.Shard, source, rng: np.random.Generator) -> list:
    """Synthetic results of a shard's pairs: scores with ties, PSNR with +inf, some failure rows."""
    rows = []
    for pair_id, reference, distorted, passthrough in sources.iter_shard_rows(shard, source):
        if rng.random() < 0.03:
            rows.append(result_row(pair_id=pair_id, reference=reference, distorted=distorted, status="missing",
                                   shard_id=shard.shard_id, passthrough=passthrough, error=f"{distorted}: not found"))
            continue
        score = float(np.round(1.0 - rng.gamma(2.0, 0.05), 3))  # rounded: ties for the worst pairs
        psnr = float("inf") if rng.random() < 0.02 else float(20.0 + 30.0 * rng.random())
        rows.append(result_row(pair_id=pair_id, reference=reference, distorted=distorted, status="ok",
                               shard_id=shard.shard_id, passthrough=passthrough, ssim=score, ssim_per_channel=[score],
                               psnr=psnr, height=64, width=64, channels=1, data_range=255.0, bit_depth=8,
                               decoder="test"))
    return rows


def _audit_output(tmp_path: Path):
    """An output whose every planned shard is committed with this plan's stamp, as actors commit them; its cfg."""
    _manifest(tmp_path / "manifest.parquet")
    out = tmp_path / "out"
    cfg = job_config(tmp_path / "manifest.parquet", out, pairs_per_shard=PAIRS_PER_SHARD)
    cfg.audit = AuditConfig(min_ssim=0.8, max_fraction_below=1.0, group_min_ssim=0.7)
    plan = sources.plan_shards(cfg.source)
    stamp = run._stamp(cfg, plan, "20250101T000000Z-0badc0de")
    rng = np.random.default_rng(15)
    for shard in plan.shards:
        table = rows_to_table(_rows(shard, cfg.source, rng), list(plan.passthrough_columns))
        write_shard(str(out), shard.shard_id, table, stamp=stamp)
    return cfg, out, plan


def _arguments(cfg, plan) -> dict:
    info = merging.RunInfo(metric=cfg.describe_metric(), plan_fingerprint=plan.fingerprint,
                           total_pairs=plan.total_pairs)
    return dict(plan_shard_ids=[s.shard_id for s in plan.shards], run_info=info, summary_cfg=cfg.summary,
                audit_cfg=cfg.audit)


def _what(summary: dict) -> dict:
    return {key: value for key, value in summary.items() if key not in HOW}


def _staging(out: Path) -> list:
    return [p.name for p in out.iterdir() if ".merging-" in p.name or ".tmp-" in p.name]


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def test_blocks_depend_on_the_plan_only_and_cover_every_part_once():
    rows = [60] * 40 + [5, 500, 1]
    bounds = merging.block_bounds(rows, BLOCK_ROWS)
    assert [i for start, end in bounds for i in range(start, end)] == list(range(len(rows)))
    assert all(sum(rows[start:end]) >= BLOCK_ROWS for start, end in bounds[:-1])
    assert merging.block_bounds(rows, BLOCK_ROWS) == bounds
    assert merging.block_rows_for(100_000_000) == 100_000_000 // merging.TARGET_BLOCKS


def test_blocks_combined_give_the_statistics_of_the_one_process_merge_bit_for_bit(tmp_path):
    cfg, out, plan = _audit_output(tmp_path)
    arguments = _arguments(cfg, plan)
    reference = merging.merge(str(out), **arguments)
    merge_plan = merging.plan_merge(scan_shards(str(out)), arguments["plan_shard_ids"], block_rows=BLOCK_ROWS)
    blocks = [merging.summarise_block(str(out), merge_plan.block(i), index=i, schema=merge_plan.schema,
                                      summary_cfg=cfg.summary) for i in range(len(merge_plan.blocks))]
    summed = merging._empty(cfg.summary)
    for block in blocks:
        summed = merge_stats(summed, block.stats)
    accumulator = merging.MergeAccumulator(cfg.summary, capacity=merge_plan.rows)
    for block in blocks:
        accumulator.add(block)
    stats, collector = accumulator.result()
    overall = reference["ssim"]
    assert (stats.overall.moments.mean, stats.overall.moments.std) == (overall["mean"], overall["std"])
    assert collector.overall_percentiles() == overall["percentiles"]
    for name, group in reference["groups"].items():
        assert stats.groups[name].moments.mean == group["ssim"]["mean"]
        assert stats.groups[name].scores["psnr"].moments.mean == group["psnr"]["mean"]
    # Summing the blocks' moments (a tree) moves the last bits: that is why blocks carry their parts' trail.
    tree = [(p, m.mean, m.m2) for p, m in merging.moments_paths(summed)]
    folded = [(p, m.mean, m.m2) for p, m in merging.moments_paths(stats)]
    assert tree != folded and [p for p, _, _ in tree] == [p for p, _, _ in folded]


@pytest.mark.slow
def test_ray_merge_gives_the_same_file_and_statistics_as_the_driver_merge(ray_cluster, tmp_path):
    cfg, out, plan = _audit_output(tmp_path)
    arguments = _arguments(cfg, plan)
    reference = merging.merge(str(out), **arguments)
    reference_bytes = (out / "ssim.parquet").read_bytes()

    summary = merge_tasks.merge_parallel(str(out), **arguments, block_rows=BLOCK_ROWS)
    how = {key: summary["merge"][key] for key in ("by", "workers", "blocks", "layout", "files")}
    assert how == {"by": "ray tasks", "workers": 2, "blocks": BLOCKS, "layout": "file", "files": 1}
    assert summary["merge"]["task_cpu_seconds"] > 0
    assert (out / "ssim.parquet").read_bytes() == reference_bytes  # rows, order and row groups
    assert _what(summary) == _what(reference)
    assert _what(json.loads((out / "summary.json").read_text())) == _what(reference)
    assert summary["ssim"]["count"] > 0 and summary["psnr"]["infinite"] > 0 and summary["below"]
    assert not _staging(out)


@pytest.mark.slow
def test_above_the_row_limit_the_results_are_a_folder_that_readers_see_as_one_table(ray_cluster, tmp_path):
    cfg, out, plan = _audit_output(tmp_path)
    arguments = _arguments(cfg, plan)
    reference = merging.merge(str(out), **arguments)
    table = pq.read_table(out / "ssim.parquet")

    summary = merge_tasks.merge_parallel(str(out), **arguments, block_rows=BLOCK_ROWS, single_file_max_rows=ROWS - 1)
    folder = out / "ssim.parquet"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [merging.FOLDER_PART.format(index=i) for i in range(BLOCKS)]
    assert summary["merge"]["layout"] == "folder" and summary["merge"]["files"] == BLOCKS
    assert _what(summary) == _what(reference)
    assert {pq.read_schema(folder / name) for name in names} == {table.schema}
    assert pq.read_table(folder).equals(table)  # pyarrow: plan order is the files' name order
    assert ds.dataset(str(folder), format="parquet").to_table().equals(table)
    # Optional readers, checked where installed: Ray Data needs pandas (not a dependency of this project).
    if importlib.util.find_spec("pandas") is not None:
        import ray.data

        ray.data.DataContext.get_current().execution_options.preserve_order = True
        read = pa.concat_tables(ray.get(ray.data.read_parquet(str(folder)).to_arrow_refs()))
        assert read.select(table.column_names).equals(table)
    if importlib.util.find_spec("duckdb") is not None:
        import duckdb

        ids = duckdb.sql(f"select pair_id from read_parquet('{folder}/*.parquet')").fetchall()
        assert [i for (i,) in ids] == table["pair_id"].to_pylist()
    assert not _staging(out)

    # And back: a merge into one file replaces the folder, by either merge.
    merge_tasks.merge_parallel(str(out), **arguments, block_rows=BLOCK_ROWS)
    assert (out / "ssim.parquet").is_file() and pq.read_table(out / "ssim.parquet").equals(table)
    merge_tasks.merge_parallel(str(out), **arguments, block_rows=BLOCK_ROWS, single_file_max_rows=0)
    merging.merge(str(out), **arguments)
    assert (out / "ssim.parquet").is_file() and pq.read_table(out / "ssim.parquet").equals(table)


@pytest.mark.slow
@pytest.mark.parametrize("single_file_max_rows", [None, 0], ids=["file", "folder"])
def test_a_corrupt_part_or_a_lost_claim_leaves_the_previous_outputs(ray_cluster, tmp_path, single_file_max_rows):
    cfg, out, plan = _audit_output(tmp_path)
    arguments = _arguments(cfg, plan)
    merging.merge(str(out), **arguments)
    previous = {name: (out / name).read_bytes() for name in ("ssim.parquet", "summary.json")}

    def lost() -> None:
        raise ClaimLostError("claim taken over")

    with pytest.raises(ClaimLostError):
        merge_tasks.merge_parallel(str(out), **arguments, block_rows=BLOCK_ROWS, before_publish=lost,
                                   single_file_max_rows=single_file_max_rows)
    assert {name: (out / name).read_bytes() for name in previous} == previous and not _staging(out)

    shard_id = plan.shards[25].shard_id
    part = out / "shards" / f"{shard_id}.parquet"
    data = part.read_bytes()
    part.write_bytes(data[:-9] + bytes(9))  # same size, other bytes: found by its sha256 in a task
    with pytest.raises(merging.CorruptShardError, match=shard_id):
        merge_tasks.merge_parallel(str(out), **arguments, block_rows=BLOCK_ROWS,
                                   single_file_max_rows=single_file_max_rows)
    assert {name: (out / name).read_bytes() for name in previous} == previous and not _staging(out)


def test_a_merge_only_is_refused_while_another_run_holds_the_claim(tmp_path):
    cfg, out, _ = _audit_output(tmp_path)
    with OutputClaim(str(out), run_id="20250101T000000Z-00000001", ttl_s=60.0):
        with pytest.raises(ClaimHeldError):
            run.merge_only(cfg, output_url=str(out))
    assert not (out / "ssim.parquet").exists() and not (out / "summary.json").exists()


# A driver running `output.merge_only` whose merge goes to Ray tasks (forced below the default row count), in
# BLOCKS blocks; it prints each block it has combined and waits a little, so that the test kills it inside.
_DRIVER = r"""
import sys, time
from ssim_ray import merge_tasks, run
from ssim_ray.config import AuditConfig, AuditJobConfig, OutputConfig, RuntimeConfig, SourceConfig
from ssim_ray.output import merge as merging

manifest, out, limit, block_rows, pairs_per_shard = sys.argv[1:6]
merge_tasks.RAY_MERGE_MIN_ROWS = 0
merging.SINGLE_FILE_MAX_ROWS, merging.MIN_BLOCK_ROWS = int(limit), int(block_rows)
add = merging.MergeAccumulator.add

def slow_add(self, block):
    add(self, block)
    print(f"combined {block.index}", flush=True)
    time.sleep(0.5)

merging.MergeAccumulator.add = slow_add
cfg = AuditJobConfig(source=SourceConfig(kind="parquet", url=manifest, pairs_per_shard=int(pairs_per_shard)),
                     output=OutputConfig(url=out, merge_only=True), runtime=RuntimeConfig(num_workers=2))
cfg.summary.group_by = "codec"
cfg.audit = AuditConfig(min_ssim=0.8, max_fraction_below=1.0, group_min_ssim=0.7)
cfg.report.enabled = False
run.merge_only(cfg, output_url=out)
print("merged", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("limit", [ROWS, 0], ids=["file", "folder"])
def test_a_driver_killed_inside_the_ray_merge_then_rerun_gives_the_same_outputs(ray_cluster, tmp_path, monkeypatch,
                                                                                limit):
    cfg, out, _ = _audit_output(tmp_path)
    reference = run.merge_only(cfg, output_url=str(out)).summary  # today's merge, in the driver
    assert reference["merge"]["by"] == "driver"
    table = pq.read_table(out / "ssim.parquet")
    previous = {name: (out / name).read_bytes() for name in ("ssim.parquet", "summary.json")}

    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, str(tmp_path / "manifest.parquet"), str(out), str(limit),
                               str(BLOCK_ROWS), str(PAIRS_PER_SHARD)], cwd=REPO, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=open(tmp_path / "driver.err", "w"), text=True)
    try:
        lines = [driver.stdout.readline().strip() for _ in range(3)]
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver, its local Ray and the merge's tasks
        driver.wait()
    assert lines == ["combined 0", "combined 1", "combined 2"], (tmp_path / "driver.err").read_text()[-3000:]
    time.sleep(0.5)
    # Killed before it published: the previous outputs are whole; what it was writing is hidden.
    assert {name: (out / name).read_bytes() for name in previous} == previous
    assert _staging(out)

    monkeypatch.setattr(merge_tasks, "RAY_MERGE_MIN_ROWS", 0)
    monkeypatch.setattr(merging, "SINGLE_FILE_MAX_ROWS", limit)
    monkeypatch.setattr(merging, "MIN_BLOCK_ROWS", BLOCK_ROWS)
    rerun = run.merge_only(cfg, output_url=str(out)).summary  # takes over the dead driver's claim
    assert rerun["merge"]["by"] == "ray tasks" and rerun["merge"]["blocks"] == BLOCKS
    assert rerun["merge"]["layout"] == ("file" if limit else "folder")
    assert _what(rerun) == _what(reference)
    assert pq.read_table(out / "ssim.parquet").equals(table)
    assert not _staging(out) and not (out / "_claim.json").exists()
