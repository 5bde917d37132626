"""Settings that cannot work are refused before the first shard (issue 12, point 7).

Per value, when the config is built (so Hydra's callback refuses them before it saves anything): NaN and
inf wherever a number is expected, k1 and k2 > 0, settings that contradict each other. Per plan, after
planning and before anything is written: `summary.group_by` names a result or pass-through column that can
be grouped on, and the pass-through columns have types the results can hold, the same across files or
unified permissively.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ssim_ray import preflight
from ssim_ray.config import AuditJobConfig, SourceConfig, SSIMConfig, register_configs
from ssim_ray.run import evaluate, merge_only
from ssim_ray.sources import ManifestError, plan_shards

REPO = Path(__file__).resolve().parents[1]


def _compose(overrides: list) -> AuditJobConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return OmegaConf.to_object(compose("ssim_audit", overrides=["output.url=/tmp/out", *overrides]))


# ------------------------------------------------------------------------------------------------------
# Per value and per config: refused when the config is built
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ssim.k1=0"], r"ssim.k1 must be a finite number > 0, got 0"),
        (["ssim.k1=-0.01"], r"ssim.k1 must be a finite number > 0"),
        (["ssim.k2=-1"], r"ssim.k2 must be a finite number > 0, got -1"),
        (["ssim.k1=nan"], r"ssim.k1 must be a finite number > 0, got nan"),
        (["ssim.k2=inf"], r"ssim.k2 must be a finite number > 0, got inf"),
        (["ssim.data_range=nan"], r"ssim.data_range must be 'auto' or a finite number > 0, got nan"),
        (["ssim.data_range=inf"], r"ssim.data_range must be 'auto' or a finite number > 0, got inf"),
        (["ssim.sigma=nan"], r"ssim.sigma must be a finite number > 0, got nan"),
        (["ssim.sigma=inf"], r"ssim.sigma must be a finite number > 0, got inf"),
        (["batch.memory_fraction=nan"], r"batch.memory_fraction must be in \(0, 1\], got nan"),
        (["runtime.cpus_per_worker=inf"], r"runtime.cpus_per_worker must be a finite number > 0, got inf"),
        (["runtime.gpus_per_worker=nan"], r"runtime.gpus_per_worker must be a finite number >= 0, got nan"),
        (["runtime.stall_timeout_s=inf"], r"runtime.stall_timeout_s must be a finite number > 0, got inf"),
        (["runtime.progress_interval_s=nan"], r"runtime.progress_interval_s must be a finite number > 0"),
        (["+audit.min_ssim=nan"], r"audit.min_ssim must be in \[-1, 1\], got nan"),
        (["+audit.min_ssim=0.5", "+audit.max_fraction_below=nan"], r"audit.max_fraction_below must be in \[0, 1\]"),
    ],
)
def test_impossible_values_are_refused_when_the_config_is_built(overrides, message):
    with pytest.raises(ValueError, match=message):
        _compose(overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # Used to fail in the gates, after every shard was computed and merged.
        (["source=parquet", "source.url=/m.parquet", "+audit.group_min_ssim=0.5"],
         r"audit.group_min_ssim needs summary.group_by to name a column, got summary.group_by=None"),
        (["runtime.device=cuda", "runtime.gpus_per_worker=0"],
         r"runtime.device=cuda needs runtime.gpus_per_worker > 0"),
    ],
)
def test_settings_that_contradict_each_other_are_refused_when_the_config_is_built(overrides, message):
    with pytest.raises(ValueError, match=message):
        _compose(overrides)


def test_a_config_changed_after_it_was_built_is_checked_again_before_the_run(tmp_path):
    """Library callers build a config and then set fields: the pre-flight runs every check again."""
    cfg = AuditJobConfig()
    cfg.ssim.k1 = 0.0
    with pytest.raises(ValueError, match="ssim.k1 must be a finite number > 0"):
        evaluate(cfg, output_url=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_the_job_refuses_k1_zero_before_hydra_saves_anything(tmp_path):
    """`ssim.k1=0` used to commit shards and record itself in _run.json (the fix then needed overwrite)."""
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "jobs.ssim_audit", "ssim.k1=0", f"hydra.run.dir={run_dir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "ssim.k1 must be a finite number > 0, got 0" in done.stderr
    assert not run_dir.exists()  # neither Hydra's .hydra/ nor any result


# ------------------------------------------------------------------------------------------------------
# Per plan: the columns the results will have, checked before anything is written
# ------------------------------------------------------------------------------------------------------

def _manifest(folder: Path, name: str = "m.parquet", rows: int = 3, **extra: pa.Array) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({"pair_id": [f"{name}-{i}" for i in range(rows)], "reference": ["r.png"] * rows,
                      "distorted": ["d.png"] * rows, **extra})
    path = folder / name
    pq.write_table(table, path)
    return path


def _parquet_cfg(url: Path, out: Path, group_by=None) -> AuditJobConfig:
    cfg = AuditJobConfig(source=SourceConfig(kind="parquet", url=str(url)))
    cfg.output.url, cfg.summary.group_by = str(out), group_by
    return cfg


def _check(cfg: AuditJobConfig) -> None:
    preflight.check_plan(cfg, plan_shards(cfg.source))


def test_group_by_a_missing_column_stops_the_job_before_anything_is_written(tmp_path):
    manifest = _manifest(tmp_path / "data", codec=pa.array(["a", "b", "c"]))
    out = tmp_path / "out"
    cfg = _parquet_cfg(manifest, out, group_by="codecs")
    with pytest.raises(ValueError, match=r"summary.group_by='codecs' is not a column of the results; .*shard_id, codec$"):
        evaluate(cfg, output_url=str(out))
    assert not out.exists()  # no _run.json, no claim, no shard
    with pytest.raises(ValueError, match="summary.group_by='codecs'"):
        merge_only(cfg, output_url=str(out))
    assert not out.exists()


def test_group_by_a_result_or_passthrough_column_passes(tmp_path):
    manifest = _manifest(tmp_path / "data", codec=pa.array(["a", "b", "c"]))
    for column in ("codec", "status", "height"):
        _check(_parquet_cfg(manifest, tmp_path / "out", group_by=column))


def test_group_by_a_column_that_has_no_text_form_is_refused(tmp_path):
    manifest = _manifest(tmp_path / "data", tags=pa.array([["x"], [], ["y", "z"]]))
    with pytest.raises(ValueError, match=r"summary.group_by='tags'.*list<element: string>"):
        _check(_parquet_cfg(manifest, tmp_path / "out", group_by="tags"))
    with pytest.raises(ValueError, match=r"summary.group_by='ssim_per_channel'"):
        _check(_parquet_cfg(manifest, tmp_path / "out", group_by="ssim_per_channel"))


@pytest.mark.parametrize(
    ("column", "message"),
    [
        (pa.array([[("k", 1)], [], None], pa.map_(pa.string(), pa.int64())), r"'extra' has type map<string, int64"),
        (pa.array([{"m": [("k", 1)]}] * 3, pa.struct([("m", pa.map_(pa.string(), pa.int64()))])), r"'extra'.*map"),
        (pa.array([[[("k", 1)]]] * 3, pa.list_(pa.map_(pa.string(), pa.int64()))), r"'extra'.*map"),
        (pa.array([1, 2**63 + 5, 3], pa.uint64()), r"'extra'.*uint64 value 9223372036854775813 .*2\^63"),
    ],
)
def test_passthrough_columns_the_results_cannot_hold_are_refused_before_the_first_shard(tmp_path, column, message):
    manifest = _manifest(tmp_path / "data", extra=column)
    out = tmp_path / "out"
    with pytest.raises(ManifestError, match=message):
        evaluate(_parquet_cfg(manifest, out), output_url=str(out))
    assert not out.exists()


def test_uint64_values_are_checked_without_footer_statistics_too(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    table = pa.table({"reference": ["r.png"] * 2, "distorted": ["d.png"] * 2,
                      "hash": pa.array([1, 2**64 - 1], pa.uint64())})
    pq.write_table(table, folder / "m.parquet", write_statistics=False)
    with pytest.raises(ManifestError, match=r"'hash'.*18446744073709551615"):
        _check(_parquet_cfg(folder / "m.parquet", tmp_path / "out"))


def test_small_uint64_values_and_plain_nested_types_pass(tmp_path):
    manifest = _manifest(tmp_path / "data", hash=pa.array([1, 2, 2**63 - 1], pa.uint64()),
                         tags=pa.array([["x"], [], None]), meta=pa.array([{"q": 1}, {"q": 2}, None]))
    _check(_parquet_cfg(manifest, tmp_path / "out"))


def test_manifest_files_whose_passthrough_types_differ_are_unified_where_arrow_can(tmp_path):
    folder = tmp_path / "data"
    _manifest(folder, "a.parquet", quality=pa.array([1, 2, 3], pa.int32()))
    _manifest(folder, "b.parquet", quality=pa.array([0.5, None, 0.7]))
    _manifest(folder, "c.parquet", quality=pa.nulls(3))
    schema = preflight.check_plan(_parquet_cfg(folder, tmp_path / "out"), plan_shards(SourceConfig(kind="parquet", url=str(folder))))
    assert schema.field("quality").type == pa.float64()


def test_manifest_files_whose_passthrough_types_cannot_be_unified_are_refused_naming_them(tmp_path):
    folder = tmp_path / "data"
    _manifest(folder, "a.parquet", quality=pa.array([1, 2, 3]))
    _manifest(folder, "b.parquet", quality=pa.array(["high", "low", "mid"]))
    out = tmp_path / "out"
    with pytest.raises(ManifestError, match=r"'quality'.*int64 in .*a.parquet, string in .*b.parquet") as raised:
        evaluate(_parquet_cfg(folder, out), output_url=str(out))
    assert "source.passthrough_columns" in str(raised.value)  # says how to leave the column out
    assert not out.exists()


def test_the_sample_source_passes_its_own_checks():
    cfg = AuditJobConfig()
    cfg.summary.group_by = "distortion"
    _check(cfg)


def test_the_ssim_config_examples_still_hold():
    assert SSIMConfig(k1=0.02, k2=0.05, data_range=4095).k1 == 0.02
