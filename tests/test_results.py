"""Part files, commit markers, resume checks and the merge (ssim_ray.output: schema, commit, resume, merge) on real
photo results."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from report_fixtures import in_shards, photo_rows

from ssim_ray.config import SummaryConfig
from ssim_ray.output.commit import committed_shard_ids, scan_shards, write_shard
from ssim_ray.output.merge import CorruptShardError, IncompleteMergeError, RunInfo, merge
from ssim_ray.output.resume import (
    ForeignShardsError,
    ResumeConflictError,
    build_run_manifest,
    check_commits,
    check_resume_compatible,
)
from ssim_ray.output.schema import RESULT_COLUMNS, rows_to_table
from ssim_ray.output.stamps import CommitStamp, metric_digest
from ssim_ray.output.table_stats import shard_stats

PASSTHROUGH = ["distortion", "photo"]
SHARD_SIZES = [7, 8, 9, 9]  # 33 rows: 30 scored pairs and 3 failures, the failures in the last shard
CFG = SummaryConfig(group_by="distortion", worst_k=5, examples_per_status=2)
METRIC = {"name": "wang2004", "win_size": 11, "sigma": 1.5, "k1": 0.01, "k2": 0.03, "data_range": "auto"}


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list:
    return photo_rows(tmp_path_factory.mktemp("photos"))


def _info(total: int, **overrides) -> RunInfo:
    values = dict(metric=METRIC, plan_fingerprint="plan-1", total_pairs=total)
    values.update(overrides)
    return RunInfo(**values)


STAMP = CommitStamp("plan-1", metric_digest(METRIC), "run-1")


def _write_all(out: str, rows: list, sizes=SHARD_SIZES, cfg=CFG, stamp=None, **options) -> dict:
    shards = in_shards(rows, sizes)
    for shard_id, shard_rows in shards.items():
        table = rows_to_table(shard_rows, PASSTHROUGH)
        write_shard(out, shard_id, table, stats=shard_stats(table, cfg), stamp=stamp, **options)
    return shards


def test_rows_to_table_has_the_fixed_schema_then_passthrough(rows):
    table = rows_to_table(rows[:3], PASSTHROUGH)
    assert table.column_names == list(RESULT_COLUMNS) + PASSTHROUGH
    assert table.schema.field("ssim").type == pa.float64()
    assert table.schema.field("height").type == pa.int32()
    assert table.schema.field("ssim_per_channel").type == pa.list_(pa.float64())
    assert table["pair_id"].to_pylist() == [r["pair_id"] for r in rows[:3]]


def test_rows_to_table_names_the_missing_key_and_clashing_columns(rows):
    broken = dict(rows[0])
    del broken["reference"], broken["photo"]
    with pytest.raises(ValueError, match=r"missing \['reference', 'photo'\]"):
        rows_to_table([broken], PASSTHROUGH)
    with pytest.raises(ValueError, match="must not reuse result column names.*'ssim'"):
        rows_to_table(rows[:1], ["ssim"])
    with pytest.raises(ValueError, match="'height'"):
        rows_to_table([dict(rows[0], height="tall")], PASSTHROUGH)


def test_failed_rows_may_leave_out_the_measurement_columns():
    row = {"pair_id": "p", "reference": "a.png", "distorted": "b.png", "status": "worker_failed",
           "error": "shard s0 failed on 3 attempts", "shard_id": "s0", "photo": "camera"}
    table = rows_to_table([row], ["photo"])
    assert table.to_pylist()[0] == {name: None for name in RESULT_COLUMNS} | row


def test_merge_wants_a_typed_run_info(tmp_path):
    with pytest.raises(TypeError, match=r"run_info must be an output.merge.RunInfo \(fields \['metric', .*got dict"):
        merge(str(tmp_path), plan_shard_ids=[], run_info={"wall_seconds": 1.0}, summary_cfg=CFG)


def test_write_shard_writes_part_then_marker_that_describes_it(tmp_path, rows):
    table = rows_to_table([dict(r, shard_id="s0") for r in rows[:5]], PASSTHROUGH)
    commit = write_shard(str(tmp_path), "s0", table, stats=shard_stats(table, CFG))
    part = (tmp_path / "shards" / "s0.parquet").read_bytes()
    marker = json.loads((tmp_path / "shards" / "s0.commit.json").read_text())
    assert marker["rows"] == 5 == commit.rows
    assert marker["bytes"] == len(part)
    assert marker["sha256"] == hashlib.sha256(part).hexdigest()
    assert marker["stats"]["overall"]["status_counts"] == {"ok": 5}
    assert pq.read_table(tmp_path / "shards" / "s0.parquet").equals(table)


def test_write_shard_refuses_tables_that_break_the_contract(tmp_path, rows):
    good = [dict(r, shard_id="s0") for r in rows[:2]]
    with pytest.raises(ValueError, match="shard_id must be 's0'"):
        write_shard(str(tmp_path), "s0", rows_to_table([dict(good[0], shard_id="s9")], PASSTHROUGH))
    with pytest.raises(ValueError, match="exactly when status is 'ok'.*'ok' with ssim None"):
        write_shard(str(tmp_path), "s0", rows_to_table([dict(good[0], ssim=None)], PASSTHROUGH))
    with pytest.raises(ValueError, match="'missing' with ssim 0.5"):
        write_shard(str(tmp_path), "s0", rows_to_table([dict(good[0], status="missing", ssim=0.5)], PASSTHROUGH))
    with pytest.raises(ValueError, match="file-name-safe"):
        write_shard(str(tmp_path), "../escape", rows_to_table([], []))
    other = rows_to_table(good[:1], PASSTHROUGH)
    with pytest.raises(ValueError, match="stats must describe the table's 2 rows, got 1"):
        write_shard(str(tmp_path), "s0", rows_to_table(good, PASSTHROUGH), stats=shard_stats(other, CFG))
    assert not (tmp_path / "shards").exists()


def test_write_shard_refuses_psnr_and_ms_ssim_values_that_break_the_contract(tmp_path, rows):
    """PSNR and MS-SSIM only on ok rows, never NaN; an MS-SSIM reason is typed and only stands for a null."""
    good = dict(rows[0], shard_id="s0", psnr=float("inf"), psnr_per_channel=[float("inf")], ms_ssim=None,
                ms_ssim_undefined="nonpositive_term")
    write_shard(str(tmp_path / "ok"), "s0", rows_to_table([good], PASSTHROUGH))  # +inf and a reason are fine
    bad = [
        (dict(good, psnr=float("nan")), "psnr must never be NaN"),
        (dict(good, psnr_per_channel=[float("nan")]), "psnr_per_channel must never hold NaN"),
        (dict(good, status="missing", ssim=None, ms_ssim_undefined=None), "psnr must be null unless status is 'ok'"),
        (dict(good, ms_ssim_undefined="negative"), r"ms_ssim_undefined must be null or one of \['too_small'"),
        (dict(good, ms_ssim=0.5), "ms_ssim_undefined is set only on 'ok' rows whose ms_ssim is null"),
        (dict(good, ms_ssim_undefined=None, ms_ssim=float("nan")), "ms_ssim must never be NaN"),
    ]
    for row, message in bad:
        with pytest.raises(ValueError, match=message):
            write_shard(str(tmp_path / "bad"), "s0", rows_to_table([row], PASSTHROUGH))
    assert not (tmp_path / "bad" / "shards").exists()


def test_rerun_of_a_shard_overwrites_never_duplicates(tmp_path, rows):
    out = str(tmp_path)
    _write_all(out, rows)
    # Every shard computed a second time (retries, a rerun): the merge must still count each pair once.
    _write_all(out, rows)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == sorted(
        [f"shard-0000{i}.parquet" for i in range(4)] + [f"shard-0000{i}.commit.json" for i in range(4)]
    )
    merge(out, plan_shard_ids=[f"shard-0000{i}" for i in range(4)], run_info=_info(len(rows)), summary_cfg=CFG)
    merged = pq.read_table(tmp_path / "ssim.parquet")
    assert merged["pair_id"].to_pylist() == [r["pair_id"] for r in rows]


def test_half_written_state_is_not_committed(tmp_path, rows):
    out = str(tmp_path)
    _write_all(out, rows)
    shards = tmp_path / "shards"
    (shards / "shard-00000.commit.json").unlink()  # crashed after the part, before the marker
    (shards / "shard-00001.parquet").unlink()  # part lost, marker left
    part = shards / "shard-00002.parquet"
    part.write_bytes(part.read_bytes()[:-10])  # truncated rewrite behind an old marker
    (shards / "shard-00003.commit.json").write_text('{"format": "ssim_ray.commit/1", "rows"')  # torn marker
    (shards / "shard-00009.parquet").write_bytes(b"orphan")  # a part that never got a marker
    scan = scan_shards(out)
    assert committed_shard_ids(out) == set() == set(scan.commits)
    assert scan.rejected["shard-00001"] == "part file is missing"
    assert "bytes, the marker expected" in scan.rejected["shard-00002"]
    assert "not a complete commit" in scan.rejected["shard-00003"]
    assert "shard-00000" not in scan.rejected and "shard-00009" not in scan.rejected


def test_marker_copied_to_another_name_is_not_a_commit(tmp_path, rows):
    out = str(tmp_path)
    _write_all(out, rows)
    shards = tmp_path / "shards"
    (shards / "shard-00007.parquet").write_bytes((shards / "shard-00000.parquet").read_bytes())
    (shards / "shard-00007.commit.json").write_bytes((shards / "shard-00000.commit.json").read_bytes())
    assert "shard-00007" not in committed_shard_ids(out)
    assert "names shard 'shard-00000'" in scan_shards(out).rejected["shard-00007"]


def test_merge_detects_a_part_changed_behind_its_marker(tmp_path, rows):
    out = str(tmp_path)
    _write_all(out, rows)
    part = tmp_path / "shards" / "shard-00002.parquet"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, so only the hash can tell
    part.write_bytes(bytes(data))
    assert "shard-00002" in committed_shard_ids(out)
    with pytest.raises(CorruptShardError, match="shard 'shard-00002' must match its marker.*delete"):
        merge(out, plan_shard_ids=[f"shard-0000{i}" for i in range(4)], run_info=_info(len(rows)), summary_cfg=CFG)
    assert not (tmp_path / "ssim.parquet").exists() and not (tmp_path / "summary.json").exists()


def test_merge_reads_parts_ahead_on_threads_and_keeps_plan_order(tmp_path, rows, monkeypatch):
    import threading
    import time

    from ssim_ray.output import merge as merging

    out = str(tmp_path)
    sizes = [3] * 11  # 33 rows in 11 parts
    shards = _write_all(out, rows, sizes=sizes)
    reading, most, lock = [0], [0], threading.Lock()
    read_part = merging._read_part

    def slow_read(fs, root, commit):  # a store with a round trip per part
        with lock:
            reading[0] += 1
            most[0] = max(most[0], reading[0])
        time.sleep(0.05)
        try:
            return read_part(fs, root, commit)
        finally:
            with lock:
                reading[0] -= 1

    monkeypatch.setattr(merging, "_read_part", slow_read)
    plan = sorted(shards)
    merge(out, plan_shard_ids=plan, run_info=_info(len(rows)), summary_cfg=CFG)
    assert 2 <= most[0] <= merging.MERGE_READ_AHEAD
    merged = pq.read_table(tmp_path / "ssim.parquet")
    assert merged["shard_id"].to_pylist() == [r["shard_id"] for s in plan for r in shards[s]]
    assert merged["pair_id"].to_pylist() == [r["pair_id"] for s in plan for r in shards[s]]


def test_merge_writes_every_row_once_in_plan_order_with_unified_passthrough_types(tmp_path, rows):
    out = str(tmp_path)
    shards = in_shards(rows, SHARD_SIZES)
    shards["shard-00001"] = [dict(r, photo=None) for r in shards["shard-00001"]]  # photo all-null here
    types = {"shard-00002": {"photo": pa.large_string()}}  # and a wider string type there
    for shard_id, shard_rows in shards.items():
        table = rows_to_table(shard_rows, PASSTHROUGH, passthrough_types=types.get(shard_id))
        write_shard(out, shard_id, table, stats=shard_stats(table, CFG))
    assert pq.read_schema(tmp_path / "shards" / "shard-00001.parquet").field("photo").type == pa.null()
    plan = list(shards)
    merge(out, plan_shard_ids=plan, run_info=_info(len(rows)), summary_cfg=CFG)
    merged = pq.read_table(tmp_path / "ssim.parquet")
    assert merged.num_rows == len(rows)
    assert merged["pair_id"].to_pylist() == [r["pair_id"] for r in rows]
    assert merged["shard_id"].to_pylist() == [r["shard_id"] for s in plan for r in shards[s]]
    assert merged.schema.field("photo").type == pa.large_string()
    assert merged["photo"].to_pylist()[7:15] == [None] * 8
    assert merged["photo"].to_pylist()[:7] == [r["photo"] for r in rows[:7]]
    np.testing.assert_array_equal(merged["ssim"].to_numpy(zero_copy_only=False),
                                  np.array([np.nan if r["ssim"] is None else r["ssim"] for r in rows]))


def test_merge_refuses_incompatible_passthrough_types(tmp_path, rows):
    out = str(tmp_path)
    first = rows_to_table([dict(r, shard_id="a", photo=1) for r in rows[:2]], PASSTHROUGH)
    second = rows_to_table([dict(r, shard_id="b") for r in rows[2:4]], PASSTHROUGH)
    write_shard(out, "a", first)
    write_shard(out, "b", second)
    with pytest.raises(ValueError, match="compatible types across shards.*photo"):
        merge(out, plan_shard_ids=["a", "b"], run_info=_info(4), summary_cfg=SummaryConfig())


def test_merge_is_idempotent(tmp_path, rows):
    out = str(tmp_path)
    _write_all(out, rows)
    plan = [f"shard-0000{i}" for i in range(4)]
    first = merge(out, plan_shard_ids=plan, run_info=_info(len(rows)), summary_cfg=CFG)
    first_bytes = (tmp_path / "ssim.parquet").read_bytes()
    second = merge(out, plan_shard_ids=plan, run_info=_info(len(rows)), summary_cfg=CFG)
    assert (tmp_path / "ssim.parquet").read_bytes() == first_bytes
    volatile = ("created", "merge_seconds")
    assert {k: v for k, v in first.items() if k not in volatile} == {
        k: v for k, v in second.items() if k not in volatile}
    assert json.loads((tmp_path / "summary.json").read_text())["ssim"] == second["ssim"]


def test_merge_with_a_missing_shard_raises_or_flags_incomplete(tmp_path, rows):
    out = str(tmp_path)
    _write_all(out, rows)
    (tmp_path / "shards" / "shard-00002.commit.json").unlink()
    plan = [f"shard-0000{i}" for i in range(4)]
    with pytest.raises(IncompleteMergeError, match=r"1 of 4 planned shards are not committed.*shard-00002"):
        merge(out, plan_shard_ids=plan, run_info=_info(len(rows)), summary_cfg=CFG)
    assert not (tmp_path / "summary.json").exists()
    summary = merge(out, plan_shard_ids=plan, run_info=_info(len(rows)), summary_cfg=CFG, allow_incomplete=True)
    assert summary["complete"] is False
    assert summary["shards"]["missing_ids"] == ["shard-00002"]
    assert summary["pairs"] == {"planned": len(rows), "merged": len(rows) - 9, "ok": 21, "failures": 3}
    assert pq.read_table(tmp_path / "ssim.parquet").num_rows == len(rows) - 9


def test_merge_refuses_a_row_count_that_differs_from_the_plan(tmp_path, rows):
    out = str(tmp_path)
    _write_all(out, rows)
    with pytest.raises(CorruptShardError, match=f"total_pairs=40 rows, got {len(rows)}"):
        merge(out, plan_shard_ids=[f"shard-0000{i}" for i in range(4)], run_info=_info(40), summary_cfg=CFG)


def test_summary_statistics_equal_the_merged_column(tmp_path, rows):
    out = str(tmp_path)
    _write_all(out, rows)
    info = _info(len(rows), wall_seconds=12.5, processing_seconds=10.0, pairs_computed=24, shards_computed=3,
                 shards_resumed=1, batch_sizes={"3x96x128 uint8": 32}, device="cpu", num_workers=2)
    summary = merge(out, plan_shard_ids=[f"shard-0000{i}" for i in range(4)], run_info=info, summary_cfg=CFG)
    table = pq.read_table(tmp_path / "ssim.parquet")
    ok = table.filter(pa.compute.equal(table["status"], "ok"))
    scores = ok["ssim"].to_numpy()
    assert summary["ssim"]["count"] == 30
    assert summary["ssim"]["mean"] == pytest.approx(scores.mean(), rel=1e-12)  # float summation order only
    assert summary["ssim"]["std"] == pytest.approx(scores.std(), rel=1e-9)
    assert (summary["ssim"]["min"], summary["ssim"]["max"]) == (scores.min(), scores.max())
    for q in (1, 5, 25, 50, 75, 95, 99):
        assert summary["ssim"]["percentiles"][f"p{q}"] == np.percentile(scores, q)
    assert summary["status_counts"] == {"missing": 1, "ok": 30, "size_mismatch": 1, "unreadable": 1}
    jpeg10 = ok.filter(pa.compute.equal(ok["distortion"], "jpeg10"))["ssim"].to_numpy()
    group = summary["groups"]["jpeg10"]
    assert (group["rows"], group["failures"], group["ssim"]["count"]) == (6, 0, 6)
    assert group["ssim"]["percentiles"]["p50"] == np.median(jpeg10)
    assert summary["groups"]["missing"]["failures"] == 1
    worst = sorted(rows[:30], key=lambda r: r["ssim"])[:5]
    assert [w["pair_id"] for w in summary["worst"]] == [r["pair_id"] for r in worst]
    assert summary["worst"][0]["group"] == worst[0]["distortion"]
    assert summary["failure_examples"]["unreadable"][0]["error"].startswith("cannot decode")
    assert summary["throughput"]["pairs_per_second"] == 2.4
    assert summary["shards"] == {"total": 4, "committed": 4, "missing": 0, "missing_ids": [], "computed": 3,
                                 "resumed": 1, "unplanned": 0, "rejected_markers": {}, "by_run": {"unrecorded": 4}}
    assert summary["metric"] == METRIC and summary["plan_fingerprint"] == "plan-1"
    assert summary["batch_sizes"] == {"3x96x128 uint8": 32} and summary["wall_seconds"] == 12.5
    assert set(summary["versions"]) == {"torch", "ray", "pyarrow", "fsspec", "pillow", "numpy", "python",
                                        "ssim_ray"}
    assert all(summary["versions"].values())


def test_merge_recomputes_statistics_when_group_by_changed_since_the_run(tmp_path, rows):
    out = str(tmp_path)
    _write_all(out, rows, cfg=SummaryConfig())  # the run summarised without groups
    by_photo = SummaryConfig(group_by="photo", worst_k=3)
    summary = merge(out, plan_shard_ids=[f"shard-0000{i}" for i in range(4)], run_info=_info(len(rows)),
                    summary_cfg=by_photo)
    assert summary["group_by"] == "photo"
    assert summary["groups"]["camera"]["rows"] == 8  # five distortions and three failures
    assert len(summary["worst"]) == 3


def test_too_many_groups_is_an_error_that_names_the_setting(tmp_path, rows):
    out = str(tmp_path)
    _write_all(out, rows)
    with pytest.raises(ValueError, match="summary.max_groups=10 distinct values, got 33"):
        merge(out, plan_shard_ids=[f"shard-0000{i}" for i in range(4)], run_info=_info(len(rows)),
              summary_cfg=SummaryConfig(group_by="pair_id", max_groups=10))


def _manifest(**overrides) -> dict:
    values = dict(plan_fingerprint="plan-1", total_pairs=33, num_shards=4, metric=METRIC,
                  source={"kind": "parquet", "url": "s3://bucket/m.parquet",
                          "storage_options": {"key": "AKIAEXAMPLE", "secret": "hunter2",
                                              "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}})
    values.update(overrides)
    return build_run_manifest(**values)


def test_resume_check_accepts_the_same_run_and_refuses_another(tmp_path, rows):
    out = str(tmp_path)
    assert check_resume_compatible(out, _manifest(), mode="resume") == "new"
    written = (tmp_path / "_run.json").read_text()
    assert "hunter2" not in written and "AKIAEXAMPLE" not in written
    assert json.loads(written)["source"]["storage_options"]["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:9"
    _write_all(out, rows)
    assert check_resume_compatible(out, _manifest(), mode="resume") == "resume"
    with pytest.raises(ResumeConflictError, match="plan_fingerprint: output has 'plan-1', this run has 'plan-2'"):
        check_resume_compatible(out, _manifest(plan_fingerprint="plan-2"), mode="resume")
    with pytest.raises(ResumeConflictError, match="metric.sigma: output has 1.5, this run has 2.0.*overwrite"):
        check_resume_compatible(out, _manifest(metric=dict(METRIC, sigma=2.0)), mode="resume")
    assert len(committed_shard_ids(out)) == 4


def test_overwrite_clears_previous_outputs_and_nothing_else(tmp_path, rows):
    out = str(tmp_path)
    check_resume_compatible(out, _manifest(), mode="resume")
    _write_all(out, rows)
    merge(out, plan_shard_ids=[f"shard-0000{i}" for i in range(4)], run_info=_info(len(rows)), summary_cfg=CFG)
    (tmp_path / "notes.txt").write_text("the user's own file")
    assert check_resume_compatible(out, _manifest(plan_fingerprint="plan-2"), mode="overwrite") == "overwrite"
    assert committed_shard_ids(out) == set()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_run.json", "notes.txt"]
    assert json.loads((tmp_path / "_run.json").read_text())["plan_fingerprint"] == "plan-2"


def test_committed_shards_without_a_manifest_refuse_to_resume(tmp_path, rows):
    out = str(tmp_path)
    _write_all(out, rows)
    with pytest.raises(ResumeConflictError, match="4 committed shards but no _run.json"):
        check_resume_compatible(out, _manifest(), mode="resume")
    with pytest.raises(ValueError, match=r"mode must be one of \['resume', 'overwrite'\], got 'append'"):
        check_resume_compatible(out, _manifest(), mode="append")


def test_summary_has_no_secrets(tmp_path, rows):
    out = str(tmp_path)
    _write_all(out, rows)
    info = _info(len(rows), source=_manifest()["source"] | {"storage_options": {"secret": "hunter2",
                                                                                  "token": "tok-123"}})
    merge(out, plan_shard_ids=[f"shard-0000{i}" for i in range(4)], run_info=info, summary_cfg=CFG)
    text = (tmp_path / "summary.json").read_text()
    assert "hunter2" not in text and "tok-123" not in text and "<redacted>" in text


def test_file_url_and_memory_url_work_like_a_path(tmp_path, rows):
    for out in (tmp_path.as_uri(), "memory://results-test/out"):
        _write_all(out, rows)
        summary = merge(out, plan_shard_ids=[f"shard-0000{i}" for i in range(4)], run_info=_info(len(rows)),
                        summary_cfg=CFG)
        assert summary["pairs"]["merged"] == len(rows)
        assert committed_shard_ids(out) == {f"shard-0000{i}" for i in range(4)}


def test_s3_output_through_the_moto_server(s3_storage_options, s3_bucket, rows):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_storage_options)
    out = f"s3://{s3_bucket}/run1"
    _write_all(out, rows, storage_options=s3_storage_options)
    fs.rm(f"{s3_bucket}/run1/shards/shard-00003.commit.json")
    assert committed_shard_ids(out, storage_options=s3_storage_options) == {f"shard-0000{i}" for i in range(3)}
    _write_all(out, rows, storage_options=s3_storage_options)
    summary = merge(out, plan_shard_ids=[f"shard-0000{i}" for i in range(4)], run_info=_info(len(rows)),
                    summary_cfg=CFG, storage_options=s3_storage_options)
    assert summary["pairs"]["merged"] == len(rows)
    with fs.open(f"{s3_bucket}/run1/ssim.parquet", "rb") as handle:
        assert pq.read_table(handle)["pair_id"].to_pylist() == [r["pair_id"] for r in rows]
    fs.invalidate_cache()
    assert json.loads(fs.cat_file(f"{s3_bucket}/run1/summary.json"))["ssim"] == summary["ssim"]


def test_a_scan_keeps_commit_facts_not_statistics(tmp_path, rows):
    out = str(tmp_path)
    _write_all(out, rows)
    commits = scan_shards(out).commits
    assert all(commit.stats is None for commit in commits.values())
    assert len({id(commit.arrow_schema) for commit in commits.values()}) == 1  # one schema object, shared
    marker = tmp_path / "shards" / "shard-00001.commit.json"
    broken = json.loads(marker.read_text()) | {"stats": "not statistics"}
    marker.write_text(json.dumps(broken))
    assert "stats must be an object" in scan_shards(out).rejected["shard-00001"]


def test_the_row_builder_takes_exactly_the_schema_columns():
    import inspect

    from ssim_ray.output.schema import REQUIRED_ROW_KEYS, result_row

    parameters = inspect.signature(result_row).parameters
    assert set(parameters) == set(RESULT_COLUMNS) | {"passthrough"}
    required = {name for name, p in parameters.items() if p.default is inspect.Parameter.empty}
    assert required == set(REQUIRED_ROW_KEYS) | {"passthrough"}
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters.values())


def test_built_rows_have_every_column_in_schema_order_then_passthrough():
    from ssim_ray.output.schema import result_row

    row = result_row(pair_id="p", reference="a.png", distorted="b.png", status="worker_failed", shard_id="s0",
                     passthrough={"photo": "camera"}, error="shard s0 failed on 3 attempts")
    assert list(row) == list(RESULT_COLUMNS) + ["photo"]
    by_hand = {"pair_id": "p", "reference": "a.png", "distorted": "b.png", "status": "worker_failed",
               "error": "shard s0 failed on 3 attempts", "shard_id": "s0", "photo": "camera"}
    assert rows_to_table([row], ["photo"]).equals(rows_to_table([by_hand], ["photo"]))
    with pytest.raises(ValueError, match=r"must not reuse result column names.*\['status'\]"):
        result_row(pair_id="p", reference="a", distorted="b", status="ok", shard_id="s0", passthrough={"status": 1})


def test_a_marker_records_the_plan_the_metric_the_run_and_the_inputs(tmp_path, rows):
    versioned = [dict(r, shard_id="s0", reference_version=f"size={i};mtime_ns=1", distorted_version=None)
                 for i, r in enumerate(rows[:4])]
    commit = write_shard(str(tmp_path), "s0", rows_to_table(versioned, PASSTHROUGH), stamp=STAMP)
    marker = json.loads((tmp_path / "shards" / "s0.commit.json").read_text())
    assert marker["format"] == "ssim_ray.commit/2"
    assert (marker["plan_fingerprint"], marker["metric_sha256"], marker["run_id"]) == ("plan-1", STAMP.metric_sha256,
                                                                                       "run-1")
    assert marker["inputs_sha256"] == commit.inputs_sha256 and len(commit.inputs_sha256) == 64
    assert scan_shards(str(tmp_path)).commits["s0"].stamp == STAMP
    # No version known (rows written without them, or the driver's worker_failed rows): nothing to check.
    unversioned = rows_to_table([dict(rows[0], shard_id="s1")], PASSTHROUGH)
    assert write_shard(str(tmp_path), "s1", unversioned).inputs_sha256 is None


def test_foreign_and_unstamped_markers_are_refused_by_name(tmp_path, rows):
    out = str(tmp_path)
    _write_all(out, rows, stamp=STAMP)
    ids = [f"shard-0000{i}" for i in range(4)]
    commits = scan_shards(out).commits
    check_commits(commits, ids, CommitStamp("plan-1", STAMP.metric_sha256, "run-2"), output_url=out)  # same: reused
    with pytest.raises(ForeignShardsError, match=r"4 committed shards belong to another plan or other metric settings "
                                                 r"\(e.g. shard shard-00000: plan fingerprint plan-1.*run run-1.*"
                                                 r"shard-00000, shard-00001, shard-00002, shard-00003.*overwrite"):
        check_commits(commits, ids, CommitStamp("plan-2", STAMP.metric_sha256, "run-2"), output_url=out)
    with pytest.raises(ForeignShardsError, match="4 committed shards belong"):
        check_commits(commits, ids, CommitStamp("plan-1", metric_digest(dict(METRIC, sigma=2.0)), "r"), output_url=out)
    with pytest.raises(ForeignShardsError, match="4 committed shards belong"):
        merge(out, plan_shard_ids=ids, run_info=_info(len(rows)), summary_cfg=CFG,
              expect=CommitStamp("plan-2", STAMP.metric_sha256, "run-2"))
    assert not (tmp_path / "ssim.parquet").exists()
    summary = merge(out, plan_shard_ids=ids, run_info=_info(len(rows), run_id="run-2"), summary_cfg=CFG, expect=STAMP)
    assert summary["run_id"] == "run-2" and summary["shards"]["by_run"] == {"run-1": 4}
    marker = tmp_path / "shards" / "shard-00002.commit.json"
    legacy = {k: v for k, v in json.loads(marker.read_text()).items()
              if k not in ("plan_fingerprint", "metric_sha256", "run_id", "inputs_sha256")}
    marker.write_text(json.dumps(legacy | {"format": "ssim_ray.commit/1"}))
    with pytest.raises(ForeignShardsError, match=r"1 committed shard has a marker that does not record .*format "
                                                 r"ssim_ray.commit/1.*: shard-00002\."):
        check_commits(scan_shards(out).commits, ids, STAMP, output_url=out)


def test_a_resume_records_its_run_in_the_manifest(tmp_path):
    out = str(tmp_path)
    assert check_resume_compatible(out, _manifest(run_id="run-1"), mode="resume") == "new"
    first = json.loads((tmp_path / "_run.json").read_text())
    assert check_resume_compatible(out, _manifest(run_id="run-2"), mode="resume") == "resume"
    second = json.loads((tmp_path / "_run.json").read_text())
    assert (second["run_id"], second["runs"], second["created"]) == ("run-2", ["run-1", "run-2"], first["created"])
    assert second["metric_sha256"] == metric_digest(METRIC)


def test_overwrite_keeps_the_claim_and_removes_what_a_killed_publication_left(tmp_path, rows):
    out = str(tmp_path)
    check_resume_compatible(out, _manifest(), mode="resume")
    (tmp_path / "_claim.json").write_text("{}")
    (tmp_path / ".ssim.parquet.tmp-123-abcd1234").write_bytes(b"PAR1")
    check_resume_compatible(out, _manifest(plan_fingerprint="plan-2"), mode="overwrite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_claim.json", "_run.json"]
