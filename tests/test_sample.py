"""The built-in sample set: real photographs under real distortions, deterministic, safe to make concurrently."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq
import pytest
from skimage.metrics import structural_similarity

from ssim_ray.config import SourceConfig, SSIMConfig
from ssim_ray.sources import iter_shard_pairs, plan_shards
from ssim_ray.sources.sample import MANIFEST_NAME, SAMPLE_VERSION, ensure_sample_dataset


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    cache = tmp_path_factory.mktemp("sample-cache")
    ensure_sample_dataset(cache_dir=str(cache))
    return cache


def _digest(folder) -> str:
    """One hash over every file's relative name and bytes: equal digests, equal folders."""
    digest = hashlib.sha256()
    for base, _, names in sorted(os.walk(folder)):
        for name in sorted(names):
            path = os.path.join(base, name)
            digest.update(os.path.relpath(path, folder).encode())
            with open(path, "rb") as handle:
                digest.update(handle.read())
    return digest.hexdigest()


@pytest.mark.slow
def test_sample_set_holds_a_few_hundred_real_pairs_to_group_by(sample_dir):
    table = pq.read_table(sample_dir / SAMPLE_VERSION / MANIFEST_NAME)
    rows = table.to_pylist()
    assert 200 <= len(rows) <= 400 and len({r["pair_id"] for r in rows}) == len(rows)
    assert {"image", "distortion", "level", "color"} <= set(table.column_names)
    assert {r["distortion"] for r in rows} == {"jpeg", "noise", "blur", "contrast", "stereo_view"}
    assert {r["color"] for r in rows} == {"gray", "rgb"}
    assert {r["distorted"].rsplit(".", 1)[1] for r in rows} == {"png", "jpg"}
    for row in rows:
        assert (sample_dir / SAMPLE_VERSION / row["reference"]).is_file()
        assert (sample_dir / SAMPLE_VERSION / row["distorted"]).is_file()


@pytest.mark.slow
def test_sample_pairs_decode_over_the_size_range_and_jpeg_quality_orders_ssim(sample_dir):
    cfg = SourceConfig(kind="sample", cache_dir=str(sample_dir), pairs_per_shard=64)
    plan = plan_shards(cfg)
    sizes, scores = set(), {}
    for shard in plan.shards:
        for pair in iter_shard_pairs(shard, cfg, SSIMConfig(), threads=2, prefetch=8):
            assert pair.status == "ok", pair.error
            sizes.add(tuple(pair.ref.shape[1:]))
            if pair.passthrough["image"] == "camera" and pair.passthrough["distortion"] == "jpeg":
                scores[pair.passthrough["level"]] = structural_similarity(
                    pair.ref[0].numpy(), pair.dist[0].numpy(), gaussian_weights=True, sigma=1.5,
                    use_sample_covariance=False, data_range=pair.data_range,
                )
    assert min(min(s) for s in sizes) == 300 and max(max(s) for s in sizes) == 1411
    qualities = sorted(scores)
    assert qualities == [10.0, 20.0, 30.0, 50.0, 70.0, 90.0]
    assert [scores[q] for q in qualities] == sorted(scores[q] for q in qualities)  # better quality, higher SSIM


@pytest.mark.slow
def test_copies_list_the_set_again_with_unique_ids_without_remaking_it(sample_dir):
    before = _digest(sample_dir)
    one = plan_shards(SourceConfig(kind="sample", cache_dir=str(sample_dir)))
    three_cfg = SourceConfig(kind="sample", cache_dir=str(sample_dir), copies=3, pairs_per_shard=50)
    three = plan_shards(three_cfg)
    assert three.total_pairs == 3 * one.total_pairs and three.fingerprint != one.fingerprint
    assert len({s.shard_id for s in three.shards}) == len(three.shards)
    ids = [p.pair_id for s in (three.shards[0], three.shards[-1]) for p in iter_shard_pairs(s, three_cfg, SSIMConfig(), threads=2, prefetch=4)]
    assert ids[0] == "camera/jpeg/10" and ids[-1].endswith("#copy2") and len(set(ids)) == len(ids)
    assert _digest(sample_dir) == before


_MAKER = textwrap.dedent(
    """
    import os, sys
    from ssim_ray.sources.sample import ensure_sample_dataset, MANIFEST_NAME, SAMPLE_VERSION
    cache = sys.argv[1]
    existed = os.path.exists(os.path.join(cache, SAMPLE_VERSION, MANIFEST_NAME))
    print(ensure_sample_dataset(cache_dir=cache), existed)
    """
)


@pytest.mark.slow
def test_two_processes_making_it_at_once_leave_one_whole_identical_set(sample_dir, tmp_path):
    cache = tmp_path / "shared-cache"
    makers = [subprocess.Popen([sys.executable, "-c", _MAKER, str(cache)], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [maker.communicate(timeout=240)[0].split() for maker in makers]
    assert [maker.returncode for maker in makers] == [0, 0]
    manifest = str(cache / SAMPLE_VERSION / MANIFEST_NAME)
    # Both found no set and made one: the race really happened, and both got the same manifest.
    assert outputs == [[manifest, "False"], [manifest, "False"]]
    assert sorted(os.listdir(cache)) == [SAMPLE_VERSION]  # no staging folder left behind
    assert _digest(cache / SAMPLE_VERSION) == _digest(sample_dir / SAMPLE_VERSION)  # deterministic, byte for byte


def test_missing_scikit_image_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(ImportError, match="the built-in sample set needs scikit-image"):
        ensure_sample_dataset(cache_dir=str(tmp_path))
    assert not (tmp_path / SAMPLE_VERSION).exists() and os.listdir(tmp_path) == []


def test_missing_scikit_image_error_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(ImportError, match=re.escape("pip install 'ssim_ray[sample]'")):
        plan_shards(SourceConfig(kind="sample", cache_dir=str(tmp_path)))


_WITHOUT_SKIMAGE = textwrap.dedent(
    """
    import sys
    sys.modules["skimage"] = None  # as if scikit-image were not installed: any import of it fails
    from ssim_ray.config import SourceConfig, SSIMConfig
    from ssim_ray.sources import load_pairs, plan_shards
    cfg = SourceConfig(kind="sample", cache_dir=sys.argv[1])
    plan = plan_shards(cfg)
    pairs = load_pairs(plan.shards[0], cfg, SSIMConfig(), pair_ids={"camera/jpeg/10"})
    print(plan.total_pairs, [(p.pair_id, p.status) for p in pairs])
    """
)


def test_sources_need_scikit_image_only_to_make_the_sample_set(sample_dir):
    # A fresh process, so that no module imported by another test hides a module-level import of skimage.
    done = subprocess.run([sys.executable, "-c", _WITHOUT_SKIMAGE, str(sample_dir)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    total = pq.ParquetFile(os.path.join(sample_dir, SAMPLE_VERSION, MANIFEST_NAME)).metadata.num_rows
    assert done.stdout.split("\n")[0] == f"{total} [('camera/jpeg/10', 'ok')]"
