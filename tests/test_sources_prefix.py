"""Prefix sources: pairs matched by key under two folders, sorted listing, extensions optionally ignored."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image
from skimage import data

from ssim_ray.config import SourceConfig, SSIMConfig
from ssim_ray.sources import ManifestError, iter_shard_pairs, plan_shards


def _save(path, pixels, fmt="PNG", **options):
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **options)
    path.write_bytes(buffer.getvalue())


@pytest.fixture
def two_folders(tmp_path):
    """reference/<name>.png and distorted/<name>.png (JPEG-degraded, then stored as PNG), nested one level."""
    photos = {"camera": data.camera(), "coins": data.coins(), "sub/chelsea": data.chelsea(), "sub/coffee": data.coffee()}
    for name, pixels in photos.items():
        _save(tmp_path / "reference" / f"{name}.png", pixels)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=25)
        _save(tmp_path / "distorted" / f"{name}.png", np.asarray(Image.open(buffer)))
    return tmp_path, photos


def _cfg(root, **overrides):
    return SourceConfig(kind="prefix", reference_url=str(root / "reference"), distorted_url=str(root / "distorted"), **overrides)


def _load(cfg):
    plan = plan_shards(cfg)
    return plan, [p for s in plan.shards for p in iter_shard_pairs(s, cfg, SSIMConfig(), threads=2, prefetch=3)]


def test_pairs_match_by_relative_key_in_sorted_order(two_folders):
    root, photos = two_folders
    plan, pairs = _load(_cfg(root, pairs_per_shard=3))
    assert [s.num_pairs for s in plan.shards] == [3, 1] and plan.passthrough_columns == ()
    assert [p.pair_id for p in pairs] == ["camera.png", "coins.png", "sub/chelsea.png", "sub/coffee.png"]
    assert all(p.status == "ok" for p in pairs)
    chelsea = pairs[2]
    assert chelsea.reference == str(root / "reference" / "sub" / "chelsea.png")
    np.testing.assert_array_equal(chelsea.ref.permute(1, 2, 0).numpy(), photos["sub/chelsea"])
    # The distorted side is a real JPEG degradation: same shape, different pixels.
    assert chelsea.dist.shape == chelsea.ref.shape and not bool((chelsea.dist == chelsea.ref).all())


def test_ignore_extension_pairs_png_with_jpeg(two_folders):
    root, _ = two_folders
    moved = root / "distorted" / "camera.png"
    _save(root / "distorted" / "camera.jpg", np.asarray(Image.open(moved)), "JPEG", quality=90)
    moved.unlink()
    strict_plan, strict = _load(_cfg(root))
    assert [(p.pair_id, p.status) for p in strict][:2] == [("camera.jpg", "unpaired"), ("camera.png", "unpaired")]
    assert strict_plan.total_pairs == 5
    plan, pairs = _load(_cfg(root, ignore_extension=True))
    assert plan.total_pairs == 4 and pairs[0].pair_id == "camera" and pairs[0].status == "ok"
    assert pairs[0].decoder.endswith("PNG / Pillow " + Image.__version__ + " JPEG")


def test_keys_that_collide_without_extensions_are_an_error(two_folders):
    root, photos = two_folders
    _save(root / "reference" / "camera.jpg", photos["camera"], "JPEG")
    with pytest.raises(ManifestError, match=r"camera.png and .*camera.jpg both have key 'camera'|camera.jpg and .*camera.png both have key 'camera'"):
        plan_shards(_cfg(root, ignore_extension=True))


def test_empty_prefix_is_an_error_naming_it(tmp_path, two_folders):
    root, _ = two_folders
    (root / "empty").mkdir()
    cfg = SourceConfig(kind="prefix", reference_url=str(root / "reference"), distorted_url=str(root / "empty"))
    with pytest.raises(ManifestError, match=r"source.distorted_url=.*empty.*no objects"):
        plan_shards(cfg)


def test_fingerprint_follows_the_listing(two_folders):
    root, photos = two_folders
    first = plan_shards(_cfg(root))
    assert plan_shards(_cfg(root)).fingerprint == first.fingerprint
    assert [s.shard_id for s in plan_shards(_cfg(root)).shards] == [s.shard_id for s in first.shards]
    target = root / "distorted" / "coins.png"
    payload = bytearray(target.read_bytes())
    payload[-20] ^= 0xFF  # same name, same size, new content
    target.write_bytes(bytes(payload))
    os.utime(target, (1_000_000_000, 1_000_000_000))  # an mtime surely different from the first listing's
    assert plan_shards(_cfg(root)).fingerprint != first.fingerprint
