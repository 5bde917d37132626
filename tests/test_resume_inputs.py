"""What a committed row stands for, checked before it is reused (issue 12): the bytes of its inputs (point 2),
the plan and the metric settings its marker records (point 3). Real runs on a local Ray with 2 CPU actors.
"""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
import ray
from job_fixtures import direct_score, job_config, make_job_dataset, read_results, read_summary

from ssim_ray.output.resume import ResumeConflictError
from ssim_ray.run import evaluate, merge_only
from ssim_ray.sources import plan_shards

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def _dataset(root):
    return make_job_dataset(root, photos=("camera", "astronaut"), with_bad=False)  # 42 pairs, 4 shards of 12


@pytest.fixture(scope="module")
def first_run(local_ray, tmp_path_factory):
    data = _dataset(tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("out") / "audit"
    cfg = job_config(data.manifest, out, pairs_per_shard=12)
    evaluate(cfg, output_url=str(out))
    return data, cfg, out


def _copy(out, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    return copy


def _markers(out) -> dict:
    return {p.name: p.read_text() for p in sorted((out / "shards").glob("*.commit.json"))}


def test_merge_only_refuses_another_manifest_with_the_same_name_and_row_count(first_run, tmp_path):
    data, cfg, out = first_run
    out = _copy(out, tmp_path)
    before = read_results(out)
    other = tmp_path / "other"
    shutil.copytree(data.root, other)
    table = pq.read_table(other / "manifest.parquet")
    pq.write_table(table.take(list(reversed(range(table.num_rows)))), other / "manifest.parquet", row_group_size=64)
    changed = job_config(other / "manifest.parquet", out, pairs_per_shard=12)
    # The reproduction: the other manifest's shards have the same ids as the committed ones.
    ids = [s.shard_id for s in plan_shards(cfg.source).shards]
    assert [s.shard_id for s in plan_shards(changed.source).shards] == ids
    with pytest.raises(ResumeConflictError, match=r"4 committed shards belong to another plan or other metric") as info:
        merge_only(changed, output_url=str(out))
    assert all(name.split(".")[0] in str(info.value) for name in _markers(out))
    assert "output.mode=overwrite" in str(info.value)
    assert read_results(out).equals(before)


def test_merge_only_refuses_other_metric_settings(first_run, tmp_path):
    _, cfg, out = first_run
    out = _copy(out, tmp_path)
    cfg = job_config(cfg.source.url, out, pairs_per_shard=12)
    cfg.ssim.sigma = 1.0
    with pytest.raises(ResumeConflictError, match=r"4 committed shards belong to another plan or other metric"):
        merge_only(cfg, output_url=str(out))
    cfg.ssim.sigma = 1.5
    assert merge_only(cfg, output_url=str(out)).summary["complete"] is True


def test_markers_of_the_previous_format_are_refused_by_name(first_run, tmp_path):
    _, cfg, out = first_run
    out = _copy(out, tmp_path)
    for marker in (out / "shards").glob("*.commit.json"):
        doc = json.loads(marker.read_text())
        for key in ("plan_fingerprint", "metric_sha256", "run_id", "inputs_sha256"):
            doc.pop(key, None)
        marker.write_text(json.dumps(doc | {"format": "ssim_ray.commit/1"}))
    for run in (evaluate, merge_only):
        with pytest.raises(ResumeConflictError, match=r"4 committed shards have markers that do not record the "
                                                      r"plan and metric settings .*format ssim_ray.commit/1"):
            run(cfg, output_url=str(out))


def test_a_distorted_image_overwritten_in_place_is_rescored_on_resume(local_ray, tmp_path, capfd):
    data = _dataset(tmp_path / "data")
    out = tmp_path / "out"
    cfg = job_config(data.manifest, out, pairs_per_shard=12)
    evaluate(cfg, output_url=str(out))
    before = {row["pair_id"]: row for row in read_results(out).to_pylist()}
    markers = _markers(out)
    victim, donor = before["astronaut_80x80_0/noise/6.0"], before["astronaut_80x80_0/noise/18.0"]
    (data.root / victim["distorted"]).write_bytes((data.root / donor["distorted"]).read_bytes())
    new_score = direct_score(data.root, victim["reference"], victim["distorted"])
    assert new_score != victim["ssim"]

    cfg.output.verify_inputs = False  # the opt-out: committed shards are reused unchecked
    unchecked = evaluate(cfg, output_url=str(out))
    assert unchecked.summary["input_check"] is None
    assert read_results(out).to_pylist() == list(before.values())

    cfg.output.verify_inputs = True
    capfd.readouterr()
    outcome = evaluate(cfg, output_url=str(out))
    printed = capfd.readouterr().err
    after = {row["pair_id"]: row for row in read_results(out).to_pylist()}
    assert list(after) == list(before)
    assert after[victim["pair_id"]]["ssim"] == new_score
    assert after[victim["pair_id"]]["distorted_version"] != victim["distorted_version"]
    for pair_id, row in before.items():
        if pair_id != victim["pair_id"]:
            assert (after[pair_id]["status"], after[pair_id]["ssim"]) == (row["status"], row["ssim"]), pair_id
    changed_marker = f"{victim['shard_id']}.commit.json"
    now = _markers(out)
    assert now[changed_marker] != markers[changed_marker]
    del now[changed_marker], markers[changed_marker]
    assert now == markers  # the other shards were reused as they were
    check = outcome.summary["input_check"]
    assert check["shards_verified"] == 4 and check["pairs_verified"] == 42
    assert (check["shards_recomputed"], check["pairs_changed"]) == (1, 1)
    assert check["changed_pair_ids"] == [victim["pair_id"]]
    assert outcome.summary["shards"]["resumed"] == 3 and outcome.summary["shards"]["computed"] == 1
    assert read_summary(out) == outcome.summary
    assert f"1 pair(s) changed since they were scored, 1 shard(s) recomputed: {victim['pair_id']}" in printed
