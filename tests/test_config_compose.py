"""Every config group composes into the typed schema; a wrong key, type or value fails before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from ssim_ray.config import AuditJobConfig, SourceConfig, register_configs
from ssim_ray.run import evaluate
from ssim_ray.sources import ManifestError

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
REQUIRED = {
    "parquet": ["source.url=/data/manifest.parquet"],
    "prefix": ["source.reference_url=/data/ref", "source.distorted_url=/data/dist"],
    "basicsr": ["ssim.crop_border=4"],  # the preset leaves the super-resolution scale to the user
}


def _groups() -> list:
    return [(group.name, option.stem) for group in sorted(CONF.iterdir()) if group.is_dir()
            for option in sorted(group.glob("*.yaml"))]


def _compose(overrides: list) -> AuditJobConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("ssim_audit", overrides=["output.url=/tmp/out", *overrides])
        return OmegaConf.to_object(cfg)


@pytest.mark.parametrize(("group", "option"), _groups())
def test_every_group_option_composes_into_the_schema(group, option):
    extra = REQUIRED.get(option, []) if group in ("source", "ssim") else []
    job = _compose([f"{group}={option}", *extra])
    assert isinstance(job, AuditJobConfig)
    assert isinstance(job.source, SourceConfig)
    if group == "source":
        assert job.source.kind == option
    if (group, option) == ("ssim", "matlab_ssim"):
        assert job.ssim.downsample == "wang"
    if (group, option) == ("runtime", "cluster"):
        assert job.runtime.address == "auto"


def test_groups_exist_for_each_part_of_the_config():
    assert {group for group, _ in _groups()} == {"source", "ssim", "batch", "output", "runtime"}


def test_default_is_the_sample_audit():
    job = _compose([])
    assert (job.source.kind, job.ssim.precision, job.batch.size, job.runtime.address) == ("sample", "fp32", "auto", None)
    assert job.summary.group_by == "distortion"  # the sample's report breaks down by distortion
    assert _compose(["source=parquet", "source.url=/m.parquet"]).summary.group_by is None


@pytest.mark.parametrize("override", ["source.urll=/x", "ssim.window=7", "runtime.gpu=1"])
def test_unknown_key_fails_with_hydras_message(override):
    with pytest.raises(ConfigCompositionException, match="Could not override"):
        _compose([override])


@pytest.mark.parametrize("override", ["batch.max_size=abc", "ssim.sigma=wide", "runtime.num_workers=two"])
def test_wrong_type_fails_with_hydras_message(override):
    with pytest.raises(ConfigCompositionException, match="Error merging override"):
        _compose([override])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ssim.precision=fp8"], "ssim.precision must be one of"),
        (["ssim.win_size=10"], "positive odd"),
        (["batch.size=0"], "batch.size"),
        (["ssim.data_range=-1"], "ssim.data_range"),
        (["output.mode=append"], "output.mode"),
        (["+source.storage_options.secret=abc"], "credentials are not accepted"),
        (["+output.storage_options.client_kwargs.aws_secret_access_key=abc"], "credentials are not accepted"),
    ],
)
def test_invalid_values_fail_when_converted(overrides, message):
    with pytest.raises(ValueError, match=message):
        _compose(overrides)


def test_mandatory_manifest_url():
    with pytest.raises((MissingMandatoryValue, ValueError), match="source.url"):
        _compose(["source=parquet"])


def test_cli_typo_fails_before_any_work(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "jobs.ssim_audit", "source.pairs_per_shrd=8", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "Could not override 'source.pairs_per_shrd'" in result.stderr
    assert not (tmp_path / "run" / "results").exists()


def test_passthrough_column_named_like_a_result_column_stops_before_work(tmp_path):
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"reference": ["a.png"], "distorted": ["b.png"], "status": ["x"]}), manifest)
    job = _compose(["source=parquet", f"source.url={manifest}", f"output.url={tmp_path / 'out'}"])
    with pytest.raises(ManifestError, match="status"):
        evaluate(job, output_url=str(tmp_path / "out"))
    assert not (tmp_path / "out" / "shards").exists()
